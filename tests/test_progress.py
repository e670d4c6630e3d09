"""Progress lines where output is not a terminal: counts, audio hours, elapsed time, ETA."""

from __future__ import annotations

import io
import re

from w2v_stream.progress import Progress


def test_plain_lines_carry_counts_hours_and_an_eta_and_the_last_line_none():
    out = io.StringIO()  # not a terminal: no bar, plain lines
    bar = Progress("write", total=4, stream=out, every_seconds=0.0)
    bar.update(1, hours=0.5)
    bar.update(1, hours=0.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert re.fullmatch(
        r"write: 1/4 utt, 0\.50 h audio, 0:00:\d\d elapsed, ETA 0:00:\d\d", lines[0]
    ), lines[0]
    assert lines[1].startswith("write: 2/4 utt, 0.75 h audio")
    assert lines[2].startswith("write: 2/4 utt") and "ETA" not in lines[2]


def test_lines_come_at_most_every_so_often():
    out = io.StringIO()
    bar = Progress("scan", stream=out, every_seconds=3600.0)
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("scan: 100 utt, 0:00:0")
