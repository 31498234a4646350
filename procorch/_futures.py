"""ProcessPool: a ``concurrent.futures.Executor`` whose pool is never broken.

Any picklable callable (cloudpickle: lambdas and closures too) runs in a
procorch lane. A call that segfaults, aborts, calls ``os._exit`` or is
killed fails only its own future, with :class:`StepFailedError` naming the
signal or exit code; every other future completes, and the pool goes on.

Each call travels as a step of a private executor, ``_CallRunner``, through
the same dispatcher as every other entry point: the callable and its
arguments are cloudpickled into the spec's prompt (base64), and the result or
the exception comes back pickled in the outcome's output. A background thread
owns the dispatch; ``submit`` hands it work through a queue and a wake-up.
"""

from __future__ import annotations

import base64
import itertools
import os
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

import cloudpickle

from ._call import Guards, check_spec, prepare_call
from ._events import EventSink
from ._executor import AgentExecutor
from ._model import AgentStepSpec, StepError, StepOutcome

__all__ = ["ProcessPool", "StepFailedError"]

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
    """Runs a pickled call carried in a spec; its result or exception goes back pickled."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        fn, args, kwargs = cloudpickle.loads(base64.b64decode(spec.prompt))
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc))
            try:
                payload = cloudpickle.dumps((_rebuild_exception, (exc, text)))
            except Exception:
                substitute = RuntimeError(f"{type(exc).__name__}: {exc} (it could not be pickled)")
                payload = cloudpickle.dumps((_rebuild_exception, (substitute, text)))
            return StepOutcome(spec.task_id, spec.task_id, spec.agent, _b64(payload), False)
        return StepOutcome(
            spec.task_id, spec.task_id, spec.agent, _b64(cloudpickle.dumps(result)), True
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ProcessPool(Executor):
    """A process pool for any callable, where a crash fails one future, not the pool.

    ``max_workers`` defaults to ``os.cpu_count()``. The guards of
    ``execute_steps_parallel`` apply to every call (``step_timeout``,
    ``memory_limit``, ``retry``, ``capture_output``...). Workers start on the
    first ``submit``; ``shutdown`` (or leaving a ``with`` block) stops them.
    """

    def __init__(self, max_workers: int | None = None, **guards: Any) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1 (got {max_workers!r})")
        self._max_workers = max_workers
        self._call = prepare_call(_CallRunner(), None, Guards(**guards))  # type: ignore[typeddict-item]
        self._submissions: queue.SimpleQueue[tuple[Future[Any], AgentStepSpec, bytes]] = (
            queue.SimpleQueue()
        )
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self._dispatch: Any = None
        self._started = threading.Event()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; the future fails alone if the call crashes."""
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"the call cannot be pickled: {type(exc).__name__}: {exc}") from exc
        number = next(self._numbers)
        name = getattr(fn, "__qualname__", type(fn).__name__)
        spec = AgentStepSpec(f"call-{number}", name, "", _b64(payload))
        data = check_spec(number, spec)
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submissions.put((future, spec, data))
            self._ensure_thread()
        self._dispatch.wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with ``cancel_futures``, calls not yet handed to a worker are cancelled."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        future, _, _ = self._submissions.get_nowait()
                    except queue.Empty:
                        break
                    future.cancel()
            thread = self._thread
        if thread is not None:
            self._dispatch.wake()
            if wait:
                thread.join()

    # -- the dispatcher thread ----------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._dispatch = self._call.dispatch(on_outcome=self._resolve, keep_outcomes=False)
            self._futures: dict[int, Future[Any]] = {}
            self._thread = threading.Thread(
                target=self._serve, name="procorch-ProcessPool", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        dispatch = self._dispatch
        dispatch.open(self._max_workers)
        try:
            while True:
                self._take_submissions()
                with self._lock:
                    done = self._shutdown and self._submissions.empty()
                if done and not dispatch.remaining:
                    return
                dispatch.turn()
        except BaseException as exc:  # a bug: fail what is left rather than hang it
            for future in self._futures.values():
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            dispatch.close()

    def _take_submissions(self) -> None:
        while True:
            try:
                future, spec, data = self._submissions.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                self._futures[self._dispatch.add(spec, data)] = future

    def _resolve(self, index: int, outcome: StepOutcome) -> None:
        future = self._futures.pop(index)
        if outcome.error is not None:  # a failure only procorch saw
            future.set_exception(StepFailedError(outcome))
            return
        rebuilt = cloudpickle.loads(base64.b64decode(outcome.output))
        if outcome.success:
            future.set_result(rebuilt)
        else:
            rebuild, args = rebuilt
            future.set_exception(rebuild(*args))
