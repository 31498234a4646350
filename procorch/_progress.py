"""progress(): an events sink that draws a progress bar on standard error.

It follows tqdm's conventions: count out of total, elapsed and remaining
time, rate (``[00:03<00:09, 4.00 steps/s]``). On a terminal the line is
redrawn in place; elsewhere (a CI log, a file) a plain line is written at
most every ``min_interval`` seconds, and always for the last step.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

from ._events import Event, StepFinished, StepStarted

__all__ = ["Progress", "progress"]


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
    """Counts a call's steps from its events and draws them; pass it as ``events=``.

    ``close()`` (or leaving a ``with`` block) writes the final line; with a
    ``total``, the line for the last step is final on its own.
    """

    def __init__(
        self, total: int | None = None, *, file: TextIO | None = None, min_interval: float = 0.5
    ) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise TypeError(f"total must be an int or None (got {total!r})")
        self.total = total
        self.file = file
        self.min_interval = min_interval
        self.done = 0
        self.failed = 0
        self.running = 0
        self._start = time.monotonic()
        self._last_drawn: float | None = None
        self._width = 0
        self._closed = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            self.running += 1
        elif isinstance(event, StepFinished):
            self.running = max(0, self.running - 1)
            self.done += 1
            self.failed += not event.success
            if self.total is not None and self.done >= self.total:
                self.close()
                return
        else:
            return  # progress and crash reports do not move the bar
        now = time.monotonic()
        if self._last_drawn is None or now - self._last_drawn >= self.min_interval:
            self._draw(now, final=False)

    def line(self, now: float | None = None) -> str:
        """The text of the bar at ``now``: ``procorch: 3/12 [00:01<00:03, 2.50 steps/s] ...``."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            count, timing = f"{self.done}", _clock(elapsed)
        else:
            left = "?" if rate == 0 else _clock((self.total - self.done) / rate)
            percent = 100 * self.done // self.total if self.total else 100
            count, timing = f"{percent:3d}% {self.done}/{self.total}", f"{_clock(elapsed)}<{left}"
        extra = f", {self.failed} failed" if self.failed else ""
        extra += f", {self.running} running" if self.running and not self._closed else ""
        return f"procorch: {count} [{timing}, {rate:.2f} steps/s]{extra}"

    def close(self) -> None:
        """Write the final line (once)."""
        if not self._closed:
            self._closed = True
            self._draw(time.monotonic(), final=True)

    def _draw(self, now: float, final: bool) -> None:
        file = self.file if self.file is not None else sys.stderr
        self._last_drawn = now
        text = self.line(now)
        if _is_terminal(file):
            padding = " " * max(0, self._width - len(text))
            self._width = len(text)
            file.write("\r" + text + padding + ("\n" if final else ""))
        else:
            file.write(text + "\n")
        file.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _is_terminal(file: Any) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed file
        return False


def progress(
    total: int | None = None, *, file: TextIO | None = None, min_interval: float = 0.5
) -> Progress:
    """A progress bar for a call, drawn on standard error: pass it as ``events=``.

    ``procorch.map(fn, items, events=procorch.progress(len(items)))``.
    """
    return Progress(total, file=file, min_interval=min_interval)
