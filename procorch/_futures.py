"""ProcessPool: a ``concurrent.futures.Executor`` where a crash fails one future, not the pool.

Any picklable callable (cloudpickle: lambdas and closures too) runs in a
procorch lane. A call that segfaults, aborts, calls ``os._exit`` or is
killed fails only its own future, with :class:`StepFailedError` naming the
signal or exit code; every other future completes, and the pool goes on.

Data flow::

    submit/schedule --> _pending (deque of _WorkItem, cancellable) --+
                                                                    |  the pool's thread takes
    future.cancel() of a running call --> _stop_requests ---------+ |  at most max_workers of
                                                                  | |  them at a time
                                                                  v v
                          StepLifecycle (one call of _CallRunner) --> lanes --> workers
                                   |
                                   +--> _resolve(index, outcome) --> future

- The caller's threads (``submit``, ``cancel``, ``shutdown``) only touch
  ``_pending`` and ``_stop_requests`` under ``_lock``, then wake the thread.
- The pool's thread owns the lifecycle. A call stays PENDING (cancellable
  by ``future.cancel()`` and ``shutdown(cancel_futures=True)``) until a
  lane is free for it; only then is its future marked running. A smaller
  window means less overlap between a call's result travelling back and the
  next call starting; a larger one, calls that cannot be cancelled though no
  worker has taken them. We chose cancellability.
- A result that cannot be rebuilt in the caller fails its own future
  (``StepFailedError``, kind ``serialization``). A fault in the thread itself
  breaks the pool: every unfinished future fails with
  :class:`BrokenPoolError` and ``submit`` raises it, never a hang.
- At interpreter exit, pools not shut down finish their pending calls first,
  as the standard library's pool does.

Each call travels as a step of a private executor, ``_CallRunner``: the
callable and its arguments, cloudpickled, go as raw bytes beside the spec
(``_payload``), or, past 1 MiB, pickled straight into the lane's inbox
(``_inbox``); the result or the exception comes back as raw bytes in the
outcome's ``structured`` field, unpickled from the frame it came in: no
base64 either way.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Executor, Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from typing import Any, ParamSpec, TypeVar, Unpack

import cloudpickle

from ._call import Guards, check_spec, prepare_call
from ._events import EventSink
from ._executor import DEFAULT_MAX_PARALLEL_TASKS, AgentExecutor
from ._model import AgentStepSpec, StepError, StepOutcome
from ._payload import CallNotSentError, call_of_this_step, call_wire, pickled_result

__all__ = ["BrokenPoolError", "CallTimeoutError", "ProcessPool", "StepFailedError"]

P = ParamSpec("P")
T = TypeVar("T")


class StepFailedError(RuntimeError):
    """A call failed in a way only procorch saw: its worker crashed, it timed out...

    ``error`` holds the facts (kind, signal, exit code, pid), ``outcome`` the
    whole failed outcome; the message says what happened in words.
    """

    def __init__(self, outcome: StepOutcome) -> None:
        super().__init__(outcome.output)
        self.outcome = outcome
        self.error: StepError | None = outcome.error

    def __reduce__(self) -> tuple[type[StepFailedError], tuple[StepOutcome]]:
        return type(self), (self.outcome,)


class CallTimeoutError(StepFailedError, TimeoutError):
    """A call ran past its time limit and its worker was killed (``error.kind == "timeout"``)."""


class BrokenPoolError(BrokenExecutor):
    """procorch's own dispatch failed: the pool cannot run calls any more.

    Never caused by what a call does (crashes fail their own future); it
    means a bug in procorch, and the message names the fault.
    """


def _failure(outcome: StepOutcome) -> StepFailedError:
    if outcome.error is not None and outcome.error.kind == "timeout":
        return CallTimeoutError(outcome)
    return StepFailedError(outcome)


class _RemoteTraceback(Exception):
    """The worker-side traceback of an exception, attached as its ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _rebuild_exception(exc: BaseException, text: str) -> BaseException:
    exc.__cause__ = _RemoteTraceback(text)
    return exc


class _CallRunner(AgentExecutor):
    """Runs a pickled call carried in a spec; its result or exception goes back pickled.

    ``initializer(*initargs)`` runs once in each worker process, before its
    first call.
    """

    def __init__(
        self, initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self._initialized = False

    def __getstate__(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "initargs": self.initargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _initialized=False)

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        try:
            fn, args, kwargs = call_of_this_step()
        except CallNotSentError as exc:  # changed after submit: it no longer pickles
            message = f"call {spec.task_id} ({spec.agent}) was not run: {exc}"
            error = StepError(kind="serialization", message=message, exception_type="TypeError")
            return StepOutcome.failed(spec.task_id, spec.agent, message, error)
        try:
            if not self._initialized and self.initializer is not None:
                self._initialized = True
                self.initializer(*self.initargs)
            result = fn(*args, **kwargs)
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc))
            try:
                payload = cloudpickle.dumps((_rebuild_exception, (exc, text)))
            except Exception:
                substitute = RuntimeError(f"{type(exc).__name__}: {exc} (it could not be pickled)")
                payload = cloudpickle.dumps((_rebuild_exception, (substitute, text)))
            return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", False, payload)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True, pickled_result(result))


class _CallFuture(Future[T]):
    """A Future whose ``cancel()`` also stops a running call (its worker is killed)."""

    def __init__(self, pool: ProcessPool) -> None:
        super().__init__()
        self._pool = pool

    def cancel(self) -> bool:
        pool = self._pool
        with pool._lock:  # the pool's thread marks futures running under this lock
            if super().cancel():
                self.set_running_or_notify_cancel()  # waiters see it now, not when dequeued
                pool._wake()
                return True
            with self._condition:
                if self._state != RUNNING:
                    return False  # finished
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
            pool._stop_requests.append(self)
            pool._wake()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True


class _WorkItem:
    """A submitted call waiting for a lane."""

    __slots__ = ("data", "future", "spec", "timeout")

    def __init__(
        self,
        future: _CallFuture[Any],
        spec: AgentStepSpec,
        data: bytes | None,
        timeout: float | None,
    ) -> None:
        self.future = future
        self.spec = spec
        self.data = data
        self.timeout = timeout


# How long the first submit waits for the pool's workers to start. Past it
# the calls go on, and the first chunk sent to a worker not ready by then
# meets the lifecycle's usual checks (a wedged worker is killed and replaced).
_WARM_UP_SECONDS = 30.0


def _finish_at_exit(pool_ref: weakref.ref[ProcessPool], pid: int) -> None:
    """Before the interpreter exits, a pool left open finishes what was submitted.

    Only in the process that made the pool: a child forked from it (a
    ``fork`` multiprocessing pool's worker) inherits the hook, but not the
    pool's thread, and maybe a lock some thread held at the fork.
    """
    pool = pool_ref()
    if pool is not None and os.getpid() == pid:
        pool.shutdown(wait=True)


class ProcessPool(Executor):
    """A process pool for any callable, where a crash fails one future, not the pool.

    ``max_workers`` defaults to ``DEFAULT_MAX_PARALLEL_TASKS``, like every
    entry point. The guards of ``execute_steps_parallel`` apply to every
    call (``step_timeout``, ``memory_limit``, ``retry``, ``capture_output``...);
    a call past its time limit raises :class:`CallTimeoutError` (a
    ``TimeoutError``). ``initializer(*initargs)`` runs once in each worker
    process before its first call. Workers start on the first ``submit``;
    ``shutdown`` (or leaving a ``with`` block) stops them.

    ``max_tasks_per_child=N`` replaces a worker once it has run N calls (as
    in ``concurrent.futures`` and loky), and ``idle_timeout=S`` retires a
    worker left idle S seconds (loky's ``get_reusable_executor(timeout=)``;
    300 s by default, as joblib's, ``float("inf")`` for never); the next call
    forks a fresh worker, and the initializer runs again in it.

    ``future.cancel()`` cancels a call still queued, and stops a running one
    (its worker is killed; the other calls go on).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **guards: Unpack[Guards],
    ) -> None:
        concurrency = guards.pop("concurrency", None)  # the other entry points' name for it
        if max_workers is None:
            max_workers = DEFAULT_MAX_PARALLEL_TASKS if concurrency is None else concurrency
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1 (got {max_workers!r})")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable (got {type(initializer).__name__})")
        self._max_workers = max_workers
        self._call = prepare_call(_CallRunner(initializer, tuple(initargs)), None, guards)
        self._pending: collections.deque[_WorkItem] = collections.deque()
        self._stop_requests: list[_CallFuture[Any]] = []
        self._futures: dict[int, _CallFuture[Any]] = {}  # dispatch index -> running future
        self._index_of: dict[_CallFuture[Any], int] = {}
        self._numbers = itertools.count()
        self._lock = threading.RLock()
        self._shutdown = False
        self._broken: str | None = None
        self._thread: threading.Thread | None = None
        self._dispatch: Any = None
        self._lanes_started = threading.Event()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; the future fails alone if the call crashes."""
        return self._submit(fn, args, kwargs, None)

    def schedule(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` with its own time limit (pebble's ``schedule``).

        Past ``timeout`` seconds the call's worker is killed and the future
        raises :class:`CallTimeoutError`; ``None`` keeps the pool's
        ``step_timeout``.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise ValueError(f"timeout must be a number > 0 (got {timeout!r})")
        return self._submit(fn, tuple(args), dict(kwargs or {}), timeout)

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limit: float | None,
    ) -> Future[T]:
        if self._broken is not None:
            raise BrokenPoolError(self._broken)
        number = next(self._numbers)
        name = getattr(fn, "__qualname__", type(fn).__name__)
        spec = AgentStepSpec(f"call-{number}", name, "", "")
        check_spec(number, spec)  # the name is the caller's: it must be text
        try:
            data = call_wire(spec.task_id, spec.agent, (fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"the call cannot be pickled: {type(exc).__name__}: {exc}") from exc
        future: _CallFuture[T] = _CallFuture(self)
        with self._lock:
            if self._broken is not None:
                raise BrokenPoolError(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.append(_WorkItem(future, spec, data, limit))
            self._ensure_thread()
        # The lanes' own exit hooks (loky's) must be registered before the pool's, which
        # then runs first: the first submit returns once the thread has sent its first call.
        self._lanes_started.wait()
        self._wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with ``cancel_futures``, calls not yet handed to a worker are cancelled."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft().future.cancel()
            thread = self._thread
        if thread is not None:
            self._wake()
            if wait and thread is not threading.current_thread():
                thread.join()

    # -- the pool's thread ----------------------------------------------------------

    def _wake(self) -> None:
        if self._dispatch is not None:
            self._dispatch.wake()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._dispatch = self._call.dispatch(on_outcome=self._resolve, keep_outcomes=False)
            if hasattr(self._dispatch.backend, "structured_views"):  # the local lanes
                # A large result is unpickled from the frame it came in: no copy between.
                self._dispatch.backend.structured_views = True
            self._thread = threading.Thread(
                target=self._serve, name="procorch-ProcessPool", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        dispatch = self._dispatch
        try:
            try:
                dispatch.open(self._max_workers)
                # Before the first submit returns: the calls the exit hook
                # finishes must need no new thread (Python 3.12 starts none then).
                dispatch.backend.warm_up(_WARM_UP_SECONDS)
                self._take_pending()
                dispatch.backend.start_ready()
                with contextlib.suppress(RuntimeError):  # the interpreter is already exiting
                    threading._register_atexit(  # type: ignore[attr-defined]
                        functools.partial(_finish_at_exit, weakref.ref(self), os.getpid())
                    )
            finally:
                self._lanes_started.set()
            while True:
                self._take_pending()
                self._stop_cancelled()
                with self._lock:
                    done = self._shutdown and not self._pending
                if done and not dispatch.remaining:
                    return
                dispatch.turn()
        except BaseException as exc:  # a bug in procorch: fail what is left rather than hang it
            self._break(exc)
        finally:
            try:
                dispatch.close()
            except BaseException as exc:
                self._break(exc)

    def _break(self, exc: BaseException) -> None:
        message = (
            f"the ProcessPool's dispatch failed ({type(exc).__name__}: {exc}), so the pool is "
            "broken: calls not finished were failed, and no new call is accepted"
        )
        with self._lock:
            if self._broken is None:
                self._broken = message
            unfinished = [item.future for item in self._pending] + list(self._futures.values())
            self._pending.clear()
            self._futures.clear()
        for future in unfinished:
            error = BrokenPoolError(message)
            error.__cause__ = exc
            if future.cancelled() or future.done():
                continue
            try:
                if future.running() or future.set_running_or_notify_cancel():
                    future.set_exception(error)
            except Exception:  # cancelled meanwhile
                continue

    def _take_pending(self) -> None:
        """Hand queued calls to the lifecycle while a lane is free for them."""
        dispatch = self._dispatch
        if dispatch.stopping:  # the pool's cancel token or call_timeout: nothing more starts
            with self._lock:
                while self._pending:
                    self._pending.popleft().future.cancel()
            return
        while dispatch.remaining < self._max_workers:
            with self._lock:
                if not self._pending:
                    return
                item = self._pending.popleft()
                if item.future.cancelled() or not item.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                index = dispatch.add(item.spec, item.data)
                self._futures[index] = item.future
                self._index_of[item.future] = index
            if item.timeout is not None:
                dispatch.steps[index].limit = item.timeout

    def _stop_cancelled(self) -> None:
        """Stop the running calls whose futures were cancelled (their workers are killed)."""
        with self._lock:
            requests, self._stop_requests = self._stop_requests, []
        dispatch = self._dispatch
        for future in requests:
            index = self._index_of.get(future)
            record = None if index is None else dispatch.steps.get(index)
            if index is None or record is None:
                continue  # it finished meanwhile
            if record.state != "running":  # sent, not begun yet: try again next turn
                with self._lock:
                    self._stop_requests.append(future)
                continue
            facts = dispatch.backend.stop(index)
            spec = record.spec
            message = (
                f"call {spec.task_id} ({spec.agent}) was cancelled while running: {facts.stopped}"
            )
            error = StepError(kind="cancelled", message=message, pid=facts.pid or record.pid)
            dispatch.failed(index, record.attempts, error)

    def _resolve(self, index: int, outcome: StepOutcome) -> None:
        future = self._futures.pop(index)
        self._index_of.pop(future, None)
        if future.done():
            return  # cancelled while running
        try:
            if outcome.error is not None:  # a failure only procorch saw
                future.set_exception(_failure(outcome))
                return
            try:
                rebuilt = cloudpickle.loads(outcome.structured)
            except Exception as exc:
                future.set_exception(_unreadable(outcome, exc))
                return
            if outcome.success:
                future.set_result(rebuilt)
            else:
                rebuild, args = rebuilt
                future.set_exception(rebuild(*args))
        except Exception as exc:  # an exception that cannot be rebuilt, or cancelled meanwhile
            if not future.done():
                future.set_exception(_unreadable(outcome, exc))


def _unreadable(outcome: StepOutcome, exc: BaseException) -> StepFailedError:
    what = "result" if outcome.success else "exception"
    message = (
        f"call {outcome.task_id} ({outcome.agent}) finished, but its {what} could not be "
        f"rebuilt in the calling process: {type(exc).__name__}: {exc}"
    )
    error = StepError(kind="serialization", message=message, exception_type=type(exc).__name__)
    failure = StepFailedError(StepOutcome.failed(outcome.task_id, outcome.agent, message, error))
    failure.__cause__ = exc
    return failure
