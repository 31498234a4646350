"""The dispatcher: futures and frames back to input indices, then outcomes.

Data flow for one call (the calling thread does all of it)::

    specs[i] --submit--> lane (one loky worker) --frames--> lane.channel
                            |                                   |
                            +-- future done / broken --wake-->  +--> wait()
                                                                      |
       outcomes[i] <-- _Done frame, or the crash of lane's worker <---+
       events(...) <-- _Started / _Progress frames, crash and finish

- A lane runs at most one step at a time, so when its worker dies the step
  it was running is the culprit and no other step is touched.
- A step counts as started when its ``_Started`` frame arrives; a worker that
  dies before writing it never began the step, which then runs again on a
  fresh lane (``StepRerun``) without being charged an attempt.
- Events for a step are delivered in the order its worker wrote them, and its
  ``StepFinished`` only after its last frame, because all of them travel on
  one pipe.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import wait
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
from ._model import AgentStepSpec, StepError, StepOutcome
from ._pool import _engine, _Lane
from ._protocol import _decode_frame, _Done, _Progress, _Started

# A worker that dies before it starts a step (killed while idle, say) costs
# that step nothing; past this many such deaths in a row the step is failed,
# since something kills every worker it is sent to.
_MAX_UNSTARTED_DEATHS = 3

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


def _signal_name(exit_code: int | None) -> str | None:
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def _crash_message(spec: AgentStepSpec, pid: int | None, exit_code: int | None) -> str:
    who = f"step {spec.task_id!r} (agent {spec.agent!r}) crashed: its worker process (pid {pid})"
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


class _Running:
    """A step in flight on a lane."""

    __slots__ = ("ended", "future", "index", "pid", "started_at")

    def __init__(self, index: int, future: Future[None]) -> None:
        self.index = index
        self.future = future
        self.started_at: float | None = None  # set by its _Started frame
        self.pid: int | None = None
        self.ended = False  # the channel hit end-of-file: the worker is gone


class _Dispatch:
    """One call of execute_steps_parallel, from first submit to last outcome."""

    def __init__(
        self,
        specs: Sequence[AgentStepSpec],
        spec_bytes: Sequence[bytes],
        blob: bytes,
        token: int,
        emit: Callable[[Event], Any] | None,
    ) -> None:
        self.specs = specs
        self.spec_bytes = spec_bytes
        self.blob = blob
        self.token = token
        self.emit = emit
        self.outcomes: list[StepOutcome | None] = [None] * len(specs)
        self.attempts = [0] * len(specs)
        self.unstarted_deaths = [0] * len(specs)
        self.todo = collections.deque(range(len(specs)))
        self.idle: list[_Lane] = []
        self.running: dict[_Lane, _Running] = {}
        self._wake_reader, self._wake_writer = os.pipe()
        os.set_blocking(self._wake_writer, False)
        self._wake_lock = threading.Lock()  # no wake-up may hit a closed fd
        self._closed = False

    def run(self, lane_count: int) -> list[StepOutcome]:
        self.idle = _engine.acquire(lane_count)
        try:
            while self.todo or self.running:
                self._fill_idle_lanes()
                self._wait_and_service()
        finally:
            self._close()
        return [outcome for outcome in self.outcomes if outcome is not None]

    # -- starting steps ---------------------------------------------------

    def _fill_idle_lanes(self) -> None:
        while self.todo and self.idle:
            lane = self.idle.pop()
            index = self.todo.popleft()
            try:
                future = lane.submit(self.token, self.blob, self.spec_bytes[index])
            except (BrokenProcessPool, ShutdownExecutorError):
                # The worker died while idle: replace it, the step never began.
                lane.close(kill=True)
                self.idle.append(_Lane())
                self.todo.appendleft(index)
                continue
            future.add_done_callback(self._wake)
            self.running[lane] = _Running(index, future)

    def _wake(self, _future: Future[None]) -> None:
        # Runs in loky's manager thread, possibly after this call is over.
        with self._wake_lock:
            if not self._closed:
                try:
                    os.write(self._wake_writer, b"\0")
                except BlockingIOError:  # full: a wake-up is pending anyway
                    pass

    # -- hearing from lanes -------------------------------------------------

    def _wait_and_service(self) -> None:
        listening = [lane.channel for lane, run in self.running.items() if not run.ended]
        ready = wait([*listening, self._wake_reader])
        if self._wake_reader in ready:
            os.read(self._wake_reader, 4096)
        for lane, run in list(self.running.items()):
            self._service(lane, run)

    def _service(self, lane: _Lane, run: _Running) -> None:
        # Look at the future before draining: a worker writes its last frame
        # before its call returns, so once the future is done every frame of
        # the step is already in the pipe. Looking after draining would race.
        future_done = run.future.done()
        while not run.ended and lane.channel.poll(0):
            try:
                frame = _decode_frame(lane.channel.recv_bytes())
            except (EOFError, OSError):
                run.ended = True
                break
            except msgspec.DecodeError:  # a frame cut short by the worker's death
                run.ended = True
                break
            if self._on_frame(lane, run, frame):
                return
        if future_done or run.ended:
            self._on_lost_worker(lane, run)

    def _on_frame(self, lane: _Lane, run: _Running, frame: Any) -> bool:
        """Handle one frame; True when the step is over and the lane is free."""
        index = run.index
        spec = self.specs[index]
        if isinstance(frame, _Started):
            self.attempts[index] += 1
            run.started_at = time.monotonic()
            run.pid = frame.pid
            if self.emit is not None:
                self.emit(
                    StepStarted(index, spec.task_id, self.attempts[index], spec.agent, frame.pid)
                )
        elif isinstance(frame, _Progress):
            if self.emit is not None:
                self.emit(StepProgress(index, spec.task_id, self.attempts[index], frame.data))
        elif isinstance(frame, _Done):
            self._finish(index, frame.outcome, frame.duration)
            del self.running[lane]
            self.idle.append(lane)
            return True
        return False

    def _finish(self, index: int, outcome: StepOutcome, duration: float) -> None:
        attempt = self.attempts[index]
        if outcome.error is not None and outcome.error.attempts != attempt:
            error = msgspec.structs.replace(outcome.error, attempts=attempt)
            outcome = msgspec.structs.replace(outcome, error=error)
        self.outcomes[index] = outcome
        if self.emit is not None:
            spec = self.specs[index]
            self.emit(StepFinished(index, spec.task_id, attempt, outcome.success, duration))

    def _on_lost_worker(self, lane: _Lane, run: _Running) -> None:
        """The lane's worker died or its future failed before the step's outcome came."""
        if not run.future.done():
            return  # end-of-file came first; loky's verdict is on its way
        del self.running[lane]
        index = run.index
        exc = run.future.exception()
        if exc is None:  # the step returned without writing its outcome
            lane.close(kill=True)
            self.idle.append(_Lane())
            self._fail_internal(index, "its worker finished without reporting an outcome")
            return
        exit_code = lane.exit_code()
        pid = lane.pid
        dump = lane.crash_dump()
        lane.close(kill=True)
        self.idle.append(_Lane())
        if not isinstance(exc, BrokenProcessPool):
            self._fail_internal(index, f"{type(exc).__name__}: {exc}")
        elif run.started_at is None:
            self._rerun_unstarted(index, pid, exit_code)
        else:
            self._fail_crashed(index, run, pid, exit_code, dump)

    def _rerun_unstarted(self, index: int, pid: int | None, exit_code: int | None) -> None:
        spec = self.specs[index]
        self.unstarted_deaths[index] += 1
        if self.unstarted_deaths[index] > _MAX_UNSTARTED_DEATHS:
            message = (
                f"step {spec.task_id!r} (agent {spec.agent!r}) could not start: "
                f"{self.unstarted_deaths[index]} worker processes in a row died before "
                f"it began (the last, pid {pid}, with exit code {exit_code})."
            )
            error = StepError(
                kind="crash",
                message=message,
                exit_code=exit_code,
                signal=_signal_name(exit_code),
                pid=pid,
                attempts=self.attempts[index],
            )
            self.outcomes[index] = StepOutcome.failed(spec.task_id, spec.agent, message, error)
            return
        if self.emit is not None:
            reason = f"its worker process (pid {pid}) died before the step began"
            self.emit(StepRerun(index, spec.task_id, self.attempts[index] + 1, reason))
        self.todo.appendleft(index)

    def _fail_crashed(
        self, index: int, run: _Running, pid: int | None, exit_code: int | None, dump: str
    ) -> None:
        spec = self.specs[index]
        attempt = self.attempts[index]
        pid = run.pid if run.pid is not None else pid
        message = _crash_message(spec, pid, exit_code)
        error = StepError(
            kind="crash",
            message=message,
            traceback=dump or None,
            exit_code=exit_code,
            signal=_signal_name(exit_code),
            pid=pid,
            attempts=attempt,
        )
        self.outcomes[index] = StepOutcome.failed(spec.task_id, spec.agent, message, error)
        if self.emit is not None:
            self.emit(
                StepCrashed(index, spec.task_id, attempt, pid, exit_code, _signal_name(exit_code))
            )
            assert run.started_at is not None
            duration = time.monotonic() - run.started_at
            self.emit(StepFinished(index, spec.task_id, attempt, False, duration))

    def _fail_internal(self, index: int, detail: str) -> None:
        spec = self.specs[index]
        message = (
            f"step {spec.task_id!r} (agent {spec.agent!r}) was lost by procorch: {detail}. "
            "This is a bug in procorch; please report it."
        )
        error = StepError(kind="internal", message=message, attempts=self.attempts[index])
        self.outcomes[index] = StepOutcome.failed(spec.task_id, spec.agent, message, error)
        if self.emit is not None and self.attempts[index]:
            self.emit(StepFinished(index, spec.task_id, self.attempts[index], False, 0.0))

    # -- the end ------------------------------------------------------------

    def _close(self) -> None:
        """Give healthy idle lanes back; kill lanes whose step is unfinished."""
        with self._wake_lock:
            self._closed = True
        for lane in self.running:
            lane.close(kill=True)
        self.running.clear()
        _engine.release(self.idle)
        self.idle = []
        os.close(self._wake_reader)
        os.close(self._wake_writer)
