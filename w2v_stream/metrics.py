"""What a run reports: one fixed-format line per log step, metrics.jsonl, TensorBoard events,
and a warning when the collapse signature of wav2vec 2.0 pre-training appears."""

from __future__ import annotations

import json
import math
from pathlib import Path

KEYS = ("step", "loss", "contrastive_loss", "diversity_loss", "percent_masked",
        "code_perplexity", "prob_perplexity", "lr", "temperature", "grad_norm",
        "padding_efficiency", "audio_seconds_per_second", "skipped_updates")


def format_line(record: dict) -> str:
    return ("step {step:>7d} | loss {loss:.4f} | contrastive {contrastive_loss:.4f} | "
            "diversity {diversity_loss:.4f} | masked {percent_masked:5.1f}% | "
            "ppl code {code_perplexity:7.1f} prob {prob_perplexity:7.1f} | lr {lr:.3e} | "
            "temp {temperature:.4f} | grad {grad_norm:.3f} | pad eff {padding_efficiency:.3f}"
            " | {audio_seconds_per_second:7.1f} audio s/s").format(**record)


def collapse_warning(record: dict, num_groups: int) -> str | None:
    """The collapse signature: perplexity falling to the number of groups, contrastive loss
    near 0, or a vanishing gradient norm."""
    signs = []
    if record["prob_perplexity"] < 1.5 * num_groups:
        signs.append(f"codevector perplexity {record['prob_perplexity']:.2f} near the "
                     f"{num_groups} groups")
    if record["contrastive_loss"] < 0.01:
        signs.append(f"contrastive loss {record['contrastive_loss']:.4f} near 0")
    if math.isfinite(record["grad_norm"]) and record["grad_norm"] < 1e-4:
        signs.append(f"gradient norm {record['grad_norm']:.2e} vanishing")
    if not signs:
        return None
    return ("possible collapse at step {}: {}; try a lower learning rate, longer warmup or a "
            "higher min gumbel temperature".format(record["step"], "; ".join(signs)))


class MetricsLogger:
    """Writes records on the main rank only."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        if enabled:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (a skipped update's loss, the IPU's grad norm) is null.
        plain = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in record.items()}
        self.file.write(json.dumps(plain, sort_keys=True, allow_nan=False) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer:
                self.writer.close()
