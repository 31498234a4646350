"""The asyncio forms: a free event loop, cancellation, async executors."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import AsyncExecutor, FaultyExecutor, gone, spec

from procorch import (
    EventStream,
    StepFinished,
    StepOutcome,
    StepProgress,
    StepStarted,
    execute_loop_async,
    execute_pipeline_async,
    execute_steps_parallel_async,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


@pytest.mark.slow
def test_event_loop_stays_free_while_steps_run() -> None:
    """A ticker task keeps ticking while a batch of slow steps runs."""

    async def main() -> tuple[list[StepOutcome], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        outcomes = await execute_steps_parallel_async(
            AsyncExecutor(delay=0.5), [spec(str(i)) for i in range(4)]
        )
        ticking.cancel()
        return outcomes, ticks

    outcomes, ticks = asyncio.run(main())
    assert all(o.success for o in outcomes)
    assert ticks >= 20  # about 100 in a second; a blocked loop would give none


def test_async_executor_runs_on_its_own_loop_in_the_worker() -> None:
    """An executor with `async def execute_step` works unchanged."""
    outcomes = asyncio.run(execute_steps_parallel_async(AsyncExecutor(), [spec("a"), spec("b")]))
    assert [o.task_id for o in outcomes] == ["a", "b"]
    assert all(o.success and o.structured["loop"].endswith("EventLoop") for o in outcomes)


def test_events_can_be_read_with_async_for() -> None:
    """An EventStream yields each step's events in order and ends with the call."""

    async def main() -> tuple[list[object], list[StepOutcome]]:
        stream = EventStream()
        batch = asyncio.create_task(
            execute_steps_parallel_async(AsyncExecutor(), [spec("a")], events=stream)
        )
        seen = [event async for event in stream]
        return seen, await batch

    seen, outcomes = asyncio.run(main())
    assert [type(e) for e in seen] == [StepStarted, StepProgress, StepFinished]
    assert outcomes[0].success


def test_cancelling_the_task_cancels_the_batch() -> None:
    """Cancelling the awaiting task stops the workers promptly and raises CancelledError."""

    async def main() -> tuple[float, int]:
        stream = EventStream()
        batch = asyncio.create_task(
            execute_steps_parallel_async(
                AsyncExecutor(),
                [spec("h1", "hang"), spec("h2", "hang"), spec("h3", "hang")],
                events=stream,
            )
        )
        async for event in stream:
            if isinstance(event, StepStarted):
                pid = event.pid
                break
        start = time.monotonic()
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        return time.monotonic() - start, pid

    elapsed, pid = asyncio.run(main())
    assert elapsed < 10
    assert gone([pid], within=5), "the cancelled step's worker is still running"


def test_crash_in_an_async_batch_is_isolated() -> None:
    """A segfaulting step in the async form fails alone, labelled."""
    outcomes = asyncio.run(
        execute_steps_parallel_async(FaultyExecutor(), [spec("x", "segfault"), spec("ok")])
    )
    assert outcomes[0].error is not None and outcomes[0].error.kind == "crash"
    assert outcomes[1].success


def test_async_pipeline_and_loop() -> None:
    """The pipeline and the loop have async forms with the same results."""

    async def main() -> tuple[list[StepOutcome | None], list[StepOutcome]]:
        chained = await execute_pipeline_async(
            AsyncExecutor(delay=0.01),
            ["p", "q"],
            [lambda prev, item: spec(f"{item}0"), lambda prev, item: spec(f"{item}1")],
        )
        rounds = iter(range(10))
        looped = await execute_loop_async(
            AsyncExecutor(delay=0.01), [spec("r0")], 3, lambda _: [spec(f"r{next(rounds) + 1}")]
        )
        return chained, looped

    chained, looped = asyncio.run(main())
    assert [o.task_id for o in chained if o is not None] == ["p1", "q1"]
    assert [o.task_id for o in looped] == ["r2"]
