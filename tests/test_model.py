"""PretrainingObjective against transformers' Wav2Vec2ForPreTraining (loss and gradients) and
the invariance of every utterance's features to padding and packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from w2v_stream.masking import compute_mask, sample_negatives
from w2v_stream.model import PretrainingObjective, build_model, resolve_config

RATE = 16_000
STRIDE = 320  # the default conv stack's total stride in samples
FIELD = 400  # and its receptive field
CLIP_SECONDS = (2.3, 4.1, 6.7)
LAYER_NORM_ENCODER = {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}
NO_DROPOUT = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "feat_quantizer_dropout": 0.0,
    "layerdrop": 0.0,
}


def frames_of(samples: int) -> int:
    return (samples - FIELD) // STRIDE + 1


def clips(seed: int = 0) -> list[torch.Tensor]:
    """Speech-like test audio: a few sines with a wandering pitch, noise, and an amplitude
    that differs from clip to clip. The first clip is a whole number of strides long (packed,
    the next one follows at once), the others are not (a gap follows)."""
    rs = np.random.default_rng(seed)
    out = []
    for i, seconds in enumerate(CLIP_SECONDS):
        t = np.arange(int(seconds * RATE) + (0, 101, 203)[i]) / RATE
        pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + i)
        phase = 2 * np.pi * np.cumsum(pitch) / RATE
        wave = sum(np.sin(k * phase) / k for k in (1, 2, 3, 5))
        wave = wave * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rs.standard_normal(t.size)
        out.append(torch.from_numpy((wave * 10 ** (i - 1)).astype(np.float32)))
    return out


def frame_starts(pieces: list[torch.Tensor]) -> list[int]:
    """Each piece's first frame in a row made by ``batch_of``."""
    ends = np.cumsum([math.ceil(len(p) / STRIDE) for p in pieces])
    return [0, *ends[:-1].tolist()]


def batch_of(
    config, rows: list[list[torch.Tensor]], samples: int, seed: int
) -> dict[str, torch.Tensor]:
    """A batch of rows of ``samples``, row i holding the pieces rows[i] in order, each starting
    at a multiple of the total stride, zeros between and after: input_values, attention_mask,
    segment_ids (int32), and mask and negative indices inside each piece's frames."""
    rs = np.random.default_rng(seed)
    values = torch.zeros(len(rows), samples)
    ids = torch.zeros(len(rows), samples, dtype=torch.int32)
    segments = []
    for i, pieces in enumerate(rows):
        for n, (piece, first) in enumerate(zip(pieces, frame_starts(pieces)), start=1):
            offset = first * STRIDE
            values[i, offset : offset + len(piece)] = piece
            ids[i, offset : offset + len(piece)] = n
        segments.append(
            [
                (first, first + frames_of(len(piece)))
                for piece, first in zip(pieces, frame_starts(pieces))
            ]
        )
    frames = frames_of(samples)
    mask = compute_mask(segments, frames, 0.65, 10, 2, rs)
    negatives = sample_negatives(mask, segments, config.num_negatives, rs)
    return {
        "input_values": values,
        "attention_mask": ids > 0,
        "segment_ids": ids,
        "mask_time_indices": torch.from_numpy(mask),
        "sampled_negative_indices": torch.from_numpy(negatives).long(),
    }


def noise_rows(lengths: list[int], seed: int) -> list[list[torch.Tensor]]:
    """One utterance of Gaussian noise per row."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=generator)] for n in lengths]


def assert_own_features(
    objective: PretrainingObjective, pieces: list[torch.Tensor], encoded: list[torch.Tensor]
) -> None:
    """``encoded[i]`` (frames, H) begins with the frames pieces[i] has alone, to 1e-4 of the
    largest feature value."""
    for piece, got in zip(pieces, encoded):
        with torch.no_grad():
            alone = objective.encode(piece[None], torch.ones(1, len(piece), dtype=torch.bool))[0]
        n = frames_of(len(piece))
        assert alone.shape[0] == n
        error = (got[:n] - alone).abs().max()
        assert error <= 1e-4 * alone.abs().max(), (error, alone.abs().max())


def encode(
    objective: PretrainingObjective, batch: dict[str, torch.Tensor], with_segment_ids: bool = True
) -> torch.Tensor:
    with torch.no_grad():
        return objective.encode(
            batch["input_values"],
            batch["attention_mask"],
            batch["segment_ids"] if with_segment_ids else None,
        )


@pytest.mark.parametrize("encoder", ["group", "layer"])
def test_each_utterance_has_its_own_features_padded_or_packed(encoder):
    config = resolve_config("demo", None, LAYER_NORM_ENCODER if encoder == "layer" else {})
    torch.manual_seed(0)
    model = build_model(config)
    objective = PretrainingObjective(model).eval()  # one utterance per row
    pieces = clips()
    # Padded: one utterance per row in rows of 8.5 s, segment ids from the attention mask or
    # given, one positional convolution or one per parity; the utterances' frames agree
    # (padding frames may not).
    padded_batch = batch_of(config, [[p] for p in pieces], int(8.5 * RATE), seed=0)
    padded = encode(objective, padded_batch, with_segment_ids=False)
    given = encode(objective, padded_batch)
    by_parity = encode(PretrainingObjective(model, packed=True).eval(), padded_batch)
    for i, piece in enumerate(pieces):
        n = frames_of(len(piece))
        assert torch.equal(padded[i, :n], given[i, :n])
        assert torch.allclose(given[i, :n], by_parity[i, :n], atol=1e-5)
    assert_own_features(objective, pieces, list(padded))
    # Packed: all three in one row of 14 s.
    objective = PretrainingObjective(model, packed=True).eval()
    together = encode(objective, batch_of(config, [pieces], 14 * RATE, seed=0))[0]
    assert_own_features(objective, pieces, [together[s:] for s in frame_starts(pieces)])


def test_each_utterance_has_its_own_features_at_base_size():
    config = resolve_config("base", None, {})
    torch.manual_seed(0)
    objective = PretrainingObjective(build_model(config), packed=True).eval()
    pieces = clips(seed=1)
    together = encode(objective, batch_of(config, [pieces], 14 * RATE, seed=0))[0]
    assert_own_features(objective, pieces, [together[s:] for s in frame_starts(pieces)])


@pytest.mark.parametrize("encoder", ["group", "layer"])
def test_objective_equals_transformers_loss(encoder):
    # transformers' group norm takes padding into its statistics (huggingface/transformers
    # #21534), so a group-norm encoder's rows are unpadded here; with a layer-norm encoder the
    # last row is half padding. Train mode with dropout: both draw the same random numbers.
    config = resolve_config("demo", None, LAYER_NORM_ENCODER if encoder == "layer" else {})
    torch.manual_seed(0)
    model = build_model(config).train()
    lengths = [32_000, 32_000, 32_000 if encoder == "group" else 16_000]
    batch = batch_of(config, noise_rows(lengths, seed=1), 32_000, seed=1)
    del batch["segment_ids"]
    model.set_gumbel_temperature(1.5)
    torch.manual_seed(2)
    theirs = model(**{**batch, "attention_mask": batch["attention_mask"].long()})
    torch.manual_seed(2)
    ours = PretrainingObjective(model, feature_grad_mult=1.0).train()(
        **batch, temperature=torch.tensor(1.5)
    )
    assert torch.allclose(theirs.loss, ours["loss"], rtol=1e-5)
    assert torch.allclose(theirs.codevector_perplexity, ours["codevector_perplexity"])


@pytest.mark.parametrize("encoder", ["group", "layer"])
def test_objective_gradients_equal_transformers_for_unpadded_rows(encoder):
    # Dropout and layerdrop off, so the gumbel noise (same seed) is the only randomness.
    overrides = {**NO_DROPOUT, **(LAYER_NORM_ENCODER if encoder == "layer" else {})}
    config = resolve_config("demo", None, overrides)
    torch.manual_seed(0)
    theirs = build_model(config).train()
    ours = build_model(config).train()
    ours.load_state_dict(theirs.state_dict())  # torch 2.0 cannot deepcopy weight_norm's weight
    batch = batch_of(config, noise_rows([32_000] * 3, seed=1), 32_000, seed=1)
    del batch["segment_ids"]
    theirs.set_gumbel_temperature(1.5)
    torch.manual_seed(2)
    their_loss = theirs(**{**batch, "attention_mask": batch["attention_mask"].long()}).loss
    their_loss.backward()
    torch.manual_seed(2)
    our_loss = PretrainingObjective(ours, feature_grad_mult=1.0).train()(
        **batch, temperature=torch.tensor(1.5)
    )["loss"]
    our_loss.backward()
    assert torch.allclose(their_loss, our_loss, rtol=1e-5)
    our_params = dict(ours.named_parameters())
    compared = 0
    for name, param in theirs.named_parameters():
        if param.grad is None:
            assert our_params[name].grad is None, name
            continue
        error = (our_params[name].grad - param.grad).abs().max()
        # The floor: attention's key bias has a zero gradient in exact arithmetic (a softmax
        # ignores a constant added to all of a query's scores), so both hold noise near 1e-9.
        assert error <= 1e-4 * param.grad.abs().max() + 1e-7, (name, error)
        compared += 1
    assert compared > 20


# torch 2.13 warns, when the flags are set, that TF32 on oneDNN needs an Intel GPU.
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_gradients_with_onednn_equal_those_without_it():
    # torch 2.0.1's oneDNN GELU backward misreads the transposed gradient the feature encoder's
    # last GELU receives (w2v_stream.model._prepared makes it contiguous); an odd positional
    # kernel puts the positional convolution's GELU on the same path. In bf16 the gradient
    # multiplier test below goes through it too.
    config = resolve_config("demo", None, {**NO_DROPOUT, "num_conv_pos_embeddings": 31})
    torch.manual_seed(0)
    model = build_model(config).train()
    batch = batch_of(config, noise_rows([32_000] * 2, seed=1), 32_000, seed=1)
    grads = []
    for onednn in (True, False):
        model.zero_grad()
        with torch.backends.mkldnn.flags(enabled=onednn):
            torch.manual_seed(2)
            PretrainingObjective(model, 1.0).train()(**batch, temperature=torch.tensor(1.5))[
                "loss"
            ].backward()
        grads.append(
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        )
    for name, grad in grads[1].items():
        assert torch.isfinite(grads[0][name]).all(), name
        assert (grads[0][name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-6, name


@pytest.mark.parametrize("with_segment_ids", [False, True])
def test_a_batch_of_dummy_rows_gives_a_zero_finite_loss(with_segment_ids):
    config = resolve_config("demo", None, {})
    objective = PretrainingObjective(build_model(config)).train()
    batch = batch_of(config, [[], []], 16_000, seed=0)
    if not with_segment_ids:
        del batch["segment_ids"]
    out = objective(**batch, temperature=torch.tensor(2.0))
    assert out["loss"].item() == 0.0 and out["num_masked"].item() == 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


@pytest.mark.skipif(
    torch.__version__ < "2.1",
    reason="torch 2.0's dynamo cannot trace the "
    "weight_norm hook of transformers 4.x's positional convolution",
)
def test_one_compilation_per_shape_and_no_graph_break():
    # Padded batches (segment ids from the attention mask) and packed ones (segment ids
    # given), three shapes and two, each shape twice.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = resolve_config("demo", None, {"layerdrop": 0.1})
    objective = PretrainingObjective(build_model(config), packed=True).train()
    compiled = torch.compile(objective, backend="aot_eager", dynamic=False, fullgraph=True)
    pieces = clips()
    padded = [(4, 16_000), (3, 24_000), (2, 32_000)] * 2
    packed = [(1, 14 * RATE), (2, 15 * RATE)] * 2
    for step, (rows, samples) in enumerate(padded + packed):
        if step < len(padded):
            pieces_per_row = noise_rows([samples] * (rows - 1) + [samples // 2], seed=step)
        else:
            pieces_per_row = [pieces[step % 2 :]] * rows
        batch = batch_of(config, pieces_per_row, samples, seed=step)
        if step < len(padded):
            del batch["segment_ids"]
        out = compiled(**batch, temperature=torch.tensor(2.0 - 0.1 * step))
        out["loss"].backward()
        assert out["num_frames"] == sum(frames_of(len(p)) for row in pieces_per_row for p in row)
    assert counters["stats"]["unique_graphs"] == 5
    assert sum(counters["graph_break"].values()) == 0


def test_feature_penalty_is_fairseqs_mean_square_of_real_frames_times_masked_frames():
    config = resolve_config("demo", None, NO_DROPOUT)
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = batch_of(config, noise_rows([32_000] * 2, seed=1), 32_000, seed=1)
    temperature = torch.tensor(1.0)
    with torch.no_grad():
        fairseq = model.wav2vec2.feature_extractor(batch["input_values"]).float().pow(2).mean()
        plain = PretrainingObjective(model, 1.0).eval()(**batch, temperature=temperature)
        weighted = PretrainingObjective(model, 1.0, feature_penalty_weight=10.0).eval()(
            **batch, temperature=temperature
        )
        # The same utterance padded to twice its length: its penalty, not the padding's.
        padded = batch_of(config, noise_rows([32_000], seed=1), 64_000, seed=1)
        alone = PretrainingObjective(model, 1.0).eval()(**padded, temperature=temperature)
        first = model.wav2vec2.feature_extractor(batch["input_values"][:1]).pow(2).mean()
    masked = plain["num_masked"]
    assert torch.allclose(plain["feature_penalty"], fairseq * masked, rtol=1e-5)
    assert torch.allclose(weighted["loss"] - plain["loss"], 10 * fairseq * masked, rtol=1e-4)
    assert torch.allclose(alone["feature_penalty"] / alone["num_masked"], first, rtol=1e-5)


def test_accuracy_counts_masked_frames_whose_positive_beats_every_negative():
    # Independently of the objective: transformers' projected states and targets in eval mode
    # (the quantizer's argmax), fairseq's rule (a negative equal to its positive never wins).
    config = resolve_config("demo", None, NO_DROPOUT)
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = batch_of(config, noise_rows([32_000] * 3, seed=1), 32_000, seed=1)
    del batch["segment_ids"]
    with torch.no_grad():
        out = model(**{**batch, "attention_mask": batch["attention_mask"].long()})
        ours = PretrainingObjective(model, 1.0).eval()(**batch, temperature=torch.tensor(1.0))
    targets = out.projected_quantized_states
    size = targets.shape[-1]
    negatives = targets.reshape(-1, size)[batch["sampled_negative_indices"].reshape(-1)]
    negatives = negatives.view(*targets.shape[:2], -1, size).permute(2, 0, 1, 3)
    logits = torch.cosine_similarity(
        out.projected_states[None], torch.cat([targets[None], negatives]), dim=-1
    )
    logits[1:][(negatives == targets[None]).all(-1)] = float("-inf")
    correct = (logits[:1] > logits[1:]).all(0) & batch["mask_time_indices"]
    assert int(ours["num_correct"]) == int(correct.sum())
    assert int(ours["num_masked"]) == int(batch["mask_time_indices"].sum())


def test_the_gradient_multiplier_leaves_the_forward_exact_in_bf16_and_scales_the_gradient():
    config = resolve_config("demo", None, NO_DROPOUT)
    torch.manual_seed(0)
    model = build_model(config).to(torch.bfloat16).eval()
    batch = batch_of(config, noise_rows([32_000] * 2, seed=1), 32_000, seed=1)
    batch["input_values"] = batch["input_values"].to(torch.bfloat16)
    first = model.wav2vec2.feature_extractor.conv_layers[0].conv.weight
    losses, grads = [], []
    for multiplier in (1.0, 0.1):
        first.grad = None
        out = PretrainingObjective(model, multiplier).eval()(**batch, temperature=torch.tensor(1.0))
        out["loss"].backward()
        losses.append(out["loss"].detach())
        grads.append(first.grad.float().clone())
    assert torch.equal(losses[0], losses[1])
    assert torch.allclose(grads[1], 0.1 * grads[0], rtol=0.02, atol=1e-3 * grads[0].abs().max())
