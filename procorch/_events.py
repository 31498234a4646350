"""Events: what the caller hears about steps while they run.

Every event names the step twice over: ``index`` (its position in the input)
and ``task_id`` (the caller's id), plus ``attempt`` (1 for the first start,
more when a step is started again). For each step, events arrive in this
order, and nothing arrives after ``StepFinished``::

    StepStarted -> StepProgress* -> [StepCrashed] -> StepFinished
                                                 \\-> StepRerun -> StepStarted ...

``StepRerun`` replaces ``StepFinished`` when a failed attempt will be retried
(see ``RetryPolicy``); the next attempt then starts with its own number.

Events also say when and at what cost: ``StepStarted.at`` is the instant
the worker began the attempt (seconds on the machine's monotonic clock:
differences between events are meaningful, the origin is not) and
``concurrency`` the call's number of steps at once; ``StepRerun`` and
``StepFinished`` carry the ending attempt's ``usage`` (see
:class:`StepUsage`) and its failure's ``error_kind``. From these alone a
run can be drawn again (``procorch.write_report``).

The family is a tagged union: ``msgspec.json.encode(event)`` writes an
``"event"`` field naming the kind, and ``msgspec.json.decode(data, type=Event)``
reads any of them back.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from ._usage import StepUsage

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
    """A worker began the step; ``pid`` is that worker's process id.

    ``at`` is the instant it began (``time.monotonic()`` of the machine, as
    the worker saw it; a Dask step: when the caller heard of it), and
    ``concurrency`` how many steps the call runs at once.
    """

    agent: str
    pid: int
    at: float | None = None
    concurrency: int | None = None


class StepProgress(_StepEvent, frozen=True, tag="progress"):
    """The executor emitted ``data`` through its event sink."""

    data: Any


class StepCrashed(_StepEvent, frozen=True, tag="crashed"):
    """The worker running the step died; ``signal`` is set when a signal killed it."""

    pid: int | None
    exit_code: int | None
    signal: str | None


class StepRerun(_StepEvent, frozen=True, tag="rerun"):
    """The previous attempt failed with ``reason``; the step will run again as ``attempt``.

    ``error_kind`` is that failure's kind (None when the attempt was cut
    short without a verdict, by a backend that runs it again uncharged) and
    ``usage`` what the attempt cost.
    """

    reason: str
    error_kind: str | None = None
    usage: StepUsage | None = None


class StepFinished(_StepEvent, frozen=True, tag="finished"):
    """The step is over; ``duration`` is in seconds, as seen by the worker.

    For a failed step, ``error_kind`` is its outcome's ``error.kind``
    (``"unsuccessful"`` when the executor itself returned ``success`` false)
    and ``reason`` its message. ``usage`` is what the last attempt cost
    (None when no attempt ran to the end: a step stopped while it waited to
    be retried).
    """

    success: bool
    duration: float
    error_kind: str | None = None
    reason: str | None = None
    usage: StepUsage | None = None


Event = StepStarted | StepProgress | StepCrashed | StepRerun | StepFinished


class EventSink(Protocol):
    """Where an executor reports progress while a step runs.

    ``emit(data)`` sends ``data`` (anything msgspec can encode: str, numbers,
    dicts, lists, Structs...) to the caller, who receives it as the ``data``
    of a :class:`StepProgress`, in builtin form. Emitting is cheap and never
    waits for the caller.
    """

    def emit(self, data: Any) -> None: ...
