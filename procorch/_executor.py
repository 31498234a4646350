"""The executor seam: the one thing a caller writes.

An executor turns a spec into an outcome. procorch ships it (cloudpickled) to
each worker process once per call and calls ``execute_step`` there, so the
executor and whatever it references must be picklable by cloudpickle: a class
defined in ``__main__`` or typed at the interpreter prompt is fine.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable
from typing import Protocol

from ._events import EventSink
from ._model import AgentStepSpec, StepOutcome

__all__ = ["DEFAULT_MAX_PARALLEL_TASKS", "AgentExecutor", "Executor"]

DEFAULT_MAX_PARALLEL_TASKS = 4
"""How many steps run at once when an executor does not say otherwise.

Four keeps a laptop responsive while still overlapping I/O-bound agent steps;
CPU-bound executors should return ``os.cpu_count()`` from
:meth:`AgentExecutor.concurrency_hint` instead.
"""


class Executor(Protocol):
    """What every entry point takes as its executor: anything with ``execute_step``.

    :class:`AgentExecutor` is the usual way to write one; any object with
    this method (and, optionally, ``concurrency_hint() -> int``) will do.
    """

    def execute_step(
        self, spec: AgentStepSpec, events: EventSink, /
    ) -> StepOutcome | Awaitable[StepOutcome]: ...


class AgentExecutor(abc.ABC):
    """Runs one step at a time, inside a worker process.

    Report failures as outcomes (``StepOutcome.failed``) rather than
    exceptions where you can; procorch turns anything worse (an exception, a
    crash, a bad return value) into a failed outcome for that step alone.
    """

    @abc.abstractmethod
    def execute_step(
        self, spec: AgentStepSpec, events: EventSink
    ) -> StepOutcome | Awaitable[StepOutcome]:
        """Run ``spec`` and return its outcome; ``events.emit`` reports progress.

        May be a coroutine function (``async def``): the worker then runs it on
        an event loop of its own, so executors that await network calls work
        unchanged.
        """

    def concurrency_hint(self) -> int:
        """The most steps of one call that may run at once (a value below 1 counts as 1)."""
        return DEFAULT_MAX_PARALLEL_TASKS
