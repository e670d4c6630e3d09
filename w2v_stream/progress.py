"""Progress of long stages (synthesising the demo corpus, sharding hundreds of hours): a tqdm
bar with counts and an ETA on a terminal, plain periodic lines where output goes to a file (CI,
a cluster's log), so a log shows the run is alive without a bar's carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .metrics import clock as _clock


class Progress:
    """``update(n, hours=0.0)`` as work is done; ``close()`` prints the final count."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "utt",
        stream: TextIO | None = None,
        every_seconds: float = 30.0,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.every = every_seconds
        self.count, self.hours = 0, 0.0
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int, hours: float = 0.0) -> None:
        self.count += n
        self.hours += hours
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.hours:.2f} h audio", refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        eta = ""
        if self.total and self.count and not final:
            eta = f", ETA {_clock(elapsed * (self.total - self.count) / self.count)}"
        audio = f", {self.hours:.2f} h audio" if self.hours else ""
        print(
            f"{self.desc}: {done} {self.unit}{audio}, {_clock(elapsed)} elapsed{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)
