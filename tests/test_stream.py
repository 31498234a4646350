"""Streaming: outcomes as they complete, bounded memory, early break."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import QuickExecutor, RendezvousExecutor, gone, read_records, spec

from procorch import (
    AgentStepSpec,
    InvalidSpecError,
    StepStarted,
    execute_steps_parallel,
    stream_steps_parallel,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


def test_as_completed_yields_every_index_once(tmp_path: Path) -> None:
    """Every spec comes back once, labelled with its input index, as it completes."""
    # The first step waits until another has finished, however slowly workers start.
    specs = [spec(str(i), "last" if i == 0 else "ok") for i in range(20)]
    seen = list(stream_steps_parallel(RendezvousExecutor(tmp_path, parties=1), specs))
    assert sorted(index for index, _ in seen) == list(range(20))
    assert all(outcome.task_id == str(index) for index, outcome in seen)
    # The first step finished after another (its outcome cannot have been waited
    # for in input order); when both reports arrive in one turn they may be
    # yielded in either order, so the check is on when they ended.
    ends = {record["task_id"]: record["end"] for record in read_records(tmp_path)}
    assert ends["0"] > min(ends.values())


def test_ordered_yields_in_input_order(tmp_path: Path) -> None:
    """ordered=True yields in input order even when completion order differs."""
    specs = [spec(str(i), "last" if i == 0 else "ok") for i in range(20)]
    executor = RendezvousExecutor(tmp_path, parties=1)
    seen = list(stream_steps_parallel(executor, specs, ordered=True))
    assert [index for index, _ in seen] == list(range(20))
    ends = {record["task_id"]: record["end"] for record in read_records(tmp_path)}
    assert ends["0"] > min(ends.values())  # the first step did finish after another


def test_a_crash_in_a_stream_is_isolated() -> None:
    """A segfaulting step yields its labelled crash; the stream goes on."""
    specs = [spec("a"), spec("x", "segfault"), spec("b")]
    seen = dict(stream_steps_parallel(QuickExecutor(), specs))
    assert seen[1].error is not None and seen[1].error.kind == "crash"
    assert seen[0].success and seen[2].success


def test_input_is_read_lazily_within_the_window() -> None:
    """The stream never holds more than max_in_flight specs it has not yielded."""
    pulled = 0

    def source() -> Iterator[AgentStepSpec]:
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield spec(str(i))

    yielded = 0
    for _ in stream_steps_parallel(QuickExecutor(), source(), max_in_flight=5):
        yielded += 1
        assert pulled - yielded <= 5
    assert yielded == 100


@pytest.mark.slow
def test_two_hundred_thousand_specs_in_constant_memory() -> None:
    """A generator of 200,000 specs runs with bounded parent memory."""
    me = psutil.Process()
    total = 200_000
    count = 0
    baseline = None
    for _ in stream_steps_parallel(
        QuickExecutor(), (AgentStepSpec(str(i), "ok", "", "") for i in range(total))
    ):
        count += 1
        if count == 20_000:
            baseline = me.memory_info().rss
    assert count == total
    assert baseline is not None
    # A stream that kept its steps would hold 180,000 more specs and outcomes.
    assert me.memory_info().rss - baseline < 30 * 2**20


def test_breaking_out_stops_the_work_left() -> None:
    """Leaving the loop kills the workers of running steps; the rest never start."""
    pids = []
    specs = [spec("h", "hang")] + [spec(f"a{i}") for i in range(200)]

    def remember(event: object) -> None:
        if isinstance(event, StepStarted) and event.task_id == "h":
            pids.append(event.pid)

    start = time.monotonic()
    for count, _ in enumerate(stream_steps_parallel(QuickExecutor(3), specs, events=remember)):
        if pids or count == 199:  # once the hanging step runs (the others yield meanwhile)
            break
    assert time.monotonic() - start < 30
    assert pids, "the hanging step never started"
    assert gone(pids), "a step's worker outlived the stream"


def test_bad_spec_in_the_stream_is_named() -> None:
    """A bad item in the input raises InvalidSpecError with its index when reached."""
    with pytest.raises(InvalidSpecError, match=r"specs\[2\]: expected an AgentStepSpec"):
        for _ in stream_steps_parallel(QuickExecutor(), [spec("a"), spec("b"), "oops"]):
            pass


def test_max_in_flight_must_be_positive() -> None:
    """A window below 1 is refused."""
    with pytest.raises(ValueError, match=r"max_in_flight must be an int >= 1 \(got 0\)"):
        stream_steps_parallel(QuickExecutor(), [spec("a")], max_in_flight=0)


@pytest.mark.parametrize("bad", [None, "not a spec", 3])
def test_a_bad_item_in_the_stream_raises_naming_its_position(bad: object) -> None:
    """None (or any non-spec) mid-stream is an InvalidSpecError, as in the barrier."""
    specs = [spec("a"), bad, spec("c")]
    with pytest.raises(InvalidSpecError, match=r"specs\[1\]: expected an AgentStepSpec"):
        list(stream_steps_parallel(QuickExecutor(), specs))  # type: ignore[list-item]


def test_a_lone_surrogate_is_an_invalid_spec_naming_the_field() -> None:
    """Text no encoding can carry is refused up front, naming the spec and the field."""
    bad = AgentStepSpec("b", "ok", "", "half a pair: \udc80")
    with pytest.raises(InvalidSpecError, match=r"specs\[1\]: prompt holds text that cannot"):
        list(stream_steps_parallel(QuickExecutor(), [spec("a"), bad]))
    with pytest.raises(InvalidSpecError, match=r"specs\[1\]: prompt"):
        execute_steps_parallel(QuickExecutor(), [spec("a"), bad])
