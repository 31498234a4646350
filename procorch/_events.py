"""Events: what the caller hears about steps while they run.

Every event names the step twice over: ``index`` (its position in the input)
and ``task_id`` (the caller's id), plus ``attempt`` (1 for the first start,
more when a step is started again). For each step, events arrive in this
order, and nothing arrives after ``StepFinished``::

    StepStarted -> StepProgress* -> [StepCrashed] -> StepFinished
                                                 \\-> StepRerun -> StepStarted ...

``StepRerun`` replaces ``StepFinished`` when a failed attempt will be retried
(see ``RetryPolicy``); the next attempt then starts with its own number.

The family is a tagged union: ``msgspec.json.encode(event)`` writes an
``"event"`` field naming the kind, and ``msgspec.json.decode(data, type=Event)``
reads any of them back.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

__all__ = [
    "Event",
    "EventSink",
    "StepCrashed",
    "StepFinished",
    "StepProgress",
    "StepRerun",
    "StepStarted",
]


class _StepEvent(msgspec.Struct, frozen=True, tag_field="event"):
    index: int
    task_id: str
    attempt: int


class StepStarted(_StepEvent, frozen=True, tag="started"):
    """A worker began the step; ``pid`` is that worker's process id."""

    agent: str
    pid: int


class StepProgress(_StepEvent, frozen=True, tag="progress"):
    """The executor emitted ``data`` through its event sink."""

    data: Any


class StepCrashed(_StepEvent, frozen=True, tag="crashed"):
    """The worker running the step died; ``signal`` is set when a signal killed it."""

    pid: int | None
    exit_code: int | None
    signal: str | None


class StepRerun(_StepEvent, frozen=True, tag="rerun"):
    """The previous attempt failed with ``reason``; the step will run again as ``attempt``."""

    reason: str


class StepFinished(_StepEvent, frozen=True, tag="finished"):
    """The step is over; ``duration`` is in seconds, as seen by the worker."""

    success: bool
    duration: float


Event = StepStarted | StepProgress | StepCrashed | StepRerun | StepFinished


class EventSink(Protocol):
    """Where an executor reports progress while a step runs.

    ``emit(data)`` sends ``data`` (anything msgspec can encode: str, numbers,
    dicts, lists, Structs...) to the caller, who receives it as the ``data``
    of a :class:`StepProgress`, in builtin form. Emitting is cheap and never
    waits for the caller.
    """

    def emit(self, data: Any) -> None: ...
