"""The step lifecycle: one owner for every step's states, whatever backend runs it.

A step moves through these states, and only the lifecycle moves it::

    queued --take--> sent --started--> running --finished--> (outcome)
      ^  ^             |                  |  \\--crashed / failed / timed out
      |  +--gave back--+                  |           |
      |    (never began: no attempt       |     retry policy?
      |     charged)                      |      yes: waiting (backoff) --> queued
      +-----------------------------------+      no:  (outcome)

The backend (``_backend``) moves work and reports facts, each naming the step
and attempt it concerns; the lifecycle decides what they mean: retries with
backoff, time limits (counted from the instant the worker started the step,
on this process's clock, and judged only after every report that had arrived
was read), the call's deadline, cancellation, SIGTERM unwinding, the failure
sentences (``_messages``), and the events. For every step that started, the
events are::

    StepStarted -> StepProgress* -> [StepCrashed] -> StepFinished
                                                 \\-> StepRerun -> StepStarted ...

ending in exactly one ``StepFinished`` whatever the path (a step stopped
while waiting for a retry included); a step that never started has no
events, and its outcome says why. Events and outcome hooks are queued while
reports are read and handed to the caller at the end of each turn, so a slow
or raising consumer delays delivery but never changes an outcome.
"""

from __future__ import annotations

import collections
import heapq
import select
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

import msgspec

from . import _messages
from ._backend import StepBackend, StopFacts
from ._events import Event, StepCrashed, StepFinished, StepProgress, StepRerun, StepStarted
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome
from ._options import CallOptions
from ._usage import StepUsage, partial_usage
from ._wake import WakePipe

__all__ = ["StepLifecycle", "StepRecord"]

# A step whose workers die (or freeze) before it begins costs nothing; past
# this many such deaths in a row the step fails, since something kills every
# worker it is sent to.
MAX_UNSTARTED_DEATHS = 3

QUEUED, SENT, RUNNING, WAITING = "queued", "sent", "running", "waiting"

# What a backend that reports no usage leaves unknown of a finished attempt.
_WORKER_MEASURED = partial_usage(0.0).missing

_encode_spec = msgspec.msgpack.Encoder().encode

_poll = getattr(select, "poll", None)
_POLLIN = getattr(select, "POLLIN", 1)


class StepRecord(msgspec.Struct, gc=False):
    """What the lifecycle knows of one unfinished step; dropped when it ends.

    Never tracked by the garbage collector (it holds no cycles: a spec, its
    bytes, numbers and words): a call of 20,000 quick steps makes 20,000 of
    them, which would otherwise feed the collections the call pays for.
    """

    spec: AgentStepSpec
    data: bytes | None  # its wire bytes (None: large, encoded again when sent)
    limit: float | None  # seconds, or None
    position: int  # the caller's position for it (its events' index)
    state: str = QUEUED
    attempts: int = 0  # times it was started (the events' attempt numbers)
    uncharged: int = 0  # of those, attempts a backend cut short without a verdict
    started_at: float | None = None  # when the running attempt started (our clock)
    pid: int | None = None
    soft_stopped: bool = False  # StepTimeout was raised in the running attempt
    unstarted_deaths: int = 0  # workers that died or froze before it could start


class StepLifecycle:
    """One call's steps, from ``add`` to their outcomes, on one backend."""

    def __init__(
        self,
        backend: StepBackend,
        emit: Callable[[Event], Any] | None,
        options: CallOptions,
        on_outcome: Callable[[int, StepOutcome], None] | None = None,
        keep_outcomes: bool = True,
    ) -> None:
        self.backend = backend
        self.emit = emit
        self.options = options
        self.on_outcome = on_outcome
        # Unfinished steps by index. A finished step leaves nothing behind but,
        # with keep_outcomes, its outcome: a stream of a million steps runs in
        # constant memory.
        self.steps: dict[int, StepRecord] = {}
        self.outcomes: dict[int, StepOutcome] | None = {} if keep_outcomes else None
        self.next_index = 0
        self.remaining = 0
        self.stopping = False  # cancelled or out of time: no new steps
        self._stopped_because: str | None = None
        self._queue: collections.deque[int] = collections.deque()
        self._delayed: list[tuple[float, int]] = []  # (ready at, index): retries in backoff
        # Running steps that have a time limit (the only ones a clock watches).
        self._running: dict[int, StepRecord] = {}
        self._outbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._positions: dict[int, int] = {}  # index -> position, where they differ
        self.deadline: float | None = None
        self.slots: int | None = None  # steps at once, for the events (set by open)
        self._wake = WakePipe()
        # The file descriptors the last wait saw ready, when only handles woke
        # it (None: a wake-up, a timer, or no wait at all, so a backend reads
        # every handle, watched or not): a backend may read only these.
        self.ready: set[int] | None = None
        self._previous_sigterm: Any = None
        self._opened = False

    # -- the entry points' side ---------------------------------------------------

    def add(self, spec: AgentStepSpec, data: bytes | None, position: int | None = None) -> int:
        """Queue a checked spec (and its wire bytes, or None to encode it when sent); its index.

        ``position`` is where the step sits in the caller's input, the
        ``index`` of its events (by default, its index: the order of ``add``).
        Indices stay unique; positions need not be (a pipeline item's stages).
        """
        index = self.next_index
        self.next_index += 1
        if position is None:
            position = index
        elif position != index:
            self._positions[index] = position
        limit = self.options.step_timeouts.get(spec.task_id, self.options.step_timeout)
        self.steps[index] = StepRecord(spec, data, limit, position)
        self.remaining += 1
        self._queue.append(index)
        return index

    def run(self, slots: int) -> None:
        """Run until every added step (including those added meanwhile) has an outcome."""
        self.open(slots)
        try:
            while self.remaining:
                self.turn()
        finally:
            self.close()

    def open(self, slots: int) -> None:
        """Arm the guards and open the backend; ``turn`` until done, then ``close``."""
        if self.options.call_timeout is not None:
            self.deadline = time.monotonic() + self.options.call_timeout
        self._opened = True
        self.slots = slots
        if self.options.cancel is not None:
            self.options.cancel._listen(self.wake)
        self._previous_sigterm = _raise_keyboard_interrupt_on_sigterm()
        try:
            self.backend.open(self, slots)
        except BaseException:  # e.g. an unreachable cluster: disarm, then say so
            self.close()
            raise

    def turn(self) -> None:
        """Start what can start, wait for news or a timer, read it all, judge, deliver."""
        if not self.stopping and self._stop_reason(time.monotonic()) is None:
            self._release_delayed(time.monotonic())
            self.backend.start_ready()
        self._wait()
        now = time.monotonic()  # before reading: a verdict never rests on unread news
        self.backend.poll()
        self._judge(now)
        self._deliver()

    def close(self) -> None:
        """Close the backend (killing whatever still runs) and disarm the guards."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self.options.cancel is not None:
            self.options.cancel._forget(self.wake)
        try:
            if self._opened:
                self.backend.close()
        finally:
            self._wake.close()

    def abandon(self) -> None:
        """The caller stops listening (a stream closed early): end every step now, in words.

        Running steps are stopped and, like the rest, recorded as ``cancelled``;
        each that started gets its ``StepFinished``, delivered before this returns.
        """
        if self.remaining and not self.stopping:
            self._stop_everything("closed")
        self._deliver()

    def wake(self, *_: object) -> None:
        """Interrupt the current wait, from any thread (steps added, a cancel, a backend's news)."""
        self._wake.poke()

    # -- the backend's side: work to send ---------------------------------------------

    @property
    def queued(self) -> int:
        """How many steps wait to be sent."""
        return len(self._queue)

    def take(self, count: int) -> list[int]:
        """Up to ``count`` queued steps, now marked sent; none once the call is stopping."""
        if self.stopping:
            return []
        taken: list[int] = []
        queue = self._queue
        while queue and len(taken) < count:
            index = queue.popleft()
            self.steps[index].state = SENT
            taken.append(index)
        return taken

    def take_wire(self, count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
        """Up to ``count`` queued steps as (index, attempt, wire bytes), now marked sent,
        stopping once they hold ``max_bytes`` (at least one step); none once stopping."""
        chunk: list[tuple[int, int, bytes]] = []
        if self.stopping:
            return chunk
        queue = self._queue
        steps = self.steps
        size = 0
        while queue and len(chunk) < count and size < max_bytes:
            index = queue.popleft()
            record = steps[index]
            record.state = SENT
            data = record.data
            if data is None:
                data = _encode_spec(record.spec)
            size += len(data)
            chunk.append((index, record.attempts + 1, data))
        return chunk

    def data(self, index: int) -> bytes:
        """The step's wire bytes: kept for a small spec, encoded anew for a large one."""
        record = self.steps[index]
        data = record.data
        return _encode_spec(record.spec) if data is None else data

    def spec(self, index: int) -> AgentStepSpec:
        return self.steps[index].spec

    def attempt(self, index: int) -> int:
        """The attempt number a sent step runs as (its running attempt once started)."""
        record = self.steps[index]
        return record.attempts if record.state == RUNNING else record.attempts + 1

    # -- the backend's side: facts ------------------------------------------------------

    def _current(self, index: int, attempt: int, state: str) -> StepRecord | None:
        record = self.steps.get(index)
        if record is None or record.state != state:
            return None
        expected = record.attempts if state == RUNNING else record.attempts + 1
        return record if attempt == expected else None

    def started(self, index: int, attempt: int, pid: int, at: float) -> bool:
        """A worker began the step at ``at``, on this process's ``time.monotonic()`` clock.

        Local workers share that clock; a backend whose workers' clocks differ
        (Dask) converts its evidence to it, erring late: a time limit then
        counts a little generously, never early.
        """
        record = self.steps.get(index)  # _current, inlined: this is the hot path
        if record is None or record.state is not SENT or attempt != record.attempts + 1:
            return False
        record.state = RUNNING
        record.attempts = attempt
        record.started_at = at
        record.pid = pid
        record.soft_stopped = False
        record.unstarted_deaths = 0
        if record.limit is not None:
            self._running[index] = record
        if self.emit is not None:
            spec = record.spec
            started = StepStarted(
                record.position, spec.task_id, attempt, spec.agent, pid, at, self.slots
            )
            self._post(self.emit, started)
        return True

    def progress(self, index: int, attempt: int, data: Any) -> bool:
        record = self._current(index, attempt, RUNNING)
        if record is None:
            return False
        if self.emit is not None:
            self._post(self.emit, StepProgress(record.position, record.spec.task_id, attempt, data))
        return True

    def finished(
        self,
        index: int,
        attempt: int,
        outcome: StepOutcome,
        duration: float,
        usage: StepUsage | None = None,
    ) -> bool:
        """The step's attempt ended with ``outcome`` after ``duration`` s (the worker's measure).

        ``usage`` is what the attempt cost, as the worker measured it.
        """
        record = self.steps.get(index)  # _current, inlined: this is the hot path
        if record is None or record.state is not RUNNING or attempt != record.attempts:
            return False
        if record.soft_stopped:  # whatever the step made of StepTimeout, it ran out of time
            assert record.limit is not None
            grace = duration - record.limit
            message = _messages.soft_timed_out(record.spec, record.limit, grace, outcome)
            error = StepError(kind="timeout", message=message, pid=record.pid, limit=record.limit)
            outcome = self._failed_outcome(record.spec, error)
        if usage is None and self.emit is not None:
            usage = StepUsage(wall=duration, missing=_WORKER_MEASURED)
        if outcome.error is None:
            self._record(index, outcome, duration, usage)
        else:
            self._settle(index, outcome, duration, usage)
        return True

    def crashed(
        self,
        index: int,
        attempt: int,
        *,
        pid: int | None,
        exit_code: int | None,
        dump: str = "",
        printed: str | None = None,
        message: str | None = None,
    ) -> bool:
        """The worker died while running the step: the step is the culprit."""
        record = self._current(index, attempt, RUNNING)
        if record is None:
            return False
        spec = record.spec
        name = _messages.signal_name(exit_code)
        if self.emit is not None:
            self._post(
                self.emit,
                StepCrashed(record.position, spec.task_id, attempt, pid, exit_code, name),
            )
        error = StepError(
            kind="crash",
            message=message or _messages.crash(spec, pid, exit_code),
            traceback=dump or None,
            exit_code=exit_code,
            signal=name,
            pid=pid,
            printed=None if printed is None else printed + dump,
        )
        self._fail(index, error, self._ran_for(record))
        return True

    def failed(self, index: int, attempt: int, error: StepError) -> bool:
        """The running step failed by a backend's verdict (memory cap, protocol fault)."""
        record = self._current(index, attempt, RUNNING)
        if record is None:
            return False
        self._fail(index, error, self._ran_for(record))
        return True

    def interrupted(self, index: int, attempt: int, reason: str, *, resent: bool = False) -> bool:
        """The running attempt ended without a verdict; the step will run again.

        For a backend whose evidence about a lost attempt is not conclusive
        (Dask blames every task a dying worker held): the events say
        ``StepRerun`` as for any re-run, but the attempt is not charged to the
        retry policy nor counted in ``error.attempts``. The step goes back to
        the front of the queue; with ``resent``, the backend already runs it
        again by itself (Dask's scheduler re-runs a task whose worker died),
        so it stays sent and its next ``started`` is the next attempt.
        """
        record = self._current(index, attempt, RUNNING)
        if record is None:
            return False
        usage = partial_usage(self._ran_for(record))
        self._running.pop(index, None)
        record.started_at = None
        record.uncharged += 1
        if self.emit is not None:
            rerun = StepRerun(
                record.position, record.spec.task_id, attempt + 1, reason, None, usage
            )
            self._post(self.emit, rerun)
        if resent:
            record.state = SENT
        else:
            record.state = QUEUED
            self._queue.appendleft(index)
        return True

    def gave_back(
        self,
        indices: list[int],
        *,
        death: tuple[int | None, int | None, str] | None = None,
    ) -> None:
        """Sent steps that never began go back to the front of the queue, uncharged.

        ``death`` (pid, exit code, what it said) means the worker died or froze
        before the first of them began: that step counts it, and fails once
        too many workers in a row went that way.
        """
        back = [
            index for index in indices if index in self.steps and self.steps[index].state == SENT
        ]
        if death is not None and back:
            first = self.steps[back[0]]
            first.unstarted_deaths += 1
            if first.unstarted_deaths > MAX_UNSTARTED_DEATHS:
                index = back.pop(0)
                pid, code, said = death
                message = _messages.could_not_start(
                    first.spec, first.unstarted_deaths, pid, code, said
                )
                error = StepError(
                    kind="crash",
                    message=message,
                    exit_code=code,
                    signal=_messages.signal_name(code),
                    pid=pid,
                )
                first.state = QUEUED
                self._record(index, self._failed_outcome(first.spec, error), 0.0)
        for index in back:
            self.steps[index].state = QUEUED
        self._queue.extendleft(reversed(back))

    # -- verdicts ----------------------------------------------------------------------

    def _stop_reason(self, now: float) -> str | None:
        cancel = self.options.cancel
        if cancel is not None and cancel.cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "deadline"
        return None

    def _judge(self, now: float) -> None:
        why = self._stopped_because if self.stopping else self._stop_reason(now)
        if why is None:
            self._check_time_limits(now)
        elif not self.stopping or self.steps:  # steps added after the stop end the same way
            self._stop_everything(why)

    def _check_time_limits(self, now: float) -> None:
        late = [
            index
            for index, record in self._running.items()
            if record.limit is not None
            and record.started_at is not None
            and now >= record.started_at + record.limit
        ]
        grace = self.options.timeout_grace
        for index in late:
            record = self.steps[index]
            assert record.limit is not None and record.started_at is not None
            if grace is not None and not record.soft_stopped:
                record.soft_stopped = self.backend.interrupt(index)
                if record.soft_stopped:
                    continue  # the hard limit is `grace` seconds later
            elif grace is not None and now < record.started_at + record.limit + grace:
                continue
            facts = self.backend.stop(index)
            if record.soft_stopped:
                assert grace is not None
                message = _messages.grace_ran_out(record.spec, record.limit, grace, facts.stopped)
            else:
                message = _messages.timed_out(record.spec, record.limit, facts.stopped)
            error = StepError(
                kind="timeout",
                message=message,
                pid=facts.pid if facts.pid is not None else record.pid,
                limit=record.limit,
                printed=facts.printed,
            )
            self._fail(index, error, self._ran_for(record))

    def _stop_everything(self, why: str) -> None:
        """End the call now: running steps are stopped, the rest never start."""
        self.stopping = True
        self._stopped_because = why
        facts = self.backend.stop_all()
        call_timeout = self.options.call_timeout
        deadline = why == "deadline"
        before = {
            "deadline": "the call's time limit ran out",
            "cancelled": "the call was cancelled",
            "closed": "the stream it belonged to was closed",
        }[why]
        for index in sorted(self.steps):
            record = self.steps[index]
            spec = record.spec
            if record.state == RUNNING:
                stopped = facts.get(index, StopFacts(pid=record.pid))
                if deadline:
                    assert call_timeout is not None
                    kind: ErrorKind = "timeout"
                    message = _messages.call_timed_out(spec, call_timeout, stopped.stopped)
                else:
                    kind = "cancelled"
                    message = _messages.cancelled_while_running(spec, stopped.stopped, before)
                error = StepError(
                    kind=kind,
                    message=message,
                    pid=stopped.pid if stopped.pid is not None else record.pid,
                    limit=call_timeout if kind == "timeout" else None,
                    printed=stopped.printed,
                )
                ran_for = self._ran_for(record)
                outcome = self._failed_outcome(spec, error)
                self._record(index, outcome, ran_for, partial_usage(ran_for))
            else:
                message = _messages.cancelled_before_start(spec, before, record.attempts > 0)
                error = StepError(
                    kind="cancelled", message=message, limit=call_timeout if deadline else None
                )
                self._record(index, self._failed_outcome(spec, error), 0.0)
        self._queue.clear()
        self._delayed.clear()

    # -- outcomes --------------------------------------------------------------------------

    def _ran_for(self, record: StepRecord) -> float:
        if record.started_at is None:
            return 0.0
        return max(0.0, time.monotonic() - record.started_at)

    @staticmethod
    def _failed_outcome(spec: AgentStepSpec, error: StepError) -> StepOutcome:
        return StepOutcome.failed(spec.task_id, spec.agent, error.message, error)

    def _fail(self, index: int, error: StepError, duration: float) -> None:
        """The parent's verdict on a running attempt: it knows the wall time, and what it read."""
        outcome = self._failed_outcome(self.steps[index].spec, error)
        self._settle(index, outcome, duration, partial_usage(duration, error.memory))

    def _settle(
        self, index: int, outcome: StepOutcome, duration: float, usage: StepUsage | None
    ) -> None:
        """A finished attempt: retry it if the policy says so, else record it."""
        record = self.steps[index]
        error = outcome.error
        policy = self.options.retry
        if (
            error is not None
            and policy is not None
            and not self.stopping
            and error.kind in policy.on
            and record.attempts - record.uncharged < policy.attempts
        ):
            self._running.pop(index, None)
            record.started_at = None
            if self.emit is not None:
                spec = record.spec
                rerun = StepRerun(
                    record.position,
                    spec.task_id,
                    record.attempts + 1,
                    error.message,
                    error.kind,
                    usage,
                )
                self._post(self.emit, rerun)
            delay = policy.delay_before(record.attempts - record.uncharged + 1)
            if delay > 0:
                record.state = WAITING
                heapq.heappush(self._delayed, (time.monotonic() + delay, index))
            else:
                record.state = QUEUED
                self._queue.append(index)
            return
        self._record(index, outcome, duration, usage)

    def _record(
        self, index: int, outcome: StepOutcome, duration: float, usage: StepUsage | None = None
    ) -> None:
        """The step's final outcome: keep it, announce it, and forget the step."""
        record = self.steps.pop(index)
        if record.started_at is not None:
            if record.limit is not None:
                self._running.pop(index, None)
            record.started_at = None
        failure = outcome.error
        if failure is not None:
            charged = max(1, record.attempts - record.uncharged)
            if failure.attempts != charged:
                error = msgspec.structs.replace(failure, attempts=charged)
                outcome = msgspec.structs.replace(outcome, error=error)
        if self.outcomes is not None:
            self.outcomes[index] = outcome
        self.remaining -= 1
        if self.emit is not None and record.attempts:
            spec = record.spec
            failure = outcome.error
            kind = None if outcome.success else "unsuccessful" if failure is None else failure.kind
            reason = None if failure is None else failure.message
            finished = StepFinished(
                record.position,
                spec.task_id,
                record.attempts,
                outcome.success,
                duration,
                kind,
                reason,
                usage,
            )
            self._post(self.emit, finished)
        if self.on_outcome is not None:
            self._post(self.on_outcome, index, outcome)

    # -- the loop's plumbing ----------------------------------------------------------------

    def _post(self, function: Callable[..., Any], *args: Any) -> None:
        self._outbox.append((function, args))

    def _deliver(self) -> None:
        """Hand the queued events and outcomes to the caller, in order.

        A consumer that raises stops the call (the exception propagates), but
        the outcomes finished so far are not lost: the outcome hooks still
        queued run first (a resumable run journals them), and the exception
        carries the outcomes, by position, in ``outcomes`` (and says so in a note).
        """
        outbox = self._outbox
        while outbox:
            function, args = outbox.popleft()
            try:
                function(*args)
            except BaseException as exc:
                self._keep_outcomes_on(exc)
                raise

    def _keep_outcomes_on(self, exc: BaseException) -> None:
        outbox = self._outbox
        try:
            while outbox:
                function, args = outbox.popleft()
                if function is self.on_outcome:
                    function(*args)
        except Exception:  # a second raising consumer: the first exception is the story
            outbox.clear()
        if self.outcomes is None or hasattr(exc, "outcomes"):
            return
        positions = self._positions
        finished = {positions.get(index, index): o for index, o in sorted(self.outcomes.items())}
        try:
            exc.outcomes = finished  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__
            return
        exc.add_note(
            f"procorch: a consumer of the call's events or outcomes raised, so the call "
            f"stopped; this exception's .outcomes holds the {len(finished)} outcomes "
            f"finished so far, by position in the input"
        )

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            index = heapq.heappop(self._delayed)[1]
            record = self.steps.get(index)
            if record is not None and record.state == WAITING:
                record.state = QUEUED
                self._queue.append(index)

    def _wait(self) -> None:
        self.ready = None
        if self._outbox:
            return  # news to deliver first (e.g. outcomes recorded while stopping)
        wake_at = []
        if self.deadline is not None:
            wake_at.append(self.deadline)
        if self._delayed:
            wake_at.append(self._delayed[0][0])
        grace = self.options.timeout_grace or 0.0
        for record in self._running.values():
            if record.limit is not None and record.started_at is not None:
                hard = grace if record.soft_stopped else 0.0
                wake_at.append(record.started_at + record.limit + hard)
        backend_wakeup = self.backend.next_wakeup()
        if backend_wakeup is not None:
            wake_at.append(backend_wakeup)
        timeout = max(0.0, min(wake_at) - time.monotonic()) if wake_at else None
        wake_fd = self._wake.fileno()
        handles = self.backend.wait_handles()
        if _poll is None:  # no poll(2) here: the portable, slower wait
            if wake_fd in wait([*handles, wake_fd], timeout):
                self._wake.drain()
            return
        # One poll object per turn, fds registered in C: a turn of quick steps
        # (one per frame at 1 ms steps) spent a third of its time building
        # multiprocessing.connection.wait's selector.
        poller = _poll()
        poller.register(wake_fd, _POLLIN)
        for handle in handles:
            poller.register(handle, _POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
        if wake_fd in ready:
            self._wake.drain()
        elif ready:  # only handles: a wake-up or a timer reads every handle
            self.ready = ready


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
