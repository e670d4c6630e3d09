"""The training report picture: a run's metrics.jsonl (and the train_config.json beside it)
drawn as one PNG of the curves a person checks during wav2vec 2.0 pre-training.

    python -m w2v_stream.report OUTPUT_DIR [--output PATH]   # writes OUTPUT_DIR/report.png

It reads a run in progress (a torn last line is skipped), a run without eval and records of
older runs that lack newer keys. matplotlib is optional (``pip install 'w2v_stream[plots]'``)
and imported only when a picture is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# The gradient norm band advised for wav2vec 2.0 pre-training: well below it learning stalls
# (a collapse sign), well above it updates are unstable.
GRAD_NORM_BAND = (0.5, 2.0)
DEFAULT_CODEVECTOR_GROUPS = 2  # transformers' Wav2Vec2Config default
INSTALL_HINT = "pip install 'w2v_stream[plots]' (or pip install matplotlib)"


class ReportError(Exception):
    """The run's files cannot be drawn; the message names the file and what to do."""


@dataclass
class RunMetrics:
    """What one run logged: train records (with "loss"), eval records (with "eval_loss")."""

    folder: Path
    train: list[dict]
    eval: list[dict]
    num_codevector_groups: int
    unreadable_lines: int  # torn or partial lines, skipped

    @property
    def last_step(self) -> int:
        return max(r["step"] for r in self.train)


@dataclass
class Series:
    """One key's finite values against the step; `nulls` counts records that logged null."""

    key: str
    steps: list[int]
    values: list[float]
    nulls: int


def read_metrics(output_dir: Path) -> RunMetrics:
    """The records of OUTPUT_DIR/metrics.jsonl, and the number of codevector groups from
    OUTPUT_DIR/train_config.json."""
    output_dir = Path(output_dir)
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: not found; pass the --output_dir of a training run")
    train, evals, unreadable = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1  # a run in progress is writing this line
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                unreadable += 1
            elif "loss" in record:
                train.append(record)
            elif "eval_loss" in record:
                evals.append(record)
    if not train:
        raise ReportError(
            f'{path}: no train record (a line with "loss"); the run has not '
            "logged its first step yet, or this is not a metrics file"
        )
    return RunMetrics(output_dir, train, evals, _codevector_groups(output_dir), unreadable)


def _codevector_groups(output_dir: Path) -> int:
    path = output_dir / "train_config.json"
    if not path.is_file():
        return DEFAULT_CODEVECTOR_GROUPS
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: not valid JSON ({exc}); restore it or remove it to draw "
            f"with {DEFAULT_CODEVECTOR_GROUPS} codevector groups"
        ) from exc
    return int(config.get("model", {}).get("num_codevector_groups", DEFAULT_CODEVECTOR_GROUPS))


def series(records: list[dict], key: str) -> Series:
    """The finite values of `key` by step; records without the key (older runs) are left out,
    records with null are counted."""
    steps, values, nulls = [], [], 0
    for record in records:
        if key not in record:
            continue
        value = record[key]
        if value is None:
            nulls += 1
        else:
            steps.append(record["step"])
            values.append(float(value))
    return Series(key, steps, values, nulls)


def _draw(ax, line: Series, label: str | None = None, **style) -> bool:
    """Plots one series labelled with its last value and its null count; False when empty."""
    if not line.values:
        return False
    text = f"{label or line.key} = {line.values[-1]:.3g}"
    if line.nulls:
        text += f" ({line.nulls} null, not drawn)"
    few = len(line.values) <= 60  # markers show single records and sparse evals
    ax.plot(
        line.steps,
        line.values,
        label=text,
        marker="o" if few else None,
        markersize=3,
        linewidth=1.4,
        **style,
    )
    return True


def _draw_all(
    ax,
    records: list[dict],
    keys: tuple[str, ...],
    ylabel: str,
    log: bool = False,
    from_zero: bool = False,
    absent: str | None = None,
) -> bool:
    """One panel's curves, with room above them for the legend; a panel with nothing logged
    says so (`absent`) instead of staying blank."""
    lines = [series(records, key) for key in keys]
    drawn = [_draw(ax, line) for line in lines]
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log", nonpositive="mask")
        ax.yaxis.set_major_formatter(_plain_log_formatter())
        ax.yaxis.set_minor_formatter(_plain_log_formatter())
    if not any(drawn):
        nulls = sum(line.nulls for line in lines)
        absent = absent or f"{' / '.join(keys)}\n" + (
            f"null in all {nulls} records" if nulls else "not logged by this run"
        )
        ax.text(0.5, 0.5, absent, ha="center", va="center", transform=ax.transAxes, color="0.4")
        return False
    if from_zero:
        ax.set_ylim(bottom=0.0)
    _headroom(ax)
    _legend(ax)
    return True


def _headroom(ax, share: float = 0.3) -> None:
    """Raises the top of the y axis by `share` of its span (in decades on a log axis), so that
    a legend fits above the curves."""
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(low, high * (high / low) ** share)
    else:
        ax.set_ylim(low, high + share * (high - low))


def _legend(ax, handles: list | None = None, loc: str = "best") -> None:
    """A small legend, by default where it covers the least of this axes' curves; two columns
    keep a long one short."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    ax.legend(
        handles=handles, loc=loc, fontsize=8, framealpha=0.8, ncols=2 if len(handles) > 2 else 1
    )


def _plain_log_formatter():
    """Log-axis tick labels as plain numbers ("4", "0.3"); some minor ticks are labelled when
    the axis spans 2 decades or less, all of them under half a decade."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))


def _loss_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Loss and its terms (train)")
    _draw_all(
        ax,
        run.train,
        ("loss", "contrastive_loss", "diversity_loss", "feature_penalty"),
        "per masked frame (log scale)",
        log=True,
    )


def _accuracy_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Contrastive accuracy")
    if _draw_all(
        ax, run.train + run.eval, ("accuracy", "eval_accuracy"), "fraction of masked frames"
    ):
        ax.set_ylim(0.0, 1.0)


def _eval_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Eval loss (train loss faint)")
    if series(run.eval, "eval_loss").values:
        _draw(ax, series(run.train, "loss"), "train loss", color="0.6", alpha=0.6)
    _draw_all(
        ax,
        run.eval,
        ("eval_loss", "eval_contrastive_loss"),
        "per masked frame",
        absent="no eval records\n(train with --eval_shards)",
    )


def _perplexity_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Codevector perplexity")
    groups = run.num_codevector_groups
    ax.axhline(
        groups,
        color="tab:red",
        linestyle="--",
        linewidth=1.2,
        label=f"collapse level = {groups} groups",
    )
    _draw_all(
        ax,
        run.train,
        ("code_perplexity", "prob_perplexity"),
        "codevectors in use (log scale)",
        log=True,
    )
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.7 * groups), high)


def _schedule_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Gumbel temperature and learning rate")
    _draw_all(ax, run.train, ("temperature",), "gumbel temperature", from_zero=True)
    ax.set_ylabel("gumbel temperature", color="tab:blue")
    lr_ax = ax.twinx()
    _draw(lr_ax, series(run.train, "lr"), color="tab:orange")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.set_ylim(bottom=0.0)
    _headroom(lr_ax)
    handles = [h for a in (ax, lr_ax) for h in a.get_legend_handles_labels()[0]]
    if ax.get_legend():
        ax.get_legend().remove()  # one legend for both axes, drawn above both curves
    if handles:
        _legend(lr_ax, handles, loc="upper right")


def _grad_norm_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Gradient norm (before clipping)")
    low, high = GRAD_NORM_BAND
    ax.axhspan(low, high, color="tab:green", alpha=0.15, label=f"advised {low:g}–{high:g}")
    _draw_all(ax, run.train, ("grad_norm",), "L2 norm (log scale)", log=True)


def _padding_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Padding efficiency")
    if _draw_all(ax, run.train, ("padding_efficiency",), "audio / padded samples"):
        ax.set_ylim(0.0, 1.02)


def _throughput_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Throughput")
    _draw_all(
        ax, run.train, ("audio_seconds_per_second",), "audio seconds / wall second", from_zero=True
    )


def _skipped_panel(ax, run: RunMetrics) -> None:
    ax.set_title("Skipped updates and utterances (cumulative)")
    if _draw_all(ax, run.train, ("skipped_updates", "skipped_utterances"), "count", from_zero=True):
        top = max(ax.get_ylim()[1], 1.0)
        ax.set_ylim(-0.04 * top, top)  # a count of 0 stays visible above the axis
        ax.yaxis.get_major_locator().set_params(integer=True)


PANELS = (
    _loss_panel,
    _accuracy_panel,
    _eval_panel,
    _perplexity_panel,
    _schedule_panel,
    _grad_norm_panel,
    _padding_panel,
    _throughput_panel,
    _skipped_panel,
)


def report_figure(run: RunMetrics):
    """The report as a matplotlib Figure (Agg canvas, no display): one panel per PANELS entry,
    each with the update step on its x axis."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"the training report needs matplotlib: {INSTALL_HINT}") from exc
    figure = Figure(figsize=(18, 12), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    steps = [r["step"] for r in run.train + run.eval]
    first, last = min(steps), max(steps)
    for ax, panel in zip(figure.subplots(3, 3).flat, PANELS):
        panel(ax, run)
        ax.set_xlabel("update step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlim(first, last if last > first else first + 1)
        ax.grid(True, alpha=0.3)
    evals = f", {len(run.eval)} evals" if run.eval else ", no eval"
    figure.suptitle(
        f"{run.folder.resolve()} — step {run.last_step} ({len(run.train)} train records{evals})",
        fontsize=14,
    )
    return figure


def write_report(output_dir: Path, output: Path | None = None) -> Path:
    """Draws OUTPUT_DIR/metrics.jsonl into one PNG (default OUTPUT_DIR/report.png); returns
    its path."""
    return save_report(read_metrics(output_dir), output)


def save_report(run: RunMetrics, output: Path | None = None) -> Path:
    """Writes the report PNG of `run` (default RUN_FOLDER/report.png); returns its path."""
    output = Path(output) if output is not None else run.folder / "report.png"
    figure = report_figure(run)
    try:
        figure.savefig(output, format="png")
    except OSError as exc:
        raise ReportError(
            f"{output}: cannot write the report ({exc.strerror}); pass --output "
            "a path in a writable folder"
        ) from exc
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="w2v-report",
        description="Draw a training run's metrics.jsonl as one PNG: "
        "losses, accuracy, eval loss, perplexity, schedule, gradient norm, padding, "
        "throughput and skips.",
    )
    parser.add_argument("output_dir", type=Path, help="the --output_dir of a training run")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the PNG (default OUTPUT_DIR/report.png)",
    )
    args = parser.parse_args(argv)
    try:
        run = read_metrics(args.output_dir)
        path = save_report(run, args.output)
    except (ReportError, ImportError) as exc:
        print(f"w2v-report: error: {exc}", file=sys.stderr)
        return 1
    skipped = f"; skipped {run.unreadable_lines} unreadable line(s)" if run.unreadable_lines else ""
    print(f"wrote {path} (step {run.last_step}{skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
