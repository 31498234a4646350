"""Steps shared by bench_peers.py: one function per kind of work, and procorch's executors.

Every function is top-level so each pool pickles it by reference, and each
procorch executor calls the very same function, so every pool does the same
work. Timestamps that cross processes use ``time.monotonic()``: on Linux it
reads CLOCK_MONOTONIC, which is one clock for the whole machine.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome

CRASH_AGENT = "segfault"

_event_queue: Any = None


# -- step functions (what a worker runs) -----------------------------------


def noop(task_id: str) -> str:
    """The cheapest possible step."""
    return task_id


def busy_loop(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` additions, holding the GIL throughout."""
    total = 0
    for i in range(loops):
        total += i
    return total


def calibrate_loops(seconds: float, probe: int = 100_000, tries: int = 30) -> int:
    """How many ``busy_loop`` iterations take ``seconds`` here, uncontended (best of ``tries``)."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        busy_loop(probe)
        best = min(best, time.perf_counter() - start)
    return max(1, round(probe * seconds / best))


def segfault() -> None:
    """Kill the calling process with SIGSEGV (reads address 0)."""
    ctypes.string_at(0)


def is_crash_index(index: int, every: int) -> bool:
    """Whether step ``index`` of the crash-heavy batch is one that segfaults."""
    return index % every == every - 1


def sleep_or_crash(index: int, every: int, seconds: float) -> int:
    """Sleep ``seconds``, or segfault when ``index`` is a crash index."""
    if is_crash_index(index, every):
        segfault()
    time.sleep(seconds)
    return index


def stamp_then_crash(path: str) -> None:
    """Write the time to ``path``, then segfault: the start of a recovery gap."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, repr(time.monotonic()).encode())
    os.close(fd)
    segfault()


def start_stamp(_task_id: str) -> float:
    """The time this step started: the end of a recovery gap."""
    return time.monotonic()


def install_event_queue(queue: Any) -> None:
    """Pool initializer: keep the queue that ``emit_to_queue`` writes to."""
    global _event_queue
    _event_queue = queue


def emit_to_queue(count: int) -> int:
    """Put ``count`` timestamps on the worker's event queue (a peer's event stream)."""
    put = _event_queue.put
    for _ in range(count):
        put(time.monotonic())
    return count


# -- procorch executors ------------------------------------------------------


def _ok(spec: AgentStepSpec, output: str = "") -> StepOutcome:
    return StepOutcome(spec.task_id, spec.task_id, spec.agent, output, True)


class _Sized(AgentExecutor):
    """An executor whose concurrency is fixed at construction."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def concurrency_hint(self) -> int:
        return self.workers


class NoopExecutor(_Sized):
    """Returns at once."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, noop(spec.task_id))


class BusyExecutor(_Sized):
    """Runs ``busy_loop(loops)``."""

    def __init__(self, loops: int, workers: int = 2) -> None:
        super().__init__(workers)
        self.loops = loops

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, str(busy_loop(self.loops)))


class CrashyExecutor(_Sized):
    """Runs ``sleep_or_crash`` with the step's index taken from its task_id."""

    def __init__(self, every: int, seconds: float, workers: int = 2) -> None:
        super().__init__(workers)
        self.every = every
        self.seconds = seconds

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, str(sleep_or_crash(int(spec.task_id), self.every, self.seconds)))


class RecoveryExecutor(_Sized):
    """Agent CRASH_AGENT: ``stamp_then_crash(prompt)``; otherwise returns ``start_stamp``."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == CRASH_AGENT:
            stamp_then_crash(spec.prompt)
        return _ok(spec, repr(start_stamp(spec.task_id)))


class EmitExecutor(_Sized):
    """Emits ``count`` progress events, each carrying the time it was emitted."""

    def __init__(self, count: int, workers: int = 2) -> None:
        super().__init__(workers)
        self.count = count

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        emit = events.emit
        for _ in range(self.count):
            emit(time.monotonic())
        return _ok(spec)


# -- the hot path: efficiency and large payloads (issue 16) ---------------------


def timed_busy_loop(loops: int) -> float:
    """``busy_loop(loops)``; the seconds it took, measured where it ran."""
    start = time.perf_counter()
    busy_loop(loops)
    return time.perf_counter() - start


def make_blob(size: int) -> bytes:
    """A result of ``size`` bytes."""
    return b"x" * size


def prompt_length(prompt: str) -> int:
    """What a step that reads its whole (large) prompt returns."""
    return len(prompt)


class TimedBusyExecutor(_Sized):
    """Runs ``timed_busy_loop(loops)``; the output is the seconds spent inside the step."""

    def __init__(self, loops: int, workers: int = 2) -> None:
        super().__init__(workers)
        self.loops = loops

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, repr(timed_busy_loop(self.loops)))


class BlobExecutor(_Sized):
    """Returns ``make_blob(size)`` as the outcome's ``structured`` (msgpack bin, not text)."""

    def __init__(self, size: int, workers: int = 2) -> None:
        super().__init__(workers)
        self.size = size

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        outcome = _ok(spec)
        return StepOutcome(
            outcome.task_id, outcome.session_id, outcome.agent, "", True, make_blob(self.size)
        )


class PromptExecutor(_Sized):
    """Returns ``prompt_length(spec.prompt)``."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, str(prompt_length(spec.prompt)))


# -- cold start and lean workers (import, whole process, worker USS, hint 32) ----------


def sleep_pid(seconds: float) -> int:
    """Sleep ``seconds``, then say which process ran the step."""
    time.sleep(seconds)
    return os.getpid()


class SleepPidExecutor(_Sized):
    """Runs ``sleep_pid(seconds)``; the output is the worker's pid."""

    def __init__(self, seconds: float, workers: int = 2) -> None:
        super().__init__(workers)
        self.seconds = seconds

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return _ok(spec, str(sleep_pid(self.seconds)))
