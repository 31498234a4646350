"""asyncio forms of the entry points: the event loop never waits on a worker.

Each async form runs its synchronous twin in a thread of the loop's default
executor, with a ``CancelToken`` of its own: cancelling the awaiting task
trips the token (the call's workers are killed, unfinished steps fail as
cancelled), waits for that thread to return, then lets ``CancelledError``
through. Events reach the loop thread through ``call_soon_threadsafe``: pass
an :class:`EventStream` to read them with ``async for``, an ``asyncio.Queue``,
or a plain callable (called in the loop thread).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar, Unpack

from ._call import Guards
from ._combinators import execute_loop, execute_pipeline
from ._events import Event
from ._executor import Executor
from ._guards import CancelToken
from ._model import AgentStepSpec, StepOutcome
from ._parallel import execute_steps_parallel

__all__ = [
    "EventStream",
    "execute_loop_async",
    "execute_pipeline_async",
    "execute_steps_parallel_async",
]

Item = TypeVar("Item")
Result = TypeVar("Result")

_END = object()


class EventStream:
    """The events of one async call, to read with ``async for``.

    Create it in the loop, pass it as ``events=`` and iterate it while the
    call runs; the iteration ends when the call does::

        stream = procorch.EventStream()
        batch = asyncio.create_task(execute_steps_parallel_async(ex, specs, events=stream))
        async for event in stream:
            print(event)
        outcomes = await batch
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def _put(self, event: Event) -> None:  # from the dispatcher's thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def _end(self) -> None:  # in the loop thread
        self._queue.put_nowait(_END)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later iterations end too
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]


def _delivery(events: Any, loop: asyncio.AbstractEventLoop) -> Callable[[Event], Any] | None:
    if events is None:
        return None
    if isinstance(events, EventStream):
        return events._put
    if isinstance(events, asyncio.Queue):
        queue = events
        return lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
    if callable(events):
        callback = events
        return lambda event: loop.call_soon_threadsafe(callback, event)
    raise TypeError(
        f"events must be an EventStream, an asyncio.Queue or a callable "
        f"(got {type(events).__name__})"
    )


async def _in_thread(run: Callable[..., Result], events: Any, guards: Guards, *args: Any) -> Result:
    """Run ``run(*args, events=..., **guards)`` in a thread, cancellable from the loop."""
    loop = asyncio.get_running_loop()
    token = CancelToken()
    user_token = guards.get("cancel")
    if user_token is not None:
        user_token._listen(token.cancel)
    call = functools.partial(run, *args, _delivery(events, loop), **{**guards, "cancel": token})
    future = loop.run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        token.cancel()
        await asyncio.wait([future])  # the workers are stopped before we return
        raise
    finally:
        if user_token is not None:
            user_token._forget(token.cancel)
        if isinstance(events, EventStream):
            events._end()


async def execute_steps_parallel_async(
    executor: Executor,
    specs: Iterable[AgentStepSpec],
    events: Any = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome]:
    """``execute_steps_parallel`` for asyncio; cancelling the task cancels the batch."""
    return await _in_thread(execute_steps_parallel, events, guards, executor, list(specs))


async def execute_pipeline_async(
    executor: Executor,
    items: Iterable[Item],
    stages: Sequence[Callable[[StepOutcome | None, Item], AgentStepSpec | None]],
    events: Any = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome | None]:
    """``execute_pipeline`` for asyncio. Stage functions run in a worker thread, not the loop."""
    return await _in_thread(execute_pipeline, events, guards, executor, list(items), stages)


async def execute_loop_async(
    executor: Executor,
    initial: Iterable[AgentStepSpec],
    max_iterations: int,
    next: Callable[[list[StepOutcome]], Iterable[AgentStepSpec] | None],
    events: Any = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome]:
    """``execute_loop`` for asyncio. ``next`` runs in a worker thread, not the loop."""
    return await _in_thread(
        execute_loop, events, guards, executor, list(initial), max_iterations, next
    )
