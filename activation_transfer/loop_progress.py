"""Progress of a long loop outside Lightning's (activation extraction): a bar on a terminal, plain lines in a log.

A bar redraws one line with carriage returns, which is right on a terminal and noise in a CI log or a file; there,
one line every ``every_seconds`` says how far the loop is, its rate and its ETA.
"""

from __future__ import annotations

import logging
import sys
import time


def fmt_seconds(seconds: float) -> str:
    """``h:mm:ss``."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def eta(elapsed: float, done: float, total: float | None) -> str:
    """Remaining time at the rate so far, or ``?`` when it cannot be known yet."""
    if not total or total == float("inf") or done <= 0:
        return "?"
    return fmt_seconds(elapsed / done * (total - done))


def interactive() -> bool:
    """Whether progress goes to a terminal (bars) or to a log (plain lines)."""
    return sys.stderr.isatty()


class Progress:
    """Count ``total`` items (documents, batches) and a rate unit (tokens) through a loop.

    Args:
        total: Items the loop will process.
        desc: What the loop does (first words of every line).
        unit: Name of the rate unit counted by :meth:`update`'s ``units`` (e.g. ``tokens``).
        log: Logger of the plain lines.
        every_seconds: Least seconds between two plain lines.
    """

    def __init__(self, total: int, desc: str, unit: str, log: logging.Logger, every_seconds: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.log, self.every_seconds = total, desc, unit, log, every_seconds
        self.done = self.units = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="doc", dynamic_ncols=True)

    def update(self, items: int, units: int = 0) -> None:
        self.done += items
        self.units += units
        elapsed = time.monotonic() - self.start
        rate = self.units / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix({f"{self.unit}/s": f"{rate:.0f}"})
        elif time.monotonic() - self.last >= self.every_seconds or self.done >= self.total:
            self.last = time.monotonic()
            left = eta(elapsed, self.done, self.total)
            self.log.info(
                "%s: %d/%d, %d %s (%.0f/s), elapsed %s, eta %s",
                self.desc,
                self.done,
                self.total,
                self.units,
                self.unit,
                rate,
                fmt_seconds(elapsed),
                left,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
