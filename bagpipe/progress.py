"""Progress of a long data command (synth, prepare, multi-hot) that people can read.

In a terminal: a tqdm bar on stderr (rows, rows/s, ETA when the total is
known). Elsewhere (a log file, CI): a log line every few seconds with the
same figures, so a redirected run is never silent for long either.
"""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    def __init__(self, what: str, total: int | None, log: logging.Logger, unit: str = "rows",
                 every_s: float = 5.0) -> None:
        self.what, self.total, self.log, self.unit, self.every_s = what, total, log, unit, every_s
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", unit_scale=True, dynamic_ncols=True,
                            leave=False, file=sys.stderr)

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            if self.total:
                eta = (self.total - self.done) / max(rate, 1e-9)
                self.log.info("%s: %d / %d %s (%.0f %s/s, ETA %.0fs)", self.what, self.done, self.total, self.unit,
                              rate, self.unit, eta)
            else:
                self.log.info("%s: %d %s (%.0f %s/s)", self.what, self.done, self.unit, rate, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
