"""The training report picture: metrics.jsonl files written by hand (a run in progress, an older
run, one record) and by a real training run, drawn to a PNG by the real command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import run, train_cmd

from w2v_stream.report import read_metrics, report_figure, series

from conftest import REPO

PANEL_TITLES = [
    "Loss and its terms (train)",
    "Contrastive accuracy",
    "Eval loss (train loss faint)",
    "Codevector perplexity",
    "Gumbel temperature and learning rate",
    "Gradient norm (before clipping)",
    "Padding efficiency",
    "Throughput",
    "Skipped updates and utterances (cumulative)",
]
NULL_GRAD_STEPS = (17, 33)  # non-finite updates: loss and grad_norm logged as null


def train_record(step: int, newer_keys: bool = True) -> dict:
    """A plausible record of update `step` of 50: loss falling, perplexity rising."""
    progress = step / 50
    wobble = 0.05 * math.sin(step)
    skipped = sum(s <= step for s in NULL_GRAD_STEPS)
    diversity = 0.35 - 0.2 * progress
    contrastive = 4.8 - 2.2 * progress + wobble
    record = {
        "step": step,
        "loss": contrastive + 0.1 * diversity,
        "contrastive_loss": contrastive,
        "diversity_loss": diversity,
        "percent_masked": 49.0 + 2 * wobble,
        "code_perplexity": 40 + 260 * progress,
        "prob_perplexity": 45 + 270 * progress,
        "lr": 5e-4 * min(step / 10, (50 - step) / 40),
        "temperature": 2 * 0.995**step,
        "grad_norm": 2.5 - 1.5 * progress + wobble,
        "padding_efficiency": 0.86 + wobble,
        "audio_seconds_per_second": 150 + 100 * wobble,
        "skipped_updates": skipped,
    }
    if step in NULL_GRAD_STEPS:
        record.update(loss=None, grad_norm=None)
    if newer_keys:
        record.update(
            accuracy=0.1 + 0.6 * progress,
            feature_penalty=0.02 - 0.01 * progress,
            skipped_utterances=step // 12,
        )
    return record


def write_run(
    folder: Path,
    steps: int = 50,
    eval_every: int | None = 10,
    newer_keys: bool = True,
    torn: bool = True,
) -> Path:
    """metrics.jsonl as the trainer writes it (eval records on their own lines), cut in the
    middle of its last line as a run in progress leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0 if eval_every else 1, steps + 1):
        if step:
            lines.append(train_record(step, newer_keys))
        if eval_every and step % eval_every == 0:
            lines.append(
                {
                    "step": step,
                    "eval_loss": 4.9 - 2.0 * step / steps,
                    "eval_utterances": 64,
                    "eval_accuracy": 0.1 + 0.5 * step / steps,
                }
            )
    text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in lines)
    if torn:
        text += json.dumps(train_record(steps + 1, newer_keys))[:40]
    (folder / "metrics.jsonl").write_text(text)
    return folder


def report_cmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "w2v_stream.report", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_png(path: Path) -> None:
    """A valid PNG of at least 1000 x 800 pixels that matplotlib reads back."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1000 and height >= 800, (width, height)
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width)


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []


def panel(figure, title: str):
    return next(ax for ax in figure.axes if ax.get_title() == title)


def test_a_run_in_progress_draws_every_panel(tmp_path):
    folder = write_run(tmp_path / "run")
    (folder / "train_config.json").write_text(json.dumps({"model": {"num_codevector_groups": 4}}))
    metrics = read_metrics(folder)
    assert (len(metrics.train), len(metrics.eval), metrics.unreadable_lines) == (50, 6, 1)
    assert metrics.num_codevector_groups == 4 and metrics.last_step == 50
    assert series(metrics.train, "grad_norm").nulls == 2

    figure = report_figure(metrics)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == PANEL_TITLES
    assert "step 50" in figure.get_suptitle() and str(folder) in figure.get_suptitle()
    assert all(ax.get_xlabel() == "update step" for ax in figure.axes if ax.get_title())
    loss = panel(figure, "Loss and its terms (train)")
    assert loss.get_yscale() == "log"
    assert [t.split(" = ")[0] for t in legend_texts(loss)] == [
        "loss",
        "contrastive_loss",
        "diversity_loss",
        "feature_penalty",
    ]
    assert "(2 null, not drawn)" in legend_texts(loss)[0]
    assert legend_texts(panel(figure, "Contrastive accuracy")) == [
        "accuracy = 0.7",
        "eval_accuracy = 0.6",
    ]
    assert legend_texts(panel(figure, "Eval loss (train loss faint)")) == [
        "train loss = 2.6 (2 null, not drawn)",
        "eval_loss = 2.9",
    ]
    perplexity = panel(figure, "Codevector perplexity")
    assert "collapse level = 4 groups" in legend_texts(perplexity)
    assert any(list(line.get_ydata()) == [4, 4] for line in perplexity.get_lines())
    assert perplexity.get_ylim()[0] < 4
    grad = panel(figure, "Gradient norm (before clipping)")
    band = [p for p in grad.patches if p.get_label() == "advised 0.5–2"]
    assert len(band) == 1 and band[0].get_y() == 0.5 and band[0].get_height() == 1.5
    assert "grad_norm = 0.987 (2 null, not drawn)" in legend_texts(grad)
    assert panel(figure, "Padding efficiency").get_ylim() == (0.0, 1.02)
    skipped = legend_texts(panel(figure, "Skipped updates and utterances (cumulative)"))
    assert skipped == ["skipped_updates = 2", "skipped_utterances = 4"]

    proc = report_cmd(folder)
    assert proc.returncode == 0, proc.stderr
    assert "step 50" in proc.stdout and "skipped 1 unreadable line" in proc.stdout
    assert_png(folder / "report.png")


def test_an_older_run_without_eval_or_newer_keys(tmp_path):
    folder = write_run(tmp_path / "old", steps=20, eval_every=None, newer_keys=False, torn=False)
    metrics = read_metrics(folder)
    assert metrics.eval == [] and metrics.num_codevector_groups == 2  # no train_config.json
    figure = report_figure(metrics)
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert texts["Contrastive accuracy"] == ["accuracy / eval_accuracy\nnot logged by this run"]
    assert texts["Eval loss (train loss faint)"] == ["no eval records\n(train with --eval_shards)"]
    assert [
        t.split(" = ")[0] for t in legend_texts(panel(figure, "Loss and its terms (train)"))
    ] == ["loss", "contrastive_loss", "diversity_loss"]
    elsewhere = tmp_path / "pictures" / "old.png"
    elsewhere.parent.mkdir()
    proc = report_cmd(folder, "--output", elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert_png(elsewhere)
    assert not (folder / "report.png").exists()


def test_a_run_with_one_record_and_no_grad_norm(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    record = {**train_record(1), "grad_norm": None}  # the IPU keeps it on the device
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    figure = report_figure(read_metrics(folder))
    grad = panel(figure, "Gradient norm (before clipping)")
    assert [t.get_text() for t in grad.texts] == ["grad_norm\nnull in all 1 records"]
    assert legend_texts(panel(figure, "Codevector perplexity"))[1] == "code_perplexity = 45.2"
    proc = report_cmd(folder)
    assert proc.returncode == 0, proc.stderr
    assert_png(folder / "report.png")


@pytest.mark.parametrize("content", [None, "", '{"eval_loss": 4.9, "step": 0}\n{"loss": 4.'])
def test_no_metrics_or_no_train_record_exits_1_naming_the_file(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = report_cmd(tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert str(tmp_path / "metrics.jsonl") in proc.stderr
    assert ("not found" if content is None else "no train record") in proc.stderr
    assert not (tmp_path / "report.png").exists()


def test_an_unwritable_output_exits_1_naming_it(tmp_path):
    folder = write_run(tmp_path / "run", steps=5)
    proc = report_cmd(folder, "--output", tmp_path / "missing" / "report.png")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        (
            f"w2v-report: error: {tmp_path / 'missing' / 'report.png'}"
            ": cannot write the report (No such file or directory);"
            " pass --output a path in a writable folder"
        )
    ]


def test_the_module_imports_without_matplotlib_and_says_how_to_install_it(tmp_path):
    folder = write_run(tmp_path / "run", steps=5)
    code = (
        "import sys; sys.modules['matplotlib'] = None; import w2v_stream.report as r; "
        f"sys.exit(r.main([{str(folder)!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert "pip install 'w2v_stream[plots]'" in proc.stderr, proc.stderr
    assert not (folder / "report.png").exists()


def test_the_report_of_a_real_training_run(shard_dir, tmp_path):
    out = tmp_path / "run"
    run(
        train_cmd(
            shard_dir,
            out,
            "--max_train_steps",
            6,
            "--logging_steps",
            1,
            "--saving_steps",
            3,
            "--eval_shards",
            shard_dir,
            "--eval_batches",
            2,
        )
    )
    proc = report_cmd(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out / 'report.png'} (step 6)"
    assert_png(out / "report.png")
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics.eval] == [0, 3, 6]
    assert metrics.num_codevector_groups == 2  # the demo preset's, from train_config.json
    figure = report_figure(metrics)
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == PANEL_TITLES
    for title in (
        "Loss and its terms (train)",
        "Codevector perplexity",
        "Gradient norm (before clipping)",
        "Throughput",
    ):
        assert all(
            math.isfinite(float(v))
            for line in panel(figure, title).get_lines()
            for v in line.get_ydata()
        ), title
