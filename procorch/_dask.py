"""The Dask backend: the same steps on a ``distributed`` cluster.

``DaskBackend(client_or_address)`` passed as ``backend=`` to any entry point
replaces the local lanes with a cluster, keeping the contract: one outcome
per spec in input order, at most the concurrency hint in flight (cluster-wide),
events to the caller, failures as labelled outcomes.

Data flow::

    add(spec) -> client.submit(_run_on_worker, token, <executor: one task, fetched once>,
                               spec bytes, index, topic)      at most `hint` in flight
    worker:  log_event(topic, started / progress)  --> client.subscribe_topic --+
             returns (done frame, its progress frames) --> future done ---------+
                                                                                |
    parent (the calling thread): wake pipe  <------------------------------------+
        live events are delivered while the step runs; at its end, whatever of
        its progress did not arrive live is delivered from the result, then
        StepFinished; a late live event of a finished step is dropped.

Crash attribution: a worker that dies makes the scheduler suspect every task
it held, running or merely queued there, and after
``distributed.scheduler.allowed-failures`` + 1 deaths such a task fails with
``KilledWorker``. That count alone blames innocents: a step queued twice on
the worker a crashing step keeps killing is failed with it (seen in the
tests). So procorch weighs the evidence itself: every step announces its
start (with its worker's address) before running; a step that Dask gave up on
and that was seen to start, and not finish, is submitted again under a new
key and labelled crashed if Dask gives up on that submission too; one never
seen to start (or seen to finish) is submitted again, up to three times. With one
thread per worker (recommended) a started, unfinished step on a dead worker
can only be the one that killed it. A step past its time limit, or a
cancelled call, has its future cancelled and its worker restarted, since a
running Python task cannot be interrupted.

The cost of that caution: a step that kills its worker is failed only after
Dask gave up on it twice, that is 2 x (allowed-failures + 1) worker deaths
(8 with Dask's default of 3; set it to 0 on a cluster used for untrusted
steps to make it 2).
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from ._events import (
    Event,
    StepCrashed,
    StepFinished,
    StepProgress,
    StepRerun,
    StepStarted,
)
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome, _describe
from ._protocol import Done, Progress, decode_frame, encode, progress_frame
from ._wake import WakePipe

__all__ = ["DaskBackend"]


# A step that Dask failed (KilledWorker) without it ever being seen to start
# is run again, this many times at most, before it is failed itself.
_MAX_REQUEUES = 3


class DaskBackend:
    """Run steps on a Dask ``distributed`` cluster instead of local processes.

    Give it a ``distributed.Client``, or the scheduler's address (a client is
    then made and closed with each call). Workers with one thread each give
    the cleanest crash attribution (see the module notes).
    """

    def __init__(self, client_or_address: Any) -> None:
        try:
            import distributed
        except ImportError as exc:  # pragma: no cover - the extra is not installed
            raise ImportError(
                "the Dask backend needs the dask extra: pip install 'procorch[dask]'"
            ) from exc
        if isinstance(client_or_address, str):
            self.address: str | None = client_or_address
            self.client: Any = None
        elif isinstance(client_or_address, distributed.Client):
            self.address = None
            self.client = client_or_address
        else:
            raise TypeError(
                "DaskBackend takes a distributed.Client or a scheduler address "
                f"(got {type(client_or_address).__name__})"
            )

    supported_guards = frozenset(
        {"step_timeout", "step_timeouts", "call_timeout", "retry", "cancel"}
    )
    name = "the Dask backend"

    def __repr__(self) -> str:
        return f"DaskBackend({self.address or self.client!r})"

    def step_backend(self, blob: bytes, token: str, options: Any) -> Any:
        raise NotImplementedError("the Dask backend still runs its own dispatch")

    def _legacy_dispatch(
        self,
        blob: bytes,
        emit: Callable[[Event], Any] | None,
        options: Any,
        on_outcome: Callable[[int, StepOutcome], None] | None,
        keep_outcomes: bool,
    ) -> _DaskDispatch:
        return _DaskDispatch(self, blob, emit, options, on_outcome, keep_outcomes)


# -- in the worker ---------------------------------------------------------------


def _executor_bytes(blob: bytes) -> bytes:
    """The pickled executor, as a task: every worker fetches it once, and a lost copy is redone."""
    return blob


class _DaskSink:
    """The event sink on a Dask worker: live through log_event, and kept for the result."""

    def __init__(self, topic: str, index: int) -> None:
        from distributed import get_worker

        self._worker = get_worker()
        self._topic = topic
        self._index = index
        self._lock = threading.Lock()
        self.frames: list[bytes] = []
        self._open = True

    def emit(self, data: Any) -> None:
        frame = progress_frame(self._index, 0, data)
        with self._lock:
            if not self._open:
                return
            self.frames.append(frame)
            seq = len(self.frames)
        self._worker.log_event(self._topic, {"i": self._index, "s": seq, "f": frame})

    def close(self) -> None:
        with self._lock:
            self._open = False


def _run_on_worker(
    token: str, blob: bytes, spec_bytes: bytes, index: int, topic: str
) -> tuple[bytes, list[bytes]]:
    """One step on a Dask worker: the done frame, and every progress frame it emitted."""
    from distributed import Queue, get_worker

    from ._worker import _decode_spec, run_step

    worker = get_worker()
    # The start is told synchronously (the scheduler holds it before the step
    # runs): log_event is batched, and a step that crashes at once would take
    # its own start marker down with it, unsent.
    starts = Queue(f"{topic}-starts")  # type: ignore[no-untyped-call]
    starts.put({"i": index, "start": os.getpid(), "w": worker.address})  # type: ignore[no-untyped-call]
    spec = _decode_spec(spec_bytes)
    sink = _DaskSink(topic, index)
    outcome, duration = run_step(spec, token, blob, sink)
    sink.close()
    return encode(Done(index, 0, outcome, duration)), sink.frames


# -- in the caller ------------------------------------------------------------------


class _DaskStep:
    __slots__ = (
        "address",
        "attempts",
        "blames",
        "data",
        "delivered",
        "finished_once",
        "future",
        "limit",
        "requeues",
        "spec",
        "started",
        "submissions",
    )

    def __init__(self, spec: AgentStepSpec, data: bytes, limit: float | None) -> None:
        self.spec = spec
        self.data = data
        self.limit = limit
        self.attempts = 0
        self.future: Any = None
        self.started: float | None = None  # when its worker said it began
        self.address: str | None = None  # the worker running it
        self.delivered = 0  # progress events handed to the caller so far
        self.finished_once = False  # a task of it completed (its result may be lost since)
        self.requeues = 0  # times Dask gave up on it without evidence against it
        self.blames = 0  # times Dask gave up on it after it was seen running
        self.submissions = 0  # tasks made for it (each needs a fresh key)


class _DaskDispatch:
    """The dispatcher's interface (add, open/turn/close, run), on a Dask cluster."""

    def __init__(
        self,
        backend: DaskBackend,
        blob: bytes,
        emit: Callable[[Event], Any] | None,
        options: Any,
        on_outcome: Callable[[int, StepOutcome], None] | None = None,
        keep_outcomes: bool = True,
    ) -> None:
        self.backend = backend
        self.blob = blob
        self.token = uuid.uuid4().hex
        self.emit = emit
        self.options = options
        self.on_outcome = on_outcome
        self.steps: dict[int, _DaskStep] = {}
        self.outcomes: dict[int, StepOutcome] | None = {} if keep_outcomes else None
        self.todo: collections.deque[int] = collections.deque()
        self.running: dict[int, _DaskStep] = {}
        self.next_index = 0
        self.remaining = 0
        self.stopping = False
        self.limit = 1
        self.deadline: float | None = None
        self.topic = f"procorch-{uuid.uuid4().hex}"
        self._news: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._client: Any = None
        self._owns_client = False
        self._closed = False  # tells the start listener to stop
        self._executor_future: Any = None

    # -- the interface the entry points use ---------------------------------------

    def add(self, spec: AgentStepSpec, data: bytes) -> int:
        index = self.next_index
        self.next_index += 1
        limit = self.options.step_timeouts.get(spec.task_id, self.options.step_timeout)
        self.steps[index] = _DaskStep(spec, data, limit)
        self.todo.append(index)
        self.remaining += 1
        return index

    def run(self, lane_count: int) -> None:
        try:
            self.open(lane_count)
            while self.remaining:
                self.turn()
        finally:
            self.close()

    def wake(self) -> None:
        self._wake_up()

    def open(self, lane_count: int) -> None:
        import distributed

        self.limit = lane_count
        if self.options.call_timeout is not None:
            self.deadline = time.monotonic() + self.options.call_timeout
        if self.backend.client is not None:
            self._client = self.backend.client
        else:
            try:
                self._client = distributed.Client(  # type: ignore[no-untyped-call]
                    self.backend.address, set_as_default=False, timeout="10s"
                )
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(
                    f"cannot reach the Dask scheduler at {self.backend.address}: {exc}"
                ) from None
            self._owns_client = True
        # A task, not scattered data: a worker's death can lose scattered data
        # for good, while a task's result is computed again from the graph.
        self._executor_future = self._client.submit(
            _executor_bytes, self.blob, pure=False, key=f"procorch-executor-{self.topic}"
        )
        self._client.subscribe_topic(self.topic, self._on_topic)
        self._starts = distributed.Queue(  # type: ignore[no-untyped-call]
            f"{self.topic}-starts", client=self._client
        )
        self._listener = threading.Thread(
            target=self._listen_for_starts, name="procorch-dask-starts", daemon=True
        )
        self._listener.start()
        if self.options.cancel is not None:
            self.options.cancel._listen(self._wake_up)

    def turn(self) -> None:
        now = time.monotonic()
        cancel = self.options.cancel
        if cancel is not None and cancel.cancelled:
            self._stop_everything("cancelled")
            return
        if self.deadline is not None and now >= self.deadline:
            self._stop_everything("deadline")
            return
        self._submit()
        self._wait(now)
        self._drain_news()
        self._check_time_limits()

    def close(self) -> None:
        self._closed = True
        if self.options.cancel is not None:
            self.options.cancel._forget(self._wake_up)
        client = self._client
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.join(timeout=5)
        if client is not None:
            for step in self.running.values():
                client.cancel(step.future, force=True)
            try:
                client.unsubscribe_topic(self.topic)
            except Exception:
                pass
            if self._owns_client:
                client.close()
        self._wake.close()

    # -- submitting and hearing back ------------------------------------------------

    def _submit(self) -> None:
        from ._dask import _run_on_worker

        while self.todo and len(self.running) < self.limit:
            index = self.todo.popleft()
            step = self.steps[index]
            step.future = self._client.submit(
                _run_on_worker,
                self.token,
                self._executor_future,
                step.data,
                index,
                self.topic,
                pure=False,
                key=f"procorch-step-{self.topic}-{index}-{step.submissions}",
            )
            step.submissions += 1
            step.future.add_done_callback(
                lambda future, index=index, step=step: self._on_task_done(future, index, step)
            )
            self.running[index] = step

    def _on_task_done(self, future: Any, index: int, step: _DaskStep) -> None:
        # The client's thread. A task that completed did not kill its worker,
        # whatever happens to its result later (a worker's death can lose it).
        if future.status == "finished":
            step.finished_once = True
        self._tell("done", index)

    def _listen_for_starts(self) -> None:
        """Relay start markers from the cluster's queue to the dispatcher, until closed."""
        while not self._closed:
            try:
                message = self._starts.get(timeout=0.2)  # type: ignore[no-untyped-call]
            except Exception:  # a timeout, or the queue closing under us
                continue
            self._tell("topic", message)

    def _on_topic(self, event: Any) -> None:  # the client's thread
        self._tell("topic", event[1] if isinstance(event, tuple) else event)

    def _tell(self, kind: str, payload: Any) -> None:
        self._news.put((kind, payload))
        self._wake_up()

    def _wake_up(self, *_: object) -> None:
        self._wake.poke()

    def _wait(self, now: float) -> None:
        import select

        wake_at = [self.deadline] if self.deadline is not None else []
        for step in self.running.values():
            if step.started is not None and step.limit is not None:
                wake_at.append(step.started + step.limit)
        timeout = max(0.0, min(wake_at) - now) if wake_at else None
        ready, _, _ = select.select([self._wake], [], [], timeout)
        if ready:
            self._wake.drain()

    def _drain_news(self) -> None:
        while True:
            try:
                kind, payload = self._news.get_nowait()
            except queue.Empty:
                return
            if kind == "topic":
                self._on_worker_event(payload)
            else:
                self._on_done(payload)

    def _on_worker_event(self, message: dict[str, Any]) -> None:
        step = self.running.get(message.get("i", -1))
        if step is None:
            return  # a finished step's late event: its result already carried it
        index = message["i"]
        if "start" in message:
            step.attempts += 1
            step.started = time.monotonic()
            step.address = message["w"]
            if self.emit is not None:
                self.emit(
                    StepStarted(index, step.spec.task_id, step.attempts, step.spec.agent,
                                message["start"])
                )  # fmt: skip
        elif step.started is not None and message["s"] == step.delivered + 1:
            # Progress may overtake its step's start marker (they travel apart);
            # what is not delivered live comes from the result, in order.
            step.delivered += 1
            self._emit_progress(index, step, message["f"])

    def _emit_progress(self, index: int, step: _DaskStep, frame: bytes) -> None:
        if self.emit is not None:
            progress = decode_frame(frame)
            assert isinstance(progress, Progress)
            self.emit(StepProgress(index, step.spec.task_id, step.attempts, progress.data))

    def _on_done(self, index: int) -> None:
        step = self.running.pop(index, None)
        if step is None:
            return
        future = step.future
        if future.cancelled():
            return
        try:
            frame, progress = future.result()
        except Exception as exc:
            self._on_failed_task(index, step, exc)
            return
        if step.started is None:  # its started event is still on the way
            step.attempts += 1
            if self.emit is not None:
                self.emit(StepStarted(index, step.spec.task_id, step.attempts, step.spec.agent, 0))
        for frame_bytes in progress[step.delivered :]:
            self._emit_progress(index, step, frame_bytes)
        done = decode_frame(frame)
        assert isinstance(done, Done)
        self._settle(index, step, done.outcome, done.duration)

    def _on_failed_task(self, index: int, step: _DaskStep, exc: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        spec = step.spec
        if not isinstance(exc, KilledWorker):
            message = f"{_describe(spec)} failed on the cluster: {type(exc).__name__}: {exc}"
            self._fail(index, step, "internal", message)
            return
        innocent = step.started is None or step.finished_once
        if not innocent:
            step.blames += 1
        if (innocent and step.requeues < _MAX_REQUEUES) or (not innocent and step.blames < 2):
            # Dask blames every task that was waiting on a dying worker, and one
            # whose result died with a worker; neither killed anything. A step
            # seen running may still be innocent: the news of its end can die
            # with the worker, unsent. So a step is blamed only when its own
            # fresh submission fails the same way again.
            step.requeues += innocent
            step.delivered = 0
            step.started = None
            step.finished_once = False
            self.todo.appendleft(index)
            return
        if innocent:
            message = (
                f"{_describe(spec)} could not run: Dask workers "
                f"kept dying while it waited for one ({step.requeues + 1} times): {exc}"
            )
        else:
            message = (
                f"{_describe(spec)} crashed: the Dask worker "
                f"running it ({step.address}) died (a fatal signal, os._exit, or more "
                f"memory than the worker's limit), and the scheduler gave up on it: {exc}"
            )
        step.attempts = max(step.attempts, 1)
        if self.emit is not None:
            self.emit(StepCrashed(index, spec.task_id, step.attempts, None, None, None))
        self._fail(index, step, "crash", message)

    def _settle(self, index: int, step: _DaskStep, outcome: StepOutcome, duration: float) -> None:
        error = outcome.error
        policy = self.options.retry
        if (
            error is not None
            and policy is not None
            and error.kind in policy.on
            and step.attempts < policy.attempts
            and not self.stopping
        ):
            if self.emit is not None:
                self.emit(StepRerun(index, step.spec.task_id, step.attempts + 1, error.message))
            step.started = None
            step.delivered = 0
            self.todo.append(index)
            return
        if error is not None and error.attempts != step.attempts:
            outcome = msgspec.structs.replace(
                outcome, error=msgspec.structs.replace(error, attempts=step.attempts)
            )
        del self.steps[index]
        if self.outcomes is not None:
            self.outcomes[index] = outcome
        self.remaining -= 1
        if self.emit is not None and step.attempts:
            self.emit(
                StepFinished(index, step.spec.task_id, step.attempts, outcome.success, duration)
            )
        if self.on_outcome is not None:
            self.on_outcome(index, outcome)

    def _fail(
        self, index: int, step: _DaskStep, kind: ErrorKind, message: str, **facts: Any
    ) -> None:
        spec = step.spec
        error = StepError(kind=kind, message=message, **facts)
        duration = 0.0 if step.started is None else time.monotonic() - step.started
        self._settle(
            index, step, StepOutcome.failed(spec.task_id, spec.agent, message, error), duration
        )

    # -- guards -----------------------------------------------------------------------

    def _stop_step(self, index: int) -> None:
        """Cancel a running step's task and restart its worker (a task cannot be interrupted)."""
        step = self.running.pop(index)
        self._client.cancel(step.future, force=True)
        if step.address is not None:
            try:
                self._client.restart_workers([step.address], timeout=30)
            except Exception:
                pass

    def _check_time_limits(self) -> None:
        now = time.monotonic()
        for index, step in list(self.running.items()):
            if step.started is not None and step.limit is not None:
                if now - step.started > step.limit:
                    self._stop_step(index)
                    spec = step.spec
                    message = (
                        f"{_describe(spec)} timed out: it ran for "
                        f"more than its {step.limit:g} s limit, so its Dask worker "
                        f"({step.address}) was restarted."
                    )
                    self._fail(index, step, "timeout", message, limit=step.limit)

    def _stop_everything(self, why: str) -> None:
        self.stopping = True
        for index in list(self.running):
            step = self.running[index]
            self._stop_step(index)
            kind: ErrorKind = "timeout" if why == "deadline" else "cancelled"
            what = "the call's time limit ran out" if why == "deadline" else "it was cancelled"
            message = f"{_describe(step.spec)} was stopped while running: {what}."
            self._fail(index, step, kind, message)
        before = "the call's time limit ran out" if why == "deadline" else "the call was cancelled"
        for index in sorted(self.steps):
            step = self.steps[index]
            message = f"{_describe(step.spec)} did not run: {before} before it started."
            self._fail(index, step, "cancelled", message)
        self.todo.clear()
