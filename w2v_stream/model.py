"""Model presets, building the model, and the pre-training objective with static shapes.

``PretrainingObjective`` computes ``Wav2Vec2ForPreTraining``'s loss (transformers 5.23.0) from
the model's own submodules, rewritten so that one graph serves every step of a shape:

- the gumbel temperature is a tensor input of ``forward`` (never an attribute set per step);
- masked frames are replaced with ``torch.where`` (no boolean assignment) and always: a config
  with ``apply_spec_augment=False`` cannot make the context network see the answer;
- every utterance's features are its own, whether its row is padded or packed with others:
  segment ids per sample (0 for padding and gaps) give segment ids per conv position and per
  frame with static ops; the first conv layer's group norm takes its statistics over the
  utterance's own positions; attention stays within the utterance; the positional
  convolution sees only the utterance's frames; frames whose receptive field crosses an
  utterance's end are gap frames, as they do not exist when the utterance is alone;
- rows without audio attend to nothing real and add nothing to the loss;
- negatives equal to their positive get a logit no softmax can pick (``NEGATIVE_IS_POSITIVE``,
  finite so fp16 stays finite) through ``torch.where``, with no ``if ... .any()``;
- layerdrop draws one number per layer and selects with ``torch.where`` (every layer runs);
- no ``requires_grad`` toggling; the feature encoder's gradient is scaled by
  ``feature_grad_mult`` (fairseq's GradMultiply) with a detach identity that leaves the
  forward value exact in any precision;
- fairseq's terms that transformers dropped: the feature penalty (the mean square of the
  feature encoder's output over real frames, weighted by ``feature_penalty_weight`` and scaled
  by the masked frames, as fairseq scales it by its sample size), the contrastive accuracy and
  the code perplexity of the noiseless logits' argmax;
- gumbel noise never becomes infinite (torch's can), and a batch of dummy rows only (an
  epoch's end can make one) gives a zero loss, where transformers' perplexity divides 0 by 0.

The loss is a SUM over masked frames, as transformers returns it: the trainer divides once per
update by the masked frames of the whole update.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

# Pre-training values from fairseq's wav2vec2_base_librispeech recipe. transformers' defaults
# differ (mask_time_prob 0.05 is a fine-tuning value, layerdrop 0.1, no gradient multiplier).
_PRETRAINING = dict(
    mask_time_prob=0.65,
    mask_time_length=10,
    mask_time_min_masks=2,
    num_negatives=100,
    num_codevector_groups=2,
    num_codevectors_per_group=320,
    diversity_loss_weight=0.1,
    contrastive_logits_temperature=0.1,
    layerdrop=0.05,
    feat_proj_dropout=0.1,
    feat_quantizer_dropout=0.1,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    apply_spec_augment=True,
    mask_feature_prob=0.0,
)
# Ours, not Wav2Vec2Config's: the fairseq feature-encoder gradient multiplier.
DEFAULT_FEATURE_GRAD_MULT = 0.1
# The logit of a negative equal to its positive: exp() of it is 0 against any real logit
# (cosine / 0.1 is within [-10, 10]), and it stays finite in fp16, unlike -inf.
NEGATIVE_IS_POSITIVE = -1e4

# transformers 4.29.2 (the Poplar SDK's environment, requirements-ipu.txt) and the main pin
# differ in three places the model path touches; these names are the only version switches.
# 5.x loads weights in their saved dtype unless ``dtype`` says otherwise; 4.x calls it
# ``torch_dtype`` and loads float32 by default.
_DTYPE_ARGUMENT = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _use_sdpa(config: Wav2Vec2Config) -> None:
    """Scaled-dot-product attention where transformers offers a choice (4.36 on); 4.29's
    attention is the eager one, with the same additive (B, 1, T, T) mask."""
    if hasattr(config, "_attn_implementation"):
        config._attn_implementation = "sdpa"


def _encoder_layer(layer: nn.Module, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """One transformer layer over (B, T, H) with an additive (B, 1, T, T) key mask: the hidden
    states, which transformers 4.x returns as the first item of a tuple."""
    out = layer(hidden, attention_mask=key_mask)
    return out[0] if isinstance(out, tuple) else out


# torch < 2.1 (torch 2.0.1 in the Poplar SDK's environment): the oneDNN path of the exact GELU's
# backward on the CPU (gelu_backward_out_cpu, fp32 and bf16) checks only that the GELU's input is
# contiguous and reads a non-contiguous incoming gradient as if it were, giving garbage (1e30,
# inf, nan). The feature encoder's last GELU and the positional convolution's GELU receive their
# gradient through a transpose, so it is made contiguous before it reaches them.
_GELU_GRADIENT_MUST_BE_CONTIGUOUS = torch.__version__ < "2.1"


def _contiguous_gradient(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook: the gradient that reaches ``output`` goes on contiguous."""
    if output.requires_grad and output.device.type == "cpu":
        output.register_hook(torch.Tensor.contiguous)


def _prepared(model: Wav2Vec2ForPreTraining) -> Wav2Vec2ForPreTraining:
    """A built or loaded model as training uses it."""
    model.config.use_cache = False
    if _GELU_GRADIENT_MUST_BE_CONTIGUOUS:
        w2v = model.wav2vec2
        for layer in w2v.feature_extractor.conv_layers:
            layer.activation.register_forward_hook(_contiguous_gradient)
        w2v.encoder.pos_conv_embed.activation.register_forward_hook(_contiguous_gradient)
    return model


def preset_demo() -> dict:
    """Tiny: trains on 2 CPU cores in minutes; for the demo recipe and the tests."""
    return {
        **_PRETRAINING,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": (32,) * 7,
        "num_conv_pos_embeddings": 32,
        "num_conv_pos_embedding_groups": 4,
        "num_codevectors_per_group": 32,
        "codevector_dim": 64,
        "proj_codevector_dim": 64,
        "layerdrop": 0.0,
        "feat_extract_norm": "group",
        "do_stable_layer_norm": False,
    }


def preset_base() -> dict:
    """BASE (95 M parameters): 12 layers of 768, group-norm feature encoder."""
    return {
        **_PRETRAINING,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "conv_dim": (512,) * 7,
        "codevector_dim": 256,
        "proj_codevector_dim": 256,
        "feat_extract_norm": "group",
        "do_stable_layer_norm": False,
        "conv_bias": False,
    }


def preset_large() -> dict:
    """LARGE (317 M parameters): 24 layers of 1024, layer-norm encoder, pre-LN transformer,
    with fairseq's wav2vec2_large_librivox.yaml model values: every dropout and layerdrop 0
    (dropout, attention_dropout, dropout_input, dropout_features, encoder_layerdrop: 0.0),
    final_dim 768, conv_bias true."""
    return {
        **_PRETRAINING,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "conv_dim": (512,) * 7,
        "codevector_dim": 768,
        "proj_codevector_dim": 768,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
        "layerdrop": 0.0,
        "feat_proj_dropout": 0.0,
        "feat_quantizer_dropout": 0.0,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
    }


PRESETS = {"demo": preset_demo, "base": preset_base, "large": preset_large}

# The trainer defaults each preset implies (flags still override), from fairseq's configs:
# wav2vec2_base_librispeech.yaml (feature_grad_mult 0.1, loss_weights [0.1, 10], latent_temp
# [2, 0.5, 0.999995]) and wav2vec2_large_librivox.yaml (feature_grad_mult 1.0, loss_weights
# [0.1, 0], latent_temp [2.0, 0.1, 0.999995]). The demo model follows BASE.
PRESET_TRAINING = {
    "demo": {
        "feature_grad_mult": 0.1,
        "feature_penalty_weight": 10.0,
        "min_gumbel_temperature": 0.5,
    },
    "base": {
        "feature_grad_mult": 0.1,
        "feature_penalty_weight": 10.0,
        "min_gumbel_temperature": 0.5,
    },
    "large": {
        "feature_grad_mult": 1.0,
        "feature_penalty_weight": 0.0,
        "min_gumbel_temperature": 0.1,
    },
}


# What a released model's config.json says for masking and negatives is usually a fine-tuning
# value (mask_time_prob 0.05); continued pre-training takes these, unless flags say otherwise.
_PRETRAINING_MASKING = (
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "num_negatives",
)


def resolve_config(
    preset: str | None,
    model_name_or_path: str | None,
    overrides: dict,
    init_from: str | None = None,
) -> Wav2Vec2Config:
    """defaults < preset (or a local config.json folder, or the config of the model at
    ``init_from`` with pre-training masking) < overrides from flags."""
    values: dict = {}
    if init_from:
        values = Wav2Vec2Config.from_pretrained(init_from).to_dict()
        values.update({k: _PRETRAINING[k] for k in _PRETRAINING_MASKING})
        for key in ("architectures", "transformers_version", "model_type"):
            values.pop(key, None)
    elif model_name_or_path:
        path = Path(model_name_or_path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(
                f"--model_name_or_path {model_name_or_path}: no config.json there "
                f"(nothing is downloaded; give a local folder)"
            )
        values = json.loads(config_file.read_text())
        for key in ("architectures", "transformers_version", "model_type"):
            values.pop(key, None)
    elif preset:
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
        values = PRESETS[preset]()
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = Wav2Vec2Config(**values)
    config.apply_spec_augment = True  # pre-training must replace masked frames
    _use_sdpa(config)
    return config


def build_model(config: Wav2Vec2Config) -> Wav2Vec2ForPreTraining:
    return _prepared(Wav2Vec2ForPreTraining(config))


def load_pretrained(
    init_from: str, config: Wav2Vec2Config
) -> tuple[Wav2Vec2ForPreTraining, list[str]]:
    """Released weights for continued pre-training: a folder saved by ``save_pretrained`` (a
    ``Wav2Vec2ForPreTraining``, ``Wav2Vec2ForCTC`` or ``Wav2Vec2Model``; this project's
    checkpoints too) or a hub id that transformers resolves through its own cache. Returns the
    model, in float32, and the names of the weights that start fresh (the pre-training heads a
    fine-tuned model does not have)."""
    model, info = Wav2Vec2ForPreTraining.from_pretrained(
        init_from, config=config, output_loading_info=True, **{_DTYPE_ARGUMENT: torch.float32}
    )
    if info.get("mismatched_keys"):
        raise ValueError(
            f"--init_from {init_from}: weights of another shape than its config "
            f"says: {sorted(map(str, info['mismatched_keys']))[:5]}"
        )
    return _prepared(model), sorted(info.get("missing_keys", []))


def _perplexity(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' codevector perplexity over the masked frames, (N, G, V) → scalar, except
    that a batch without a masked frame (only dummy rows) gives G instead of 0/0 = NaN."""
    probs = probs.float()  # the 1e-7 and the sums stay exact whatever the model's dtype
    weights = mask.reshape(-1, 1, 1).to(probs.dtype)
    marginal = (probs * weights).sum(0) / mask.sum().clamp(min=1)
    return torch.exp(-torch.sum(marginal * torch.log(marginal + 1e-7), dim=-1)).sum()


def _gumbel_softmax_hard(logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """torch's ``gumbel_softmax(hard=True)`` (same draws, same result) except that an
    exponential draw of exactly 0, which makes torch's noise infinite and the step NaN, is
    clamped to the smallest positive float."""
    noise = -torch.empty_like(logits).exponential_().clamp_min(torch.finfo(logits.dtype).tiny).log()
    soft = ((logits + noise) / tau).softmax(-1)
    hard = torch.zeros_like(logits).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


class Features(NamedTuple):
    """The feature encoder's output for a batch."""

    extract: torch.Tensor  # (B, T, C) layer-normed conv features: the quantizer's input
    hidden: torch.Tensor  # (B, T, H) projected features: the context network's input
    segments: torch.Tensor  # (B, T) int: each frame's utterance, 0 for padding and gap frames
    penalty: torch.Tensor  # () fairseq's feature penalty: mean square of real conv features


def _conv_segment_ids(ids: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """(B, L_in) segment ids of a conv's inputs → (B, L_out) ids of its outputs: an output is
    segment s when every input of its window is, else 0 (a gap: it does not exist when the
    utterance is alone)."""
    windows = ids.unfold(-1, conv.kernel_size[0], conv.stride[0])  # (B, L_out, kernel)
    low, high = windows.amin(-1), windows.amax(-1)
    return torch.where(low == high, high, 0)


def _segment_group_norm(
    norm: nn.GroupNorm, hidden: torch.Tensor, ids: torch.Tensor, block: int
) -> torch.Tensor:
    """``norm`` (one group per channel) with mean and variance per row, channel and segment
    over the segment's own positions: (B, C, T) conv output, (B, T) segment ids → (B, C, T),
    zero at gap positions. Segments start at multiples of ``block`` positions, so a block of
    positions holds at most one segment; a (B, blocks, blocks) same-segment matrix sums block
    sums into segment sums. Computed in float32, as autocast runs group norm."""
    batch, channels, length = hidden.shape
    blocks = -(-length // block)
    pad = blocks * block - length
    values = nn.functional.pad(hidden.float(), (0, pad)).view(batch, channels, blocks, block)
    ids = nn.functional.pad(ids, (0, pad)).view(batch, blocks, block)
    inside = (ids > 0)[:, None].to(values.dtype)  # (B, 1, blocks, block)
    block_ids = ids.amax(-1)  # (B, blocks): the segment of each block's inside positions
    same = ((block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, None, :] > 0)).to(
        values.dtype
    )  # (B, blocks, blocks), symmetric

    def segment_sum(x: torch.Tensor) -> torch.Tensor:  # (B, c, blocks, block) → (B, c, blocks, 1)
        return torch.matmul(x.sum(-1), same).unsqueeze(-1)

    count = segment_sum(inside).clamp(min=1)
    mean = segment_sum(values * inside) / count
    centred = (values - mean) * inside
    scale = torch.rsqrt(segment_sum(centred.square()) / count + norm.eps)
    out = centred * (scale * norm.weight[:, None, None]) + norm.bias[:, None, None] * inside
    return out.reshape(batch, channels, blocks * block)[..., :length].to(norm.weight.dtype)


class PretrainingObjective(nn.Module):
    """The contrastive + diversity loss of one micro-batch, static in shape (see above)."""

    def __init__(
        self,
        model: Wav2Vec2ForPreTraining,
        feature_grad_mult: float = DEFAULT_FEATURE_GRAD_MULT,
        gradient_checkpointing: bool = False,
        feature_penalty_weight: float = 0.0,
        packed: bool = False,
    ):
        super().__init__()
        self.model = model
        self.feature_grad_mult = feature_grad_mult
        self.gradient_checkpointing = gradient_checkpointing
        self.feature_penalty_weight = feature_penalty_weight
        # Rows may hold several utterances (the pack policy): the positional convolution then
        # runs once per parity of utterance. With one utterance per row, once is exact.
        self.packed = packed

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_time_indices: torch.Tensor,
        sampled_negative_indices: torch.Tensor,
        temperature: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss of a batch: (B, L) audio, (B, L) attention mask, (B, T) mask indices,
        (B, T, K) negative indices into the batch's B*T frames, the gumbel temperature, and
        optionally (B, L) segment ids (see ``encode``)."""
        model, w2v, config = self.model, self.model.wav2vec2, self.model.config
        # 1. Feature encoder: features and each frame's utterance (0: padding or gap).
        features = self._features(input_values, attention_mask, segment_ids)
        batch, frames, _ = features.hidden.shape
        valid = features.segments > 0  # (B, T) bool; rows without audio: all False
        # 2. Replace masked frames by the learned mask embedding.
        mask = mask_time_indices.bool() & valid
        hidden = torch.where(
            mask[..., None], w2v.masked_spec_embed.to(features.hidden.dtype), features.hidden
        )
        # 3. Context network.
        hidden = self._context(
            hidden, features.segments, one_per_row=segment_ids is None or not self.packed
        )
        transformer_features = model.project_hid(hidden)
        # 4. Quantize all extracted features with the gumbel temperature given as a tensor.
        quantized, perplexity, code_perplexity = self._quantize(
            model.dropout_features(features.extract), mask, temperature
        )
        quantized = model.project_q(quantized.to(model.project_q.weight.dtype))
        # 5. Contrastive logits against the positive and K negatives: (K+1, B, T).
        size = quantized.shape[-1]
        negatives = quantized.reshape(-1, size)[sampled_negative_indices.long().reshape(-1)]
        negatives = negatives.view(batch, frames, -1, size).permute(2, 0, 1, 3)
        targets = torch.cat([quantized[None], negatives], dim=0)
        logits = torch.cosine_similarity(transformer_features.float(), targets.float(), dim=-1)
        logits = logits / config.contrastive_logits_temperature
        neg_is_pos = (quantized[None] == negatives).all(-1)
        logits = torch.cat([logits[:1], torch.where(neg_is_pos, NEGATIVE_IS_POSITIVE, logits[1:])])
        # 6. Losses, summed over masked frames (the penalty scaled by them, as fairseq does).
        logits = logits.permute(1, 2, 0).reshape(-1, logits.shape[0])  # (B*T, K+1)
        target = torch.where(mask.reshape(-1), 0, -100)
        contrastive = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        num_masked = mask.sum()
        codevectors = config.num_codevectors_per_group * config.num_codevector_groups
        diversity = (codevectors - perplexity) / codevectors * num_masked
        penalty = features.penalty * num_masked
        loss = (
            contrastive
            + config.diversity_loss_weight * diversity
            + self.feature_penalty_weight * penalty
        )
        # fairseq's accuracy: the positive strictly above every negative.
        correct = (logits[:, :1] > logits[:, 1:]).all(-1) & mask.reshape(-1)
        return {
            "loss": loss,
            "contrastive_loss": contrastive,
            "diversity_loss": diversity,
            "feature_penalty": penalty.detach(),
            "num_correct": correct.sum(),
            "codevector_perplexity": perplexity,
            "code_perplexity": code_perplexity,
            "num_masked": num_masked,
            "num_frames": valid.sum(),
        }

    def encode(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) audio → (B, T, H): the context network's output, before ``project_hid``.

        ``segment_ids``: (B, L) integers per sample: 1..n for the row's n utterances in order,
        0 for padding and for gaps between them; each utterance starts at a multiple of the
        feature encoder's total stride (320 samples). None: one utterance per row, where
        ``attention_mask`` is. Each utterance's frames are the frames it has when encoded
        alone; frames of padding and gaps (and frames whose receptive field crosses an
        utterance's end) attend to nothing real. The positional convolution separates
        utterances by parity, so an utterance between two others in a row must span at least
        half its kernel in frames (64 frames, about 1.3 s, for ``num_conv_pos_embeddings``
        128), else its neighbours see each other.
        """
        features = self._features(input_values, attention_mask, segment_ids)
        return self._context(
            features.hidden, features.segments, one_per_row=segment_ids is None or not self.packed
        )

    def _features(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor,
        segment_ids: torch.Tensor | None,
    ) -> Features:
        """Conv feature encoder, gradient scaled by feature_grad_mult, and projection."""
        w2v = self.model.wav2vec2
        layers = w2v.feature_extractor.conv_layers
        ids = attention_mask.to(torch.int32) if segment_ids is None else segment_ids
        hidden = input_values[:, None]  # (B, 1, L)
        for i, layer in enumerate(layers):
            ids = _conv_segment_ids(ids, layer.conv)
            if isinstance(getattr(layer, "layer_norm", None), nn.GroupNorm):
                # A block of this layer's outputs spans one total stride of samples.
                block = math.prod([later.conv.stride[0] for later in layers[i + 1 :]])
                hidden = _segment_group_norm(layer.layer_norm, layer.conv(hidden), ids, block)
                hidden = layer.activation(hidden)
            else:
                hidden = layer(hidden)
        features = hidden.transpose(1, 2)  # (B, T, C)
        if self.feature_grad_mult != 1.0:
            # The forward value is features.detach() exactly (a - a is 0 in any precision);
            # the gradient is scaled by g.
            fixed = features.detach()
            features = fixed + (features - fixed) * self.feature_grad_mult
        real = (ids > 0)[..., None].to(torch.float32)  # (B, T, 1)
        penalty = (features.float().square() * real).sum() / (
            real.sum() * features.shape[-1]
        ).clamp(min=1)
        hidden, extract = w2v.feature_projection(features)
        return Features(extract=extract, hidden=hidden, segments=ids, penalty=penalty)

    def _context(
        self, hidden: torch.Tensor, segments: torch.Tensor, one_per_row: bool
    ) -> torch.Tensor:
        """Transformer over (B, T, H) frames, each frame attending to its own utterance."""
        encoder = self.model.wav2vec2.encoder
        config = self.model.config
        valid = segments > 0  # (B, T)
        hidden = hidden * valid[..., None].to(hidden.dtype)
        # Additive mask (B, 1, T, T): 0 where query and key are frames of one utterance, the
        # dtype's minimum elsewhere (padding and gap frames attend to nothing real).
        same = (segments[:, :, None] == segments[:, None, :]) & valid[:, None, :]
        # fp16: a finite value whose sum with a score stays finite (finfo.min would overflow).
        floor = -1e4 if hidden.dtype == torch.float16 else torch.finfo(hidden.dtype).min
        key_mask = (~same)[:, None].to(hidden.dtype) * floor
        hidden = hidden + self._positions(hidden, segments, one_per_row)
        if not config.do_stable_layer_norm:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)
        for layer in encoder.layers:
            if self.gradient_checkpointing and self.training:
                out = torch.utils.checkpoint.checkpoint(
                    _encoder_layer, layer, hidden, key_mask, use_reentrant=False
                )
            else:
                out = _encoder_layer(layer, hidden, key_mask)
            if self.training and config.layerdrop > 0.0:
                keep = torch.rand((), device=hidden.device) >= config.layerdrop
                out = torch.where(keep, out, hidden)
            hidden = out
        if config.do_stable_layer_norm:
            hidden = encoder.layer_norm(hidden)
        return hidden

    def _positions(
        self, hidden: torch.Tensor, segments: torch.Tensor, one_per_row: bool
    ) -> torch.Tensor:
        """The positional convolution of (B, T, H) frames with padding and gap frames zeroed,
        each utterance seeing only its own frames: with several utterances per row, one
        convolution over the odd-numbered utterances and one over the even-numbered ones
        (neighbours of one parity are further apart than the kernel's half-width)."""
        convolution = self.model.wav2vec2.encoder.pos_conv_embed
        if one_per_row:
            return convolution(hidden)
        odd = (segments % 2 == 1)[..., None]  # (B, T, 1)
        return torch.where(
            odd,
            convolution(hidden * odd.to(hidden.dtype)),
            convolution(hidden * (~odd).to(hidden.dtype)),
        )

    def _quantize(
        self, extract: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        quantizer = self.model.quantizer
        batch, frames, _ = extract.shape
        groups = quantizer.num_groups
        logits = quantizer.weight_proj(extract).view(batch * frames * groups, -1)
        hard = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        if self.training:
            probs = _gumbel_softmax_hard(logits.float(), temperature).type_as(logits)
            soft = torch.softmax(logits.view(batch * frames, groups, -1).float(), dim=-1)
            perplexity = _perplexity(soft, mask)
        else:
            probs = hard
            perplexity = _perplexity(probs.view(batch * frames, groups, -1), mask)
        # fairseq's code_perplexity: of the noiseless logits' argmax, in training too.
        code = _perplexity(hard.detach().view(batch * frames, groups, -1), mask)
        # The codebook lookup as one matrix product per group: (N, G, V) x (G, V, D).
        book = quantizer.codevectors.view(groups, quantizer.num_vars, -1)
        codevectors = torch.einsum(
            "ngv,gvd->ngd", probs.view(batch * frames, groups, -1).to(book.dtype), book
        )
        return codevectors.reshape(batch, frames, -1), perplexity, code
