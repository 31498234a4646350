"""map and imap: the batch door for plain functions.

``procorch.map(fn, items)`` is ``execute_steps_parallel`` for a function of
one argument: each item becomes a step of a private executor,
``_FunctionRunner`` (the function travels once per worker, inside the
executor; each item travels cloudpickled, as raw bytes beside its spec:
see ``_payload``), and each result comes back as raw bytes in the outcome's
``structured`` field. One
bad item (an exception, a segfault, a time limit, the memory cap) fails its
own :class:`MapResult`, never the call. ``imap`` is the same on
``stream_steps_parallel``: lazy in, results as they finish (or in order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, Unpack

import cloudpickle
import msgspec

from ._call import EventTarget, Guards
from ._events import EventSink
from ._executor import AgentExecutor
from ._model import AgentStepSpec, StepError, StepOutcome
from ._payload import CarrierSpec, payload_of_this_step
from ._stream import stream_steps_parallel

__all__ = ["MapResult", "imap", "map"]

T = TypeVar("T")
R = TypeVar("R")


class MapResult(msgspec.Struct, Generic[R], frozen=True):
    """What came of one item: its position, and its value or what went wrong.

    ``error`` is a :class:`StepError` (``kind`` says ``exception``, ``crash``,
    ``timeout``, ``memory``...); for an exception, ``error.exception_type``
    and ``error.traceback`` describe it.
    """

    index: int
    success: bool
    value: R | None = None
    error: StepError | None = None


class _UnpicklableItem(TypeError):
    """An item that could not be pickled for the workers."""


class _FunctionRunner(AgentExecutor):
    """Calls ``fn`` on the item pickled in a spec; the result goes back pickled, raw."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        payload = payload_of_this_step()
        if not payload:
            raise _UnpicklableItem(spec.description)
        item = cloudpickle.loads(payload)
        result = cloudpickle.dumps(self.fn(item))
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True, result)


def _specs(name: str, items: Iterable[Any]) -> Iterator[AgentStepSpec]:
    for index, item in enumerate(items):
        try:
            payload = cloudpickle.dumps(item)
        except Exception as exc:  # fails this item alone, in the worker, as an exception
            reason = f"item {index} cannot be pickled: {type(exc).__name__}: {exc}"
            yield AgentStepSpec(f"item-{index}", name, reason, "")
            continue
        yield CarrierSpec(f"item-{index}", name, "", "", payload=payload)


def _result(index: int, outcome: StepOutcome) -> MapResult[Any]:
    if outcome.error is not None or not outcome.success:
        error = outcome.error or StepError(kind="exception", message=outcome.output)
        return MapResult(index, False, None, error)
    try:
        value = cloudpickle.loads(outcome.structured)
    except Exception as exc:
        message = (
            f"item {index} finished, but its result could not be rebuilt in the calling "
            f"process: {type(exc).__name__}: {exc}"
        )
        error = StepError(kind="serialization", message=message, exception_type=type(exc).__name__)
        return MapResult(index, False, None, error)
    return MapResult(index, True, value, None)


def imap(
    fn: Callable[[T], R],
    items: Iterable[T],
    events: EventTarget | None = None,
    *,
    ordered: bool = False,
    max_in_flight: int | None = None,
    **guards: Unpack[Guards],
) -> Iterator[MapResult[R]]:
    """Yield a :class:`MapResult` for each item as its call finishes (``ordered``: in input order).

    ``items`` is read lazily (at most ``max_in_flight`` at a time); breaking
    out of the loop stops the calls left. Guards, events and backends are
    those of ``stream_steps_parallel``; ``concurrency`` (default
    ``DEFAULT_MAX_PARALLEL_TASKS``) bounds the calls running at once.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (got {type(fn).__name__})")
    name = getattr(fn, "__qualname__", type(fn).__name__)
    stream = stream_steps_parallel(
        _FunctionRunner(fn),
        _specs(name, items),
        events,
        ordered=ordered,
        max_in_flight=max_in_flight,
        **guards,
    )
    return _results(stream)


def _results(stream: Iterator[tuple[int, StepOutcome]]) -> Iterator[MapResult[Any]]:
    try:
        for index, outcome in stream:
            yield _result(index, outcome)
    finally:
        stream.close()  # type: ignore[attr-defined]


def map(  # procorch.map on purpose: the builtin's shape, in worker processes
    fn: Callable[[T], R],
    items: Iterable[T],
    events: EventTarget | None = None,
    **guards: Unpack[Guards],
) -> list[MapResult[R]]:
    """Call ``fn(item)`` for every item in worker processes; one result per item, in order.

    Never raises for one bad item: an exception, a crash, a time limit or the
    memory cap fails that item's :class:`MapResult` (``success=False`` and an
    ``error`` saying what happened), and the others run on.
    """
    return list(imap(fn, items, events, ordered=True, **guards))
