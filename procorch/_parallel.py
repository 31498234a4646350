"""execute_steps_parallel: the barrier, and the checks made before it starts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import msgspec

from ._dispatcher import _Dispatch
from ._errors import ExecutorError, InvalidSpecError
from ._events import Event
from ._executor import DEFAULT_MAX_PARALLEL_TASKS
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
) -> list[StepOutcome]:
    """Run every spec in worker processes; return one outcome per spec, in input order.

    At most ``executor.concurrency_hint()`` steps run at once. A step that
    fails in any way, including killing its worker process, yields a failed
    outcome labelled with its ``task_id`` and ``agent``; every other step
    runs as if nothing happened.

    ``events`` receives :data:`Event` records in the calling thread as they
    happen: pass a callable, or anything with a ``put`` method such as a
    ``queue.Queue``.

    Bad input (an item that is not a spec, a field of the wrong type, a
    repeated ``task_id``, an executor that cannot be pickled) raises before
    any step starts.
    """
    if not callable(getattr(executor, "execute_step", None)):
        raise ExecutorError(
            f"executor must have an execute_step(spec, events) method "
            f"(got {type(executor).__name__})"
        )
    limit = _concurrency(executor)
    checked, wire = _checked_specs(specs)
    emit = _event_delivery(events)
    if not checked:
        return []
    try:
        blob = cloudpickle.dumps(executor)
    except Exception as exc:
        raise ExecutorError(
            f"executor cannot be pickled for the worker processes: {type(exc).__name__}: {exc}"
        ) from exc
    dispatch = _Dispatch(checked, wire, blob, _engine.next_token(), emit)
    return dispatch.run(min(limit, len(checked)))
