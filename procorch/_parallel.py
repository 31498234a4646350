"""execute_steps_parallel: the barrier, and the checks made before it starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cloudpickle
import msgspec

from ._dispatcher import _CallOptions, _Dispatch
from ._errors import ExecutorError, InvalidSpecError
from ._events import Event
from ._executor import DEFAULT_MAX_PARALLEL_TASKS
from ._guards import CancelToken, RetryPolicy
from ._model import AgentStepSpec, StepOutcome
from ._pool import _engine

__all__ = ["execute_steps_parallel"]

_encode = msgspec.msgpack.Encoder().encode
_decode_spec = msgspec.msgpack.Decoder(AgentStepSpec).decode

EventTarget = Callable[[Event], Any] | Any
"""A callable taking each event, or a queue-like object with ``put``."""


def _concurrency(executor: Any) -> int:
    hint_method = getattr(executor, "concurrency_hint", None)
    hint = DEFAULT_MAX_PARALLEL_TASKS if hint_method is None else hint_method()
    if isinstance(hint, bool) or not isinstance(hint, int):
        raise ExecutorError(f"concurrency_hint() must return an int (got {hint!r})")
    return max(1, hint)


def _checked_specs(specs: Iterable[AgentStepSpec]) -> tuple[list[AgentStepSpec], list[bytes]]:
    """The specs as a list and as wire bytes, or an error naming the first bad one."""
    if isinstance(specs, (str, bytes, AgentStepSpec)) or not isinstance(specs, Iterable):
        raise TypeError(f"specs must be a list of AgentStepSpec (got {type(specs).__name__})")
    checked = list(specs)
    wire: list[bytes] = []
    first_index: dict[str, int] = {}
    for index, spec in enumerate(checked):
        if not isinstance(spec, AgentStepSpec):
            raise InvalidSpecError(index, f"expected an AgentStepSpec, got {type(spec).__name__}")
        try:
            data = _encode(spec)
            _decode_spec(data)
        except TypeError as exc:
            raise InvalidSpecError(index, f"cannot be encoded: {exc}") from None
        except msgspec.ValidationError as exc:
            raise InvalidSpecError(index, str(exc)) from None
        earlier = first_index.setdefault(spec.task_id, index)
        if earlier != index:
            raise InvalidSpecError(
                index, f"task_id {spec.task_id!r} is already used by specs[{earlier}]"
            )
        wire.append(data)
    return checked, wire


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 (got {value!r})")


def _check_step_timeouts(
    specs: Sequence[AgentStepSpec],
    step_timeout: float | None,
    overrides: Mapping[str, float] | None,
) -> None:
    if step_timeout is not None:
        _positive("step_timeout", step_timeout)
    task_ids = {spec.task_id for spec in specs}
    for task_id, limit in (overrides or {}).items():
        _positive(f"step_timeouts[{task_id!r}]", limit)
        if task_id not in task_ids:
            raise ValueError(f"step_timeouts names task_id {task_id!r}, which no spec has")


def _call_options(
    specs: Sequence[AgentStepSpec],
    *,
    step_timeout: float | None,
    step_timeouts: Mapping[str, float] | None,
    call_timeout: float | None,
    memory_limit: int | None,
    retry: RetryPolicy | None,
    capture_output: bool,
    cancel: CancelToken | None,
) -> _CallOptions:
    if call_timeout is not None:
        _positive("call_timeout", call_timeout)
    if memory_limit is not None and (
        isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0
    ):
        raise ValueError(f"memory_limit must be a number of bytes > 0 (got {memory_limit!r})")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy (got {type(retry).__name__})")
    if cancel is not None and not isinstance(cancel, CancelToken):
        raise TypeError(f"cancel must be a CancelToken (got {type(cancel).__name__})")
    _check_step_timeouts(specs, step_timeout, step_timeouts)
    return _CallOptions(
        step_timeout=step_timeout,
        step_timeouts=step_timeouts,
        call_timeout=call_timeout,
        memory_limit=memory_limit,
        retry=retry,
        capture=bool(capture_output),
        cancel=cancel,
    )


def _event_delivery(events: EventTarget | None) -> Callable[[Event], Any] | None:
    if events is None:
        return None
    if callable(events):
        return events
    put = getattr(events, "put", None)
    if callable(put):
        return put  # type: ignore[no-any-return]
    raise TypeError(
        f"events must be a callable or an object with a put() method (got {type(events).__name__})"
    )


def execute_steps_parallel(
    executor: Any,
    specs: Iterable[AgentStepSpec],
    events: EventTarget | None = None,
    *,
    step_timeout: float | None = None,
    step_timeouts: Mapping[str, float] | None = None,
    call_timeout: float | None = None,
    memory_limit: int | None = None,
    retry: RetryPolicy | None = None,
    capture_output: bool = False,
    cancel: CancelToken | None = None,
) -> list[StepOutcome]:
    """Run every spec in worker processes; return one outcome per spec, in input order.

    At most ``executor.concurrency_hint()`` steps run at once. A step that
    fails in any way, including killing its worker process, yields a failed
    outcome labelled with its ``task_id`` and ``agent``; every other step
    runs as if nothing happened.

    ``events`` receives :data:`Event` records in the calling thread as they
    happen: pass a callable, or anything with a ``put`` method such as a
    ``queue.Queue``.

    Guards (all off by default):

    - ``step_timeout``: seconds any one step may run; ``step_timeouts`` maps
      a ``task_id`` to its own limit. A step past its limit has its worker
      killed (it may be stuck in C code) and fails with kind ``timeout``.
    - ``call_timeout``: seconds for the whole call. When it runs out, running
      steps fail with kind ``timeout``, queued ones with ``cancelled``, and
      the call returns.
    - ``memory_limit``: bytes of resident memory a step's worker (with the
      processes it started) may use; over it, the step fails with kind
      ``memory``. A worker left above half the cap after a step is replaced.
    - ``retry``: a :class:`RetryPolicy` for failures procorch observed.
    - ``capture_output``: keep what each step writes to its standard output
      and error (C code and child processes included); a failed outcome's
      ``error.printed`` holds the last 4 KiB.
    - ``cancel``: a :class:`CancelToken`; tripping it stops the call.

    Ctrl-C (and SIGTERM, when the program has no handler of its own) during
    a call kills every worker process of the call and whatever its steps
    started, then raises KeyboardInterrupt.

    Bad input (an item that is not a spec, a field of the wrong type, a
    repeated ``task_id``, an executor that cannot be pickled, a guard out of
    range) raises before any step starts.
    """
    if not callable(getattr(executor, "execute_step", None)):
        raise ExecutorError(
            f"executor must have an execute_step(spec, events) method "
            f"(got {type(executor).__name__})"
        )
    limit = _concurrency(executor)
    checked, wire = _checked_specs(specs)
    emit = _event_delivery(events)
    options = _call_options(
        checked,
        step_timeout=step_timeout,
        step_timeouts=step_timeouts,
        call_timeout=call_timeout,
        memory_limit=memory_limit,
        retry=retry,
        capture_output=capture_output,
        cancel=cancel,
    )
    if not checked:
        return []
    try:
        blob = cloudpickle.dumps(executor)
    except Exception as exc:
        raise ExecutorError(
            f"executor cannot be pickled for the worker processes: {type(exc).__name__}: {exc}"
        ) from exc
    dispatch = _Dispatch(blob, _engine.next_token(), emit, options)
    for spec, data in zip(checked, wire, strict=True):
        dispatch.add(spec, data)
    dispatch.run(min(limit, len(checked)))
    return [outcome for outcome in dispatch.outcomes if outcome is not None]
