"""What a run reports: one fixed-format line per log step, metrics.jsonl, TensorBoard events,
and a warning when the collapse signature of wav2vec 2.0 pre-training appears.

metrics.jsonl holds one strict-JSON record per line, each written whole by one write call. A
resumed run first drops the records after its checkpoint's step (and a line torn by a kill), so
each step appears once, in metrics.jsonl and in TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_line(record: dict) -> str:
    """One fixed-format line per log step: the record's numbers, then the time (elapsed in
    this process, and the ETA at its pace) and the audio seen since the run began."""
    return (
        "step {step:>7d} | loss {loss:.4f} | contrastive {contrastive_loss:.4f} | "
        "diversity {diversity_loss:.4f} | acc {accuracy:.3f} | masked {percent_masked:5.1f}% | "
        "ppl code {code_perplexity:7.1f} prob {prob_perplexity:7.1f} | lr {lr:.3e} | "
        "temp {temperature:.4f} | grad {grad_norm:.3f} | pad eff {padding_efficiency:.3f}"
        " | {audio_seconds_per_second:7.1f} audio s/s | {audio_hours:.2f} h audio"
        " | {elapsed} elapsed, ETA {eta}"
    ).format(**record, elapsed=clock(record["elapsed_seconds"]), eta=clock(record["eta_seconds"]))


def collapse_warning(record: dict, num_groups: int) -> str | None:
    """The collapse signature: perplexity falling to the number of groups, contrastive loss
    near 0, or a vanishing gradient norm."""
    signs = []
    if record["prob_perplexity"] < 1.5 * num_groups:
        signs.append(
            f"codevector perplexity {record['prob_perplexity']:.2f} near the {num_groups} groups"
        )
    if record["contrastive_loss"] < 0.01:
        signs.append(f"contrastive loss {record['contrastive_loss']:.4f} near 0")
    if math.isfinite(record["grad_norm"]) and record["grad_norm"] < 1e-4:
        signs.append(f"gradient norm {record['grad_norm']:.2e} vanishing")
    if not signs:
        return None
    return (
        "possible collapse at step {}: {}; try a lower learning rate, longer warmup or a "
        "higher min gumbel temperature".format(record["step"], "; ".join(signs))
    )


class MetricsLogger:
    """Writes records on the main rank only. ``resume_step``: the step of the checkpoint a run
    resumes from; records after it, logged before a kill, are dropped."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        if enabled:
            path = Path(output_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                _keep_records_up_to(path, resume_step)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides events at and after it from earlier sessions.
                self.writer = SummaryWriter(
                    str(Path(output_dir) / "tensorboard"),
                    purge_step=None if resume_step is None else resume_step + 1,
                )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (a skipped update's loss, the IPU's grad norm) is null.
        plain = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()
        }
        _write_all(self.fd, (json.dumps(plain, sort_keys=True, allow_nan=False) + "\n").encode())
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            os.close(self.fd)
            if self.writer:
                self.writer.close()


def _keep_records_up_to(path: Path, step: int | None) -> None:
    """Rewrite ``path`` atomically without the records after ``step`` (None: keep every step)
    and without lines that do not parse (the last one, torn by a kill mid-write)."""
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if _keep(line, step)]
    if kept == lines:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _keep(line: bytes, step: int | None) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return step is None or not isinstance(record, dict) or record.get("step", 0) <= step


def _write_all(fd: int, data: bytes) -> None:
    """One write call of the whole line (a regular file takes it whole; the loop covers the
    partial write the system call allows)."""
    while data:
        data = data[os.write(fd, data) :]
