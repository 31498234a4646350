"""The command line's standard error: step output, progress and the summary, never mixed up.

Three writers share standard error: the command's own messages, the progress
display (on a terminal, one line redrawn in place), and whatever the steps
print. Before any user code runs, the command points descriptors 1 and 2 at
a pipe (the workers, forked later, inherit them), and a relay thread copies
what arrives to standard error line by line, above the live line, as tqdm
and rich do: erase the line, write the step's lines, draw the line again.
So step output never tears the progress line, and never reaches standard
output, which carries only JSON when it carries anything::

    steps' fds 1 and 2 --pipe--> relay thread --+
    command's messages (say) -------------------+--> Console (a lock) --> standard error
    display thread (draw, every 0.1 s) ---------+

Off a terminal (a CI log) there is no live line: progress is a plain line
every --progress-interval seconds, between whole lines of step output.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import select
import sys
import threading
import time
from typing import NamedTuple

from ._events import Event, StepFinished, StepRerun, StepStarted
from ._model import StepOutcome

__all__ = ["Console", "Display", "OutputRelay", "Tally", "count", "duration", "summary"]

_LIVE_INTERVAL = 0.1  # seconds between redraws of the terminal line
_ERASE = b"\r\x1b[2K"
_PARTIAL_LINE_LIMIT = 65536  # a line this long without a newline is shown as it is
_SLOWEST_SHOWN = 3
_FAILURES_SHOWN = 5
_CAUSE_WIDTH = 200  # characters of a failure's message shown in the summary


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd) and os.environ.get("TERM") != "dumb"
    except OSError:
        return False


class Console:
    """Standard error (a private descriptor of it), shared under a lock, with a live line or not."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.live = _is_terminal(fd)
        self._lock = threading.Lock()
        self._line = b""  # the live line currently drawn, if any

    def say(self, text: str) -> None:
        """Write one line of the command's own, above the live line."""
        self.above(text.encode("utf-8", "backslashreplace") + b"\n")

    def above(self, data: bytes) -> None:
        """Write whole lines above the live line, then draw it again."""
        with self._lock:
            if self._line:
                self._write(_ERASE + data + self._line)
            else:
                self._write(data)

    def draw(self, text: str) -> None:
        """Draw the live line (a terminal only), cut to the terminal's width."""
        line = text[: self._columns() - 1].encode("utf-8", "backslashreplace")
        with self._lock:
            self._line = line
            self._write(_ERASE + line)

    def erase(self) -> None:
        """Erase the live line, for good."""
        with self._lock:
            if self._line:
                self._line = b""
                self._write(_ERASE)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self._fd).columns
        except OSError:
            columns = 0
        return columns if columns > 0 else 80  # a pseudo-terminal may report 0

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        if self._fd < 0:
            return
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:  # standard error is closed or full: nothing more to do
            pass


class OutputRelay:
    """Descriptors 1 and 2 pointed at a pipe, copied to the console by a thread of its own."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._read, write = os.pipe()
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._stop_read, self._stop_write = os.pipe()
        self._partial = b""
        self._thread = threading.Thread(target=self._loop, name="procorch-output", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._read, self._stop_read], [], [])
            if self._read in ready:
                data = os.read(self._read, 65536)
                if data:
                    self._pass_on(data)
                    continue
            if self._stop_read in ready or not ready:
                break
        # Stopping: what the workers wrote before they were stopped is in the pipe.
        os.set_blocking(self._read, False)
        try:
            while data := os.read(self._read, 65536):
                self._pass_on(data)
        except BlockingIOError:
            pass
        if self._partial:
            self._console.above(self._partial + b"\n")
            self._partial = b""

    def _pass_on(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < _PARTIAL_LINE_LIMIT:
            self._partial = data
            return
        if cut == 0:
            cut = len(data)
        self._partial = data[cut:]
        self._console.above(data[:cut] if data[cut - 1 : cut] == b"\n" else data[:cut] + b"\n")

    def close(self) -> None:
        """Give descriptors 1 and 2 back and copy what is left in the pipe."""
        for stream in (sys.stdout, sys.stderr):  # what Python code printed, through the relay
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        os.write(self._stop_write, b"x")
        self._thread.join()
        for fd in (self._read, self._stop_read, self._stop_write):
            os.close(fd)


# -- the tally ------------------------------------------------------------------------


class Counts(NamedTuple):
    """The state of a run at one instant; ``failed`` leaves crashes out."""

    total: int | None  # None while the input is a stream of unknown length
    succeeded: int
    failed: int
    crashed: int
    running: int
    elapsed: float

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.crashed

    @property
    def rate(self) -> float | None:
        """Steps finished per second so far."""
        return self.finished / self.elapsed if self.finished and self.elapsed > 0 else None

    @property
    def left(self) -> float | None:
        """Seconds until the last step finishes, at the rate so far."""
        rate = self.rate
        if rate is None or self.total is None:
            return None
        return (self.total - self.finished) / rate


class Tally:
    """What the display and the summary know of a run: counts kept up from events and outcomes.

    Its memory does not grow with the run: the slowest steps and the first
    failures are kept up to the few the summary shows.
    """

    def __init__(self, total: int | None, reused: int) -> None:
        self.total = total
        self.reused = reused  # outcomes taken from the journal, not run again
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._counts = collections.Counter[str]()
        self.kinds = collections.Counter[str]()
        self._slowest: list[tuple[float, int, str]] = []  # a heap of (duration, tie, task_id)
        self.first_failures: list[StepOutcome] = []

    def event(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, StepStarted):
                self._running.add(event.index)
            elif isinstance(event, StepRerun):
                self._running.discard(event.index)
            elif isinstance(event, StepFinished):
                self._running.discard(event.index)
                entry = (event.duration, -event.index, event.task_id)
                if len(self._slowest) < _SLOWEST_SHOWN:
                    heapq.heappush(self._slowest, entry)
                else:
                    heapq.heappushpop(self._slowest, entry)

    def outcome(self, outcome: StepOutcome) -> None:
        """A step that ran (or was meant to) has its outcome."""
        with self._lock:
            if outcome.success:
                self._counts["succeeded"] += 1
                return
            kind = failure_kind(outcome)
            self.kinds[kind] += 1
            self._counts["crashed" if kind == "crash" else "failed"] += 1
            if len(self.first_failures) < _FAILURES_SHOWN:
                self.first_failures.append(outcome)

    def counts(self) -> Counts:
        with self._lock:
            return Counts(
                self.total,
                self._counts["succeeded"],
                self._counts["failed"],
                self._counts["crashed"],
                len(self._running),
                time.monotonic() - self.started,
            )

    def slowest(self) -> list[tuple[str, float]]:
        with self._lock:
            return [(task_id, seconds) for seconds, _, task_id in sorted(self._slowest)[::-1]]


def count(number: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def duration(seconds: float) -> str:
    """``12 ms``, ``3.14 s``, ``12.5 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _done(counts: Counts) -> str:
    return f"{counts.finished}" if counts.total is None else f"{counts.finished}/{counts.total}"


def progress_text(counts: Counts) -> str:
    """``7/10 done: 5 ok, 1 failed, 1 crashed; 2 running; 3.1 steps/s; about 1.0 s left``."""
    text = (
        f"{_done(counts)} done: {counts.succeeded} ok, {counts.failed} failed, "
        f"{counts.crashed} crashed; {counts.running} running"
    )
    rate = counts.rate
    if rate is not None:
        text += f"; {rate:.1f} steps/s" if rate >= 1 else f"; {rate * 60:.1f} steps/min"
    left = counts.left
    if left is not None and counts.total is not None and counts.finished < counts.total:
        text += f"; about {duration(left)} left"
    return text


def live_text(counts: Counts, width: int = 20) -> str:
    """``[########------------] 4/10  ok 3  failed 1  crashed 0  running 2  2.1/s  ~3.0 s left``."""
    text = ""
    if counts.total is not None:
        filled = width * counts.finished // max(counts.total, 1)
        text = f"[{'#' * filled}{'-' * (width - filled)}] "
    text += (
        f"{_done(counts)}  ok {counts.succeeded}  failed {counts.failed}  "
        f"crashed {counts.crashed}  running {counts.running}"
    )
    rate = counts.rate
    if rate is not None:
        text += f"  {rate:.1f}/s" if rate >= 1 else f"  {rate * 60:.1f}/min"
    left = counts.left
    if left is not None and counts.total is not None and counts.finished < counts.total:
        text += f"  ~{duration(left)} left"
    return text


class Display:
    """The tally on the console while the steps run, drawn from a thread of its own.

    On a terminal, one line redrawn in place ten times a second; anywhere
    else (a file, a pipe, a CI log), a plain line every ``interval`` seconds.
    """

    def __init__(self, tally: Tally, console: Console, interval: float) -> None:
        self._tally = tally
        self._console = console
        self._interval = _LIVE_INTERVAL if console.live else interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="procorch-display", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop drawing; on a terminal, erase the line."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        self._console.erase()

    def _loop(self) -> None:
        if self._console.live:
            self._draw()
        while not self._stopping.wait(self._interval):
            self._draw()

    def _draw(self) -> None:
        counts = self._tally.counts()
        if self._console.live:
            self._console.draw(live_text(counts))
        else:
            self._console.say(f"procorch: [{duration(counts.elapsed)}] {progress_text(counts)}")


# -- the summary ----------------------------------------------------------------------


def failure_kind(outcome: StepOutcome) -> str:
    """The failure's kind, or ``unsuccessful`` when the executor returned success false."""
    return outcome.error.kind if outcome.error is not None else "unsuccessful"


def _cause(outcome: StepOutcome) -> str:
    """The first line of a failed outcome's message, cut to a readable length."""
    lines = outcome.output.strip().splitlines()
    first = lines[0] if lines else "(no message)"
    return first if len(first) <= _CAUSE_WIDTH else first[: _CAUSE_WIDTH - 3] + "..."


def summary(tally: Tally, skipped: int, notes: list[str]) -> list[str]:
    """The lines printed at the end: counts, failures by kind, slowest steps, first failures."""
    counts = tally.counts()
    failed = counts.failed + counts.crashed
    lines = [
        f"procorch: {count(counts.finished, 'step')} in {duration(counts.elapsed)}: "
        f"{counts.succeeded} succeeded, {failed} failed"
    ]
    if tally.reused:
        lines.append(f"  {count(tally.reused, 'step')} already done, from the journal")
    if skipped:
        lines.append(f"  skipped {count(skipped, 'bad line')} of the specs")
    lines.extend(f"  {note}" for note in notes)
    if failed:
        lines.append(
            "  failures by kind: "
            + ", ".join(f"{kind} {n}" for kind, n in tally.kinds.most_common())
        )
    slowest = tally.slowest()
    if slowest:
        lines.append(
            "  slowest: " + ", ".join(f"{task_id} {duration(sec)}" for task_id, sec in slowest)
        )
    if tally.first_failures:
        lines.append("  first failures:")
        width = max(len(outcome.task_id) for outcome in tally.first_failures)
        for outcome in tally.first_failures:
            kind = failure_kind(outcome)
            lines.append(f"    {outcome.task_id:<{width}}  {kind:<12} {_cause(outcome)}")
        if failed > len(tally.first_failures):
            lines.append(f"    and {failed - len(tally.first_failures)} more: see the outcomes")
    return lines
