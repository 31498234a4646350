"""procorch.map and imap: plain functions, one result per item, never raising for one item."""

from __future__ import annotations

import os
import threading
from collections import Counter

import msgspec
import pytest
from helpers import crash_on, gone, identity, pid_of, sleep_then, square

import procorch
from procorch import MapResult, StepFinished

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


def fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError(f"two is bad (got {x})")
    return x + 1


def test_map_returns_one_result_per_item_in_order() -> None:
    """Results come in input order, each with its index and value."""
    results = procorch.map(square, range(10), concurrency=2)
    assert [r.value for r in results] == [x * x for x in range(10)]
    assert [r.index for r in results] == list(range(10))
    assert all(r.success and r.error is None for r in results)


def test_map_survives_a_segfault_on_one_item() -> None:
    """The item that segfaults fails alone, its error saying so; the others succeed."""
    results = procorch.map(lambda x: crash_on(x, 3), range(6), concurrency=2)
    bad = results[3]
    assert not bad.success and bad.value is None
    assert bad.error is not None and bad.error.kind == "crash" and bad.error.signal == "SIGSEGV"
    assert [r.value for r in results if r.index != 3] == [0, 1, 2, 4, 5]


@pytest.mark.slow
def test_map_reports_exceptions_and_time_limits_as_results() -> None:
    """An exception and a time limit each fail their own item, with a StepError."""
    results = procorch.map(fail_on_two, [0, 1, 2, 3])
    assert results[2].error is not None
    assert results[2].error.kind == "exception"
    assert results[2].error.exception_type == "ValueError"
    assert "two is bad" in results[2].error.message
    slow = procorch.map(lambda s: sleep_then(0, s), [0.0, 3600.0], step_timeout=1.0)
    assert slow[0].success
    assert slow[1].error is not None and slow[1].error.kind == "timeout"


def test_map_fails_an_unpicklable_item_alone() -> None:
    """An item that cannot be pickled fails its own result, naming why."""
    results = procorch.map(type, [1, threading.Lock(), "x"])
    assert results[0].value is int and results[2].value is str
    assert results[1].error is not None and "cannot be pickled" in results[1].error.message


def test_imap_yields_lazily_and_can_be_ordered() -> None:
    """imap reads a generator and yields every item, as completed or in order."""
    unordered = list(procorch.imap(square, (x for x in range(20)), concurrency=3))
    assert sorted(r.index for r in unordered) == list(range(20))
    ordered = procorch.imap(square, (x for x in range(20)), ordered=True)
    assert [r.value for r in ordered] == [x * x for x in range(20)]


def test_imap_closed_early_stops_the_rest() -> None:
    """Breaking out of imap stops the calls left (no worker outlives the test)."""
    results = procorch.imap(sleep_then, [], concurrency=2)
    assert list(results) == []
    stream = procorch.imap(lambda x: sleep_then(x, 0.2 if x == 0 else 3600), range(4))
    first = next(stream)
    assert isinstance(first, MapResult) and first.value == 0
    stream.close()


def test_map_events_and_guards_are_the_entry_points() -> None:
    """Events arrive as for the other entry points; a misspelt guard is refused."""
    events: list[object] = []
    procorch.map(square, range(3), events=events.append)
    assert sum(isinstance(e, StepFinished) for e in events) == 3
    with pytest.raises(TypeError, match="unknown guard 'step_timout'"):
        procorch.map(square, range(3), step_timout=1.0)  # type: ignore[call-arg]


@pytest.mark.slow
def test_map_large_items_round_trip_byte_exact() -> None:
    """A 50 MiB bytes item reaches the function and its result comes back unchanged."""
    blob = os.urandom(50 * 2**20)
    results = procorch.map(identity, [blob, b"small"], concurrency=2)
    assert [r.success for r in results] == [True, True]
    assert results[0].value == blob and results[1].value == b"small"


def test_map_items_travel_as_raw_bytes_not_base64() -> None:
    """An item's wire bytes are its pickle plus a little, not base64 text."""
    from procorch._map import _specs

    blob = os.urandom(4 * 2**20)
    (spec,) = _specs("identity", [blob])
    assert spec.prompt == ""
    assert len(blob) < len(msgspec.msgpack.encode(spec)) < len(blob) + 4096


def test_map_max_tasks_per_child_bounds_items_per_worker() -> None:
    """max_tasks_per_child is a guard of map too: no worker runs more than N items."""
    results = procorch.map(pid_of, range(10), concurrency=2, max_tasks_per_child=3)
    assert [r.value[0] for r in results if r.value is not None] == list(range(10))
    calls_per_pid = Counter(r.value[1] for r in results if r.value is not None)
    assert max(calls_per_pid.values()) <= 3, calls_per_pid


@pytest.mark.slow
def test_map_idle_timeout_retires_the_warm_workers_after_the_call() -> None:
    """The workers a call gives back exit after its idle_timeout; the next call forks new ones."""
    first = {r.value[1] for r in procorch.map(pid_of, range(4), concurrency=2, idle_timeout=0.5)}
    assert gone(first, within=60)
    again = {r.value[1] for r in procorch.map(pid_of, range(4), concurrency=2)}
    assert not again & first
