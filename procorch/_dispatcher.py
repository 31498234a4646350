"""The dispatcher: futures and frames back to input indices, then outcomes.

Data flow for one call (the calling thread does all of it)::

    todo (indices) --chunk--> lane.submit --> worker runs the chunk in order
                                                  |
        lane.channel <-- Started / Progress / Done frames, one step at a time
             |
    wait() on every channel, the wake pipe (futures done, cancel) and a timer
             |
    frames --> events, outcomes[index]; a dead worker --> its started step
    fails (crash), the rest of its chunk goes back to todo untouched;
    a step past its time limit or memory cap --> its lane is killed, likewise

- A lane's worker runs one step at a time, and the parent learns which one
  from its ``Started`` frame, so when the worker dies (or is killed for a
  guard) exactly that step is the culprit. Steps queued behind it on the lane
  never began; they run again elsewhere without being charged an attempt.
- Chunks amortise the round trip to the worker for quick steps: their size
  grows from 1 so that a chunk lasts about ``_CHUNK_SECONDS``, and shrinks at
  the end of the batch so every lane stays busy. While steps are quick (a
  mean under ``_QUEUE_BEHIND_BELOW``) each lane also holds a second chunk
  queued behind the running one, so a worker never waits for the parent
  between chunks; slower steps never queue, since work queued on a worker
  cannot be taken back if the step ahead of it turns out slow.
- Events for a step are delivered in the order its worker wrote them, and
  its ``StepFinished`` only after its last frame: all of them travel on one
  pipe. A failed attempt that will be retried ends with ``StepRerun`` rather
  than ``StepFinished``, so nothing follows a step's ``StepFinished``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

import msgspec
from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

from ._events import (
    Event,
    StepCrashed,
    StepFinished,
    StepProgress,
    StepRerun,
    StepStarted,
)
from ._guards import CancelToken, RetryPolicy
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome, _describe
from ._pool import _engine, _Lane
from ._protocol import _decode_frame, _Done, _Progress, _Retire, _Started

# A worker that dies before it starts any step (killed while idle, say) costs
# the step it was about to run nothing; past this many such deaths in a row
# the step is failed, since something kills every worker it is sent to.
_MAX_UNSTARTED_DEATHS = 3

# Chunk sizing: a larger target amortises the round trip over more steps; a
# smaller one keeps the tail of a batch balanced across lanes.
_CHUNK_SECONDS = 0.005
_MAX_CHUNK = 256
_PIPELINE_DEPTH = 2  # chunks a lane may hold: the running one and the next
_QUEUE_BEHIND_BELOW = 0.01  # seconds: mean step time under which chunks queue up

# At the end of a call, how long a lane whose steps are all done may take to
# report its last call returned before it is killed instead of kept warm.
_LAST_RETURN_SECONDS = 2.0

# How often the memory of busy workers is read when a cap is set. A step
# that allocates faster than cap / interval can overshoot by that much.
_MEMORY_POLL_SECONDS = 0.02

_SIGNAL_CAUSES = {
    signal.SIGSEGV: "a segmentation fault: native code touched memory it does not own",
    signal.SIGBUS: "a bus error: native code touched memory that cannot be reached, "
    "such as a truncated memory-mapped file",
    signal.SIGFPE: "a fatal arithmetic error in native code, such as an integer division by zero",
    signal.SIGILL: "an illegal instruction in native code",
    signal.SIGABRT: "abort() was called, usually by a failed assertion or a fatal error "
    "in native code",
    signal.SIGKILL: "something outside the process killed it; the kernel's out-of-memory "
    "killer does this to a process that uses too much memory",
    signal.SIGTERM: "something outside the process asked it to terminate",
}


# faulthandler's first line names the fatal signal it caught.
_FAULTHANDLER_SIGNALS = {
    "Segmentation fault": signal.SIGSEGV,
    "Aborted": signal.SIGABRT,
    "Bus error": signal.SIGBUS,
    "Floating-point exception": signal.SIGFPE,
    "Illegal instruction": signal.SIGILL,
}


def _exit_code(reported: int | None, dump: str) -> int | None:
    """The worker's exit code, corrected by faulthandler's word where the fork server lost it.

    The fork server relays a worker's exit status over a socket, and now and
    then reports 255 instead (CPython's bpo-30589; seen here about once in 300
    crashes). When faulthandler named the fatal signal, that signal is the truth.
    """
    if reported is None or reported == 255:
        for name, signum in _FAULTHANDLER_SIGNALS.items():
            if f"Fatal Python error: {name}" in dump:
                return -int(signum)
    return reported


def _signal_name(exit_code: int | None) -> str | None:
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def _crash_message(spec: AgentStepSpec, pid: int | None, exit_code: int | None) -> str:
    who = f"{_describe(spec)} crashed: its worker process (pid {pid})"
    if exit_code is None:
        return f"{who} died while running it, with an unknown exit code."
    if exit_code < 0:
        name = _signal_name(exit_code)
        try:
            cause = _SIGNAL_CAUSES.get(signal.Signals(-exit_code))
        except ValueError:
            cause = None
        text = f"{who} was killed by {name} (exit code {exit_code})"
        return f"{text}: {cause}." if cause else f"{text}."
    return (
        f"{who} exited with code {exit_code} while running it "
        "(os._exit() or exit() from native code)."
    )


def _megabytes(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


class _CallOptions:
    """The guards of one call, checked and resolved per step."""

    __slots__ = (
        "call_timeout",
        "cancel",
        "capture",
        "memory_limit",
        "retry",
        "step_timeout",
        "step_timeouts",
    )

    def __init__(
        self,
        *,
        step_timeout: float | None = None,
        step_timeouts: Mapping[str, float] | None = None,
        call_timeout: float | None = None,
        memory_limit: int | None = None,
        retry: RetryPolicy | None = None,
        capture: bool = False,
        cancel: CancelToken | None = None,
    ) -> None:
        self.step_timeout = step_timeout
        self.step_timeouts = step_timeouts or {}
        self.call_timeout = call_timeout
        self.memory_limit = memory_limit
        self.retry = retry
        self.capture = capture
        self.cancel = cancel


class _LaneWork:
    """What one lane of this call is doing."""

    __slots__ = ("assigned", "ended", "futures", "lane", "pid", "retiring", "started_at")

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane
        self.assigned: collections.deque[int] = collections.deque()  # in run order
        self.futures: list[Future[None]] = []  # one per chunk not yet known done
        self.started_at: float | None = None  # when assigned[0] began, if it has
        self.pid: int | None = None
        self.ended = False  # the channel hit end-of-file: the worker is gone
        self.retiring = False  # the worker grew too large and takes no more steps

    @property
    def busy(self) -> bool:
        return bool(self.assigned or self.futures)

    def reset(self, lane: _Lane) -> None:
        """Start over on a fresh lane."""
        self.lane = lane
        self.assigned.clear()
        self.futures.clear()
        self.started_at = None
        self.pid = None
        self.ended = False
        self.retiring = False


class _WakePipe:
    """Wakes a dispatcher's wait() from any thread; safe to poke after it is closed."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._writer, False)
        self._lock = threading.Lock()  # no wake-up may hit a closed (reused) fd
        self.closed = False

    def fileno(self) -> int:
        return self._reader

    def poke(self, *_: object) -> None:
        with self._lock:
            if not self.closed:
                try:
                    os.write(self._writer, b"\0")
                except BlockingIOError:  # full: a wake-up is pending anyway
                    pass

    def drain(self) -> None:
        os.read(self._reader, 4096)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            os.close(self._reader)
            os.close(self._writer)


class _Step:
    """What the dispatcher knows of one unfinished step; dropped when it ends."""

    __slots__ = ("attempts", "data", "limit", "spec", "unstarted_deaths")

    def __init__(self, spec: AgentStepSpec, data: bytes, limit: float | None) -> None:
        self.spec = spec
        self.data = data  # its wire bytes
        self.limit = limit  # seconds, or None
        self.attempts = 0  # times it was started
        self.unstarted_deaths = 0  # workers that died before it could start


class _Dispatch:
    """One call of execute_steps_parallel, from first submit to last outcome."""

    def __init__(
        self,
        blob: bytes,
        token: int,
        emit: Callable[[Event], Any] | None,
        options: _CallOptions,
        on_outcome: Callable[[int, StepOutcome], None] | None = None,
        keep_outcomes: bool = True,
    ) -> None:
        self.blob = blob
        self.token = token
        self.emit = emit
        self.options = options
        self.on_outcome = on_outcome
        # Unfinished steps by index (the order they were added in). A finished
        # step leaves nothing behind but, with keep_outcomes, its outcome: a
        # stream of a million steps runs in constant memory.
        self.steps: dict[int, _Step] = {}
        self.outcomes: dict[int, StepOutcome] | None = {} if keep_outcomes else None
        self.next_index = 0
        self.remaining = 0
        self.stopping = False  # cancelled or out of time: no new steps
        self.todo: collections.deque[int] = collections.deque()
        self.delayed: list[tuple[float, int]] = []  # (ready at, index): retries in backoff
        self.works: list[_LaneWork] = []
        self.mean_duration: float | None = None
        # A worker left holding more than half the cap is retired between
        # steps, so that the next step starts with room to work.
        limit = options.memory_limit
        self.retire_above = None if limit is None else limit // 2
        self.deadline: float | None = None
        self.next_memory_check = 0.0
        self._wake = _WakePipe()
        self._previous_sigterm: Any = None

    def add(self, spec: AgentStepSpec, data: bytes) -> int:
        """Queue a checked spec (and its wire bytes); returns its index."""
        index = self.next_index
        self.next_index += 1
        limit = self.options.step_timeouts.get(spec.task_id, self.options.step_timeout)
        self.steps[index] = _Step(spec, data, limit)
        self.remaining += 1
        self.todo.append(index)
        return index

    # -- the loop ---------------------------------------------------------------

    def run(self, lane_count: int) -> None:
        """Run until every added step (including those added meanwhile) has an outcome."""
        self.open(lane_count)
        try:
            while self.remaining:
                self.turn()
        finally:
            self.close()

    def open(self, lane_count: int) -> None:
        """Borrow the lanes and arm the guards; ``turn`` until done, then ``close``."""
        if self.options.call_timeout is not None:
            self.deadline = time.monotonic() + self.options.call_timeout
        self.works = [_LaneWork(lane) for lane in _engine.acquire(lane_count)]
        if self.options.cancel is not None:
            self.options.cancel._listen(self._wake_up)
        self._previous_sigterm = _raise_keyboard_interrupt_on_sigterm()

    def turn(self) -> None:
        """Start what can start, wait for news (or a deadline), and act on it."""
        now = time.monotonic()
        cancel = self.options.cancel
        if cancel is not None and cancel.cancelled:
            self._stop_everything("cancelled")
            return
        if self.deadline is not None and now >= self.deadline:
            self._stop_everything("deadline")
            return
        self._release_delayed(now)
        self._assign()
        self._wait(now)
        for work in self.works:
            self._service(work)
        self._check_time_limits()
        self._check_memory()

    def close(self) -> None:
        """Give the lanes back (killing any with unfinished work) and disarm the guards."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self.options.cancel is not None:
            self.options.cancel._forget(self._wake_up)
        self._close()

    def _wait(self, now: float) -> None:
        wake_at = []
        if self.deadline is not None:
            wake_at.append(self.deadline)
        if self.delayed:
            wake_at.append(self.delayed[0][0])
        for work in self.works:
            if work.started_at is not None:
                limit = self.steps[work.assigned[0]].limit
                if limit is not None:
                    wake_at.append(work.started_at + limit)
                if self.options.memory_limit is not None:
                    wake_at.append(self.next_memory_check)
        timeout = max(0.0, min(wake_at) - now) if wake_at else None
        listening = [work.lane.channel for work in self.works if work.busy and not work.ended]
        wake_fd = self._wake.fileno()
        ready = wait([*listening, wake_fd], timeout)
        if wake_fd in ready:
            self._wake.drain()

    def wake(self) -> None:
        """Interrupt the current wait (from any thread), e.g. because steps were added."""
        self._wake.poke()

    def _wake_up(self, *_: object) -> None:
        # Runs in loky's manager thread or a canceller's, maybe after the call.
        self._wake.poke()

    # -- starting steps -----------------------------------------------------------

    def _release_delayed(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            self.todo.append(heapq.heappop(self.delayed)[1])

    def _chunk_size(self) -> int:
        if self.mean_duration is None:
            return 1
        wanted = int(_CHUNK_SECONDS / max(self.mean_duration, 1e-6))
        fair = math.ceil(len(self.todo) / (_PIPELINE_DEPTH * len(self.works)))
        return max(1, min(wanted, fair, _MAX_CHUNK))

    def _assign(self) -> None:
        # Idle lanes first; then, for quick steps only, a second chunk queued
        # behind a running one. A step queued behind a slow one would wait for
        # it (queued work cannot be taken back), so slow steps never queue.
        quick = self.mean_duration is not None and self.mean_duration < _QUEUE_BEHIND_BELOW
        depth = _PIPELINE_DEPTH if quick else 1
        for work in sorted(self.works, key=lambda work: len(work.futures)):
            if not self.todo:
                return
            if len(work.futures) >= depth or work.ended or work.retiring:
                continue
            size = self._chunk_size()
            chunk = [self.todo.popleft() for _ in range(min(size, len(self.todo)))]
            try:
                future = work.lane.submit(
                    self.token,
                    self.blob,
                    [self.steps[index].data for index in chunk],
                    self.options.capture,
                    self.retire_above,
                )
            except (BrokenProcessPool, ShutdownExecutorError):
                # The worker died while idle; the chunk never began.
                self.todo.extendleft(reversed(chunk))
                if not work.futures:
                    self._replace_lane(work)
                continue
            future.add_done_callback(self._wake_up)
            work.futures.append(future)
            work.assigned.extend(chunk)

    # -- hearing from lanes ---------------------------------------------------------

    def _service(self, work: _LaneWork) -> None:
        if not work.busy:
            return
        # Look at the futures before draining: a worker writes a chunk's last
        # frame before its call returns, so once a future is done every frame
        # of its chunk is already in the pipe. Looking after draining races.
        done = [future for future in work.futures if future.done()]
        reader = work.lane.frames
        for data in reader.read():
            try:
                frame = _decode_frame(data)
            except msgspec.DecodeError:  # cannot happen short of a bug: say so
                work.ended = True
                break
            self._on_frame(work, frame)
        if reader.eof:
            work.ended = True  # the worker is gone
        failed = [future for future in done if future.exception() is not None]
        if failed:
            self._on_lost_worker(work, failed[0].exception())
            return
        if work.retiring:
            self._retire(work)
            return
        for future in done:
            work.futures.remove(future)
        if not work.futures and work.assigned:
            # Every chunk returned, yet steps are unaccounted for: a bug.
            for index in list(work.assigned):
                self._fail(index, "internal", self._internal_message(index), None)
            work.assigned.clear()
            work.started_at = None

    def _on_frame(self, work: _LaneWork, frame: Any) -> None:
        if isinstance(frame, _Retire):
            work.retiring = True
            return
        index = work.assigned[0]
        step = self.steps[index]
        spec = step.spec
        if isinstance(frame, _Started):
            step.attempts += 1
            work.started_at = time.monotonic()
            work.pid = frame.pid
            if self.emit is not None:
                self.emit(StepStarted(index, spec.task_id, step.attempts, spec.agent, frame.pid))
        elif isinstance(frame, _Progress):
            if self.emit is not None:
                self.emit(StepProgress(index, spec.task_id, step.attempts, frame.data))
        elif isinstance(frame, _Done):
            work.assigned.popleft()
            work.started_at = None
            duration = frame.duration
            if self.mean_duration is None:
                self.mean_duration = duration
            else:
                self.mean_duration = 0.8 * self.mean_duration + 0.2 * duration
            self._settle(index, frame.outcome, duration)

    def _on_lost_worker(self, work: _LaneWork, exc: BaseException | None) -> None:
        """The lane's worker died, or its call failed, before its chunk was done."""
        lane = work.lane
        dump = lane.crash_dump()
        exit_code = _exit_code(lane.exit_code(), dump)
        pid = work.pid if work.pid is not None else lane.pid
        printed = lane.printed() if self.options.capture else None
        culprit = work.assigned[0] if work.started_at is not None else None
        duration = 0.0 if work.started_at is None else time.monotonic() - work.started_at
        self._requeue_unstarted(
            work, skip_first=culprit is not None, pid=pid, code=exit_code, dump=dump
        )
        self._replace_lane(work)
        if culprit is None:
            return
        spec = self.steps[culprit].spec
        if not isinstance(exc, BrokenProcessPool):
            self._fail(culprit, "internal", self._internal_message(culprit, exc), None)
            return
        if self.emit is not None:
            self.emit(
                StepCrashed(
                    culprit,
                    spec.task_id,
                    self.steps[culprit].attempts,
                    pid,
                    exit_code,
                    _signal_name(exit_code),
                )
            )
        error = StepError(
            kind="crash",
            message=_crash_message(spec, pid, exit_code),
            traceback=dump or None,
            exit_code=exit_code,
            signal=_signal_name(exit_code),
            pid=pid,
            printed=None if printed is None else printed + dump,
        )
        self._fail(culprit, "crash", error.message, error, duration)

    def _requeue_unstarted(
        self,
        work: _LaneWork,
        *,
        skip_first: bool,
        pid: int | None,
        code: int | None,
        dump: str = "",
    ) -> None:
        """Send the steps a dead lane never began back to the front of the queue."""
        unstarted = list(work.assigned)[1 if skip_first else 0 :]
        if unstarted and not skip_first:
            # The worker died before it began anything: charge the first step.
            first = unstarted[0]
            step = self.steps[first]
            step.unstarted_deaths += 1
            if step.unstarted_deaths > _MAX_UNSTARTED_DEATHS:
                unstarted.pop(0)
                spec = step.spec
                message = (
                    f"{_describe(spec)} could not start: {step.unstarted_deaths} worker "
                    f"processes in a row died before it began (the last, pid {pid}, with exit "
                    f"code {code})."
                )
                if dump:
                    message += f" It said: {dump.strip()}"
                error = StepError(
                    kind="crash",
                    message=message,
                    exit_code=code,
                    signal=_signal_name(code),
                    pid=pid,
                )
                self._record(
                    first, StepOutcome.failed(spec.task_id, spec.agent, message, error), 0.0
                )
        self.todo.extendleft(reversed(unstarted))

    def _replace_lane(self, work: _LaneWork, *, kill: bool = True) -> None:
        work.lane.close(kill=kill)
        work.reset(_engine.new_lane())

    def _retire(self, work: _LaneWork) -> None:
        """Replace a worker that grew too large; the steps it declined run elsewhere."""
        self.todo.extendleft(reversed(work.assigned))
        self._replace_lane(work, kill=False)  # it runs nothing: its calls return at once

    # -- guards ------------------------------------------------------------------

    def _check_time_limits(self) -> None:
        now = time.monotonic()
        for work in self.works:
            if work.started_at is None:
                continue
            index = work.assigned[0]
            limit = self.steps[index].limit
            if limit is not None and now - work.started_at > limit:
                spec = self.steps[index].spec
                message = (
                    f"{_describe(spec)} timed out: it ran for more than its {limit:g} s limit, "
                    f"so its worker process (pid {work.pid}) was killed."
                )
                self._stop_lane(work, "timeout", message, limit=limit)

    def _check_memory(self) -> None:
        limit = self.options.memory_limit
        now = time.monotonic()
        if limit is None or now < self.next_memory_check:
            return
        self.next_memory_check = now + _MEMORY_POLL_SECONDS
        for work in self.works:
            if work.started_at is None:
                continue
            used = work.lane.memory()
            if used > limit:
                spec = self.steps[work.assigned[0]].spec
                message = (
                    f"{_describe(spec)} went over its memory cap: its worker process (pid "
                    f"{work.pid}) and its children reached {_megabytes(used)}, more than the "
                    f"{_megabytes(limit)} allowed, so they were killed."
                )
                self._stop_lane(work, "memory", message, limit=float(limit), memory=used)

    def _stop_lane(
        self,
        work: _LaneWork,
        kind: ErrorKind,
        message: str,
        *,
        limit: float | None = None,
        memory: int | None = None,
    ) -> None:
        """Kill a lane whose running step broke a guard; fail that step, requeue the rest."""
        index = work.assigned[0]
        assert work.started_at is not None
        duration = time.monotonic() - work.started_at
        printed = work.lane.printed() if self.options.capture else None
        error = StepError(
            kind=kind, message=message, pid=work.pid, limit=limit, memory=memory, printed=printed
        )
        self._requeue_unstarted(work, skip_first=True, pid=work.pid, code=None)
        self._replace_lane(work)
        self._fail(index, kind, message, error, duration)

    def _stop_everything(self, why: str) -> None:
        """End the call now: running steps are killed, queued ones never start."""
        self.stopping = True
        call_timeout = self.options.call_timeout
        for work in self.works:
            if work.started_at is not None:
                index = work.assigned.popleft()
                spec = self.steps[index].spec
                if why == "deadline":
                    kind: ErrorKind = "timeout"
                    message = (
                        f"{_describe(spec)} timed out: the call's {call_timeout:g} s limit ran "
                        f"out while it was running, so its worker process (pid {work.pid}) "
                        "was killed."
                    )
                else:
                    kind = "cancelled"
                    message = (
                        f"{_describe(spec)} was cancelled while running; its worker process "
                        f"(pid {work.pid}) was killed."
                    )
                printed = work.lane.printed() if self.options.capture else None
                duration = time.monotonic() - work.started_at
                error = StepError(
                    kind=kind,
                    message=message,
                    pid=work.pid,
                    limit=call_timeout if kind == "timeout" else None,
                    printed=printed,
                )
                self._record(
                    index, StepOutcome.failed(spec.task_id, spec.agent, message, error), duration
                )
            if work.busy:
                self._replace_lane(work)
        before = "the call's time limit ran out" if why == "deadline" else "the call was cancelled"
        for index in sorted(self.steps):
            spec = self.steps[index].spec
            message = f"{_describe(spec)} did not run: {before} before it started."
            error = StepError(
                kind="cancelled",
                message=message,
                limit=call_timeout if why == "deadline" else None,
            )
            self._record(index, StepOutcome.failed(spec.task_id, spec.agent, message, error))
        self.todo.clear()
        self.delayed.clear()

    # -- outcomes ---------------------------------------------------------------

    def _settle(self, index: int, outcome: StepOutcome, duration: float) -> None:
        """A finished attempt: retry it if the policy says so, else record it."""
        error = outcome.error
        if error is not None and self._retry(index, error):
            return
        self._record(index, outcome, duration)

    def _fail(
        self,
        index: int,
        kind: ErrorKind,
        message: str,
        error: StepError | None,
        duration: float = 0.0,
    ) -> None:
        spec = self.steps[index].spec
        if error is None:
            error = StepError(kind=kind, message=message)
        self._settle(index, StepOutcome.failed(spec.task_id, spec.agent, message, error), duration)

    def _retry(self, index: int, error: StepError) -> bool:
        policy = self.options.retry
        attempt = self.steps[index].attempts
        if policy is None or error.kind not in policy.on or attempt >= policy.attempts:
            return False
        if self.emit is not None:
            spec = self.steps[index].spec
            self.emit(StepRerun(index, spec.task_id, attempt + 1, error.message))
        delay = policy.delay_before(attempt + 1)
        if delay > 0:
            heapq.heappush(self.delayed, (time.monotonic() + delay, index))
        else:
            self.todo.append(index)
        return True

    def _record(self, index: int, outcome: StepOutcome, duration: float | None = None) -> None:
        """The step's final outcome: keep it, announce it, and forget the step.

        With ``duration``, a step that started gets its ``StepFinished``.
        """
        step = self.steps.pop(index)
        if outcome.error is not None and outcome.error.attempts != step.attempts:
            error = msgspec.structs.replace(outcome.error, attempts=step.attempts)
            outcome = msgspec.structs.replace(outcome, error=error)
        if self.outcomes is not None:
            self.outcomes[index] = outcome
        self.remaining -= 1
        if self.emit is not None and duration is not None and step.attempts:
            self.emit(
                StepFinished(index, step.spec.task_id, step.attempts, outcome.success, duration)
            )
        if self.on_outcome is not None:
            self.on_outcome(index, outcome)

    def _internal_message(self, index: int, exc: BaseException | None = None) -> str:
        detail = "its worker finished without reporting an outcome"
        if exc is not None:
            detail = f"{type(exc).__name__}: {exc}"
        return (
            f"{_describe(self.steps[index].spec)} was lost by procorch: {detail}. "
            "This is a bug in procorch; please report it."
        )

    # -- the end ------------------------------------------------------------------

    def _close(self) -> None:
        """Give healthy lanes back; kill lanes whose work is unfinished."""
        healthy = []
        for work in self.works:
            if not work.assigned and _returned_cleanly(work.futures):
                healthy.append(work.lane)
            else:
                work.lane.close(kill=True)
        _engine.release(healthy)
        self.works = []
        self._wake.close()


def _returned_cleanly(futures: list[Future[None]]) -> bool:
    """True when every chunk call returns without error (each has sent its last frame)."""
    done, pending = concurrent.futures.wait(futures, timeout=_LAST_RETURN_SECONDS)
    return not pending and all(future.exception() is None for future in done)


def _raise_keyboard_interrupt_on_sigterm() -> Any:
    """During a call in the main thread, make SIGTERM unwind like Ctrl-C.

    Returns the handler to restore, or None when the caller has a SIGTERM
    handler of its own (which is left alone) or this is not the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    return signal.signal(signal.SIGTERM, interrupt)
