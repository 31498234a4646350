"""The command line's files: the outcomes, the events log and the job log.

Outcomes are written as they become final. In input order (the default),
each outcome waits for those before it, and the finished prefix is written
as it grows; with ``--unordered`` each is written at once. ``-o FILE`` is
written to ``FILE.<random>.part`` beside it and renamed into place when the
run ends, however it ends (an interrupted run keeps every outcome that was
final), so an earlier FILE is never truncated by a run that fails to start.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from typing import IO

import msgspec

from ._events import Event, StepFinished, StepStarted
from ._model import AgentStepSpec, StepOutcome

__all__ = ["EventLog", "JobLog", "OrderedOutcomes", "OutcomeFile", "UnwritableOutput"]

_encode_json = msgspec.json.Encoder().encode


class UnwritableOutput(Exception):
    """A file the command must write cannot be; the message is the line to print."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutcomeFile:
    """The outcomes' destination: standard output, a file through a temporary, or a device.

    A name that is a FIFO, a terminal or ``/dev/null`` is written directly,
    never replaced.
    """

    def __init__(self, path: str, stream: IO[bytes], temporary: str | None) -> None:
        self.path = path
        self.where = "standard output" if path == "<stdout>" else repr(path)
        self._stream = stream
        self._temporary = temporary

    @classmethod
    def open(cls, path: str, stdout: IO[bytes] | None) -> OutcomeFile:
        if path == "-":
            assert stdout is not None
            return cls("<stdout>", stdout, None)
        target = os.path.realpath(path)  # a symlink stays a symlink: its target is replaced
        try:
            info: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise UnwritableOutput(_cannot(path, exc)) from None
        try:
            if info is not None and not stat.S_ISREG(info.st_mode):
                return cls(path, open(path, "wb"), None)
            directory, name = os.path.split(target)
            fd, temporary = tempfile.mkstemp(prefix=f"{name}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise UnwritableOutput(_cannot(path, exc)) from None
        mode = stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~_umask()
        os.fchmod(fd, mode)
        return cls(path, os.fdopen(fd, "wb"), temporary)

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError as exc:
            raise UnwritableOutput(
                f"cannot write outcomes to {self.where}: {exc.strerror or exc}"
            ) from None

    def commit(self) -> None:
        """Put the outcomes in place: rename the temporary over the file."""
        try:
            self._stream.flush()
        finally:
            if self._temporary is not None:
                self._stream.close()
                os.replace(self._temporary, os.path.realpath(self.path))
                self._temporary = None

    def discard(self) -> None:
        """The run did not start: remove the temporary, leaving any earlier file as it was."""
        if self._temporary is not None:
            self._stream.close()
            try:
                os.unlink(self._temporary)
            except FileNotFoundError:
                pass
            self._temporary = None


def _cannot(path: str, exc: OSError) -> str:
    return f"cannot write outcomes to {path!r}: {exc.strerror or exc}"


class OrderedOutcomes:
    """Outcomes in input order, each line written once those before it are."""

    def __init__(self, sink: OutcomeFile, ordered: bool) -> None:
        self._sink = sink
        self._ordered = ordered
        self._waiting: dict[int, StepOutcome] = {}
        self._next = 0  # the first position not yet written
        self.written = 0

    @property
    def pending(self) -> int:
        """Final outcomes waiting for an earlier one."""
        return len(self._waiting)

    def put(self, position: int, outcome: StepOutcome) -> None:
        if not self._ordered:
            self._write([outcome])
            return
        self._waiting[position] = outcome
        ready = []
        while self._next in self._waiting:
            ready.append(self._waiting.pop(self._next))
            self._next += 1
        if ready:
            self._write(ready)

    def write_waiting(self) -> None:
        """Write the outcomes still waiting for an earlier one (the run stopped), in order."""
        if self._waiting:
            self._write([self._waiting[p] for p in sorted(self._waiting)])
            self._waiting.clear()

    def _write(self, outcomes: list[StepOutcome]) -> None:
        self._sink.write(b"".join(_encode_json(outcome) + b"\n" for outcome in outcomes))
        self.written += len(outcomes)


class EventLog:
    """Writes each event as one JSON line and flushes it, so a reader can follow along.

    A write that fails (a full disk) stops the log rather than the run; the
    command warns about it at the end.
    """

    def __init__(self, sink: IO[bytes], path: str) -> None:
        self._sink = sink
        self._path = path
        self.problem: str | None = None

    def write(self, event: Event) -> None:
        if self.problem is not None:
            return
        try:
            self._sink.write(_encode_json(event) + b"\n")
            self._sink.flush()
        except OSError as exc:
            self.problem = f"stopped writing events to {self._path!r}: {exc.strerror or exc}"


JOBLOG_COLUMNS = ("index", "task_id", "agent", "start", "duration", "attempts", "result", "pid")


def _field(text: str) -> str:
    """A text field of the job log: no tab or line break inside."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class JobLog:
    """``--joblog FILE``: one tab-separated line per step, written as it ends (GNU parallel's).

    Columns: the step's index in the run, task_id, agent, its last
    attempt's start (Unix time, seen by this process), duration in seconds
    (measured in the worker), attempts, result (``ok``, the failure's kind,
    or ``unsuccessful``) and the last worker's pid; ``-`` where a step never
    started.
    """

    def __init__(self, sink: IO[bytes], path: str) -> None:
        self._sink = sink
        self._path = path
        self._started: dict[int, tuple[float, int, int]] = {}  # index -> (wall clock, pid, attempt)
        self._durations: dict[int, float] = {}
        self.problem: str | None = None
        self._emit("\t".join(JOBLOG_COLUMNS))

    def event(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            self._started[event.index] = (time.time(), event.pid, event.attempt)
        elif isinstance(event, StepFinished):
            self._durations[event.index] = event.duration

    def outcome(self, index: int, spec: AgentStepSpec, outcome: StepOutcome) -> None:
        started = self._started.pop(index, None)
        duration = self._durations.pop(index, None)
        error = outcome.error
        if outcome.success:
            result = "ok"
        else:
            result = error.kind if error is not None else "unsuccessful"
        attempts = started[2] if started is not None else 0
        fields = [
            str(index),
            _field(spec.task_id),
            _field(spec.agent),
            "-" if started is None else f"{started[0]:.3f}",
            "-" if duration is None else f"{duration:.3f}",
            str(attempts),
            result,
            "-" if started is None else str(started[1]),
        ]
        self._emit("\t".join(fields))

    def _emit(self, line: str) -> None:
        if self.problem is not None:
            return
        try:
            self._sink.write(line.encode("utf-8", "backslashreplace") + b"\n")
            self._sink.flush()
        except OSError as exc:
            self.problem = f"stopped writing the job log {self._path!r}: {exc.strerror or exc}"
