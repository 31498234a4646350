"""The fast paths keep every promise: long chunks, large frames, guards inside a chunk.

Chunks of hundreds of steps, frames of megabytes read straight into one
buffer, a pipe grown while such a frame is in flight: none of it may blur
which step a report, a crash or a time limit belongs to. Real workers
throughout; the chunk sizes and pipe sizes are observed in the calling
process, where the local backend decides them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import HotPathExecutor, spec

from procorch import (
    AgentStepSpec,
    CancelToken,
    Event,
    StepCrashed,
    StepFinished,
    StepProgress,
    StepStarted,
    _pool,
    _protocol,
    execute_steps_parallel,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")


@pytest.fixture
def chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every chunk the local backend sends, in order."""
    sizes: list[int] = []
    submit = _pool._Lane.submit

    def recording(self: Any, token: str, blob: bytes, chunk: Any, *rest: Any) -> Any:
        sizes.append(len(chunk))
        return submit(self, token, blob, chunk, *rest)

    monkeypatch.setattr(_pool._Lane, "submit", recording)
    yield sizes


@pytest.fixture
def pipe_resizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every size a lane's channel was set to (and could be), in order."""
    sizes: list[int] = []
    resize = _protocol._set_pipe_size

    def recording(fd: int, size: int) -> bool:
        done = resize(fd, size)
        if done:
            sizes.append(size)
        return done

    monkeypatch.setattr(_protocol, "_set_pipe_size", recording)
    yield sizes


def _starts(events: list[Event]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for event in events:
        if isinstance(event, StepStarted):
            counts[event.index] = counts.get(event.index, 0) + 1
    return counts


def _chunk_holding(sizes: list[int], index: int) -> int:
    """The size of the chunk that carried step ``index`` (one lane, steps sent in order)."""
    end = 0
    for size in sizes:
        end += size
        if index < end:
            return size
    raise AssertionError(f"step {index} was never sent: {sizes}")


@pytest.mark.parametrize("at", [317, 690])
def test_a_crash_deep_in_a_long_chunk_is_its_own_steps(at: int, chunk_sizes: list[int]) -> None:
    """A segfault anywhere in a chunk of hundreds fails exactly that step; no innocent reruns."""
    specs = [spec(f"s{i}", "segfault" if i == at else "ok") for i in range(1200)]
    events: list[Event] = []
    out = execute_steps_parallel(HotPathExecutor(1), specs, events=events.append)
    assert _chunk_holding(chunk_sizes, at) >= 50, chunk_sizes  # it did travel in a long chunk
    for index, outcome in enumerate(out):
        assert outcome.task_id == f"s{index}"
        if index == at:
            assert outcome.error is not None and outcome.error.kind == "crash", outcome
            assert outcome.error.attempts == 1
            assert "'s" + str(at) + "'" in outcome.output
        else:
            assert outcome.success, outcome
    crashed = [event for event in events if isinstance(event, StepCrashed)]
    assert [event.index for event in crashed] == [at]
    assert set(_starts(events).values()) == {1}  # no step began twice


def test_a_worker_dead_between_two_steps_of_a_chunk_blames_the_step_before(
    chunk_sizes: list[int],
) -> None:
    """A step's Done travels with the next step's Started in one frame (``Next``).

    A worker killed after step k returned but before that frame is written
    (here by a trap step k left in ``sys.stdout``, sprung by the worker's
    own check before step k+1) never reported k's outcome nor began k+1: k
    is the crash, k+1 is given back uncharged and runs elsewhere.
    """
    at = 100
    specs = [spec(f"s{i}", "trap_stdout" if i == at else "ok") for i in range(300)]
    events: list[Event] = []
    out = execute_steps_parallel(HotPathExecutor(1), specs, events=events.append)
    first = 0
    for size in chunk_sizes:  # k and k+1 did travel in one chunk: one frame between them
        if first <= at < first + size:
            assert at + 1 < first + size, chunk_sizes
            break
        first += size
    for index, outcome in enumerate(out):
        assert outcome.task_id == f"s{index}"
        if index == at:
            assert outcome.error is not None and outcome.error.kind == "crash", outcome
            assert outcome.error.signal == "SIGKILL"
            assert outcome.error.attempts == 1
            assert f"'s{at}'" in outcome.output
        else:
            assert outcome.success, outcome
    crashed = [event for event in events if isinstance(event, StepCrashed)]
    assert [event.index for event in crashed] == [at]
    assert set(_starts(events).values()) == {1}  # k+1 began once: on the fresh worker


@pytest.fixture
def coasts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """How long each lane was left unwatched, every time one was (seconds)."""
    from procorch import _local

    windows: list[float] = []
    coast = _local.LocalBackend._coast

    def recording(self: Any, work: Any) -> None:
        coast(self, work)
        if work.coast_until:
            windows.append(work.coast_until - time.monotonic())

    monkeypatch.setattr(_local.LocalBackend, "_coast", recording)
    yield windows


def test_unwatched_lanes_lose_no_report_and_blame_a_crash_on_its_step(
    coasts: list[float],
) -> None:
    """With nobody listening, lanes running queued steps are left out of the wait for a while.

    Their reports wait in the pipe and are read before anything is judged:
    a segfault deep in such a lane fails that step alone, every other step
    keeps its own outcome, and the call ends when its last step does.
    """
    at = 233
    agents = ["segfault" if i == at else "pause" for i in range(400)]
    specs = [AgentStepSpec(f"s{i}", agent, "d", "0.002") for i, agent in enumerate(agents)]
    out = execute_steps_parallel(HotPathExecutor(2), specs)
    assert coasts and max(coasts) > 0  # lanes were left unwatched
    for index, outcome in enumerate(out):
        assert outcome.task_id == f"s{index}"
        if index == at:
            assert outcome.error is not None and outcome.error.kind == "crash", outcome
            assert outcome.error.attempts == 1
            assert f"'s{at}'" in outcome.output
        else:
            assert outcome.success, outcome


@pytest.mark.parametrize("agent", ["pause_emit", "pause_big"])
def test_lanes_that_send_events_or_large_outcomes_are_not_left_unwatched(
    agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane left unwatched leaves its worker blocked once its pipe is full: once
    a lane sent events (even with nobody listening) or an outcome of more than a
    few bytes, it is never left unwatched again in the call."""
    from procorch import _local

    seen: list[tuple[str, int]] = []  # ("loud" | "coast", lane), in order
    coast, on_frame = _local.LocalBackend._coast, _local.LocalBackend._on_frame

    def coasting(self: Any, work: Any) -> None:
        coast(self, work)
        if work.coast_until:
            seen.append(("coast", id(work)))

    def hearing(self: Any, work: Any, frame: Any) -> Any:
        if isinstance(frame, _protocol.Progress) or (
            isinstance(frame, _protocol.Done) and len(frame.outcome.structured or b"") > 1024
        ):
            seen.append(("loud", id(work)))
        return on_frame(self, work, frame)

    monkeypatch.setattr(_local.LocalBackend, "_coast", coasting)
    monkeypatch.setattr(_local.LocalBackend, "_on_frame", hearing)
    specs = [AgentStepSpec(f"s{i}", agent, "d", "0.002") for i in range(200)]
    out = execute_steps_parallel(HotPathExecutor(2), specs)
    assert all(outcome.success for outcome in out)
    loud = {lane for kind, lane in seen if kind == "loud"}
    assert len(loud) == 2, seen  # both lanes sent such frames
    for lane in loud:
        after = seen[seen.index(("loud", lane)) :]
        assert ("coast", lane) not in after, seen


def test_a_large_frame_cut_by_sigkill_is_a_crash_of_its_step(pipe_resizes: list[int]) -> None:
    """A worker killed while writing a 32 MiB frame: that step crashed (SIGKILL), nothing else."""
    specs = [spec(f"s{i}", "cut_big" if i == 5 else "ok") for i in range(40)]
    out = execute_steps_parallel(HotPathExecutor(2), specs)
    for index, outcome in enumerate(out):
        if index == 5:
            assert outcome.error is not None and outcome.error.kind == "crash", outcome
            assert outcome.error.signal == "SIGKILL"
            assert "'s5'" in outcome.output
        else:
            assert outcome.success, outcome
    assert _protocol._LARGE_PIPE_BYTES in pipe_resizes  # the pipe grew for the cut frame


def test_large_outputs_arrive_whole_and_the_pipe_goes_back_to_8_kib(
    pipe_resizes: list[int],
) -> None:
    """Outputs of megabytes between small steps arrive byte for byte; the pipe is 8 KiB after."""
    sizes = {3: 5_000_000, 4: 70_000, 9: 12_345_678}
    specs = [
        AgentStepSpec(f"s{i}", "big", "d", str(sizes[i])) if i in sizes else spec(f"s{i}")
        for i in range(30)
    ]
    out = execute_steps_parallel(HotPathExecutor(2), specs)
    for index, outcome in enumerate(out):
        assert outcome.success, outcome
        if index in sizes:
            assert outcome.structured == b"z" * sizes[index]
    grown = pipe_resizes.count(_protocol._LARGE_PIPE_BYTES)
    assert grown >= 1
    assert pipe_resizes[-1] == _protocol.PIPE_BYTES
    lanes = _pool._engine._idle
    assert lanes and all(
        _protocol.pipe_size(lane.channel.fileno()) == _protocol.PIPE_BYTES for lane in lanes
    )


def test_a_large_event_keeps_its_place_among_the_steps_events() -> None:
    """A 300 KB progress event travels apart, yet every step's events keep their order."""
    specs = [spec(f"s{i}", "emit" if i % 3 == 0 else "ok") for i in range(60)]
    events: list[Event] = []
    out = execute_steps_parallel(HotPathExecutor(2), specs, events=events.append)
    assert all(outcome.success for outcome in out)
    for index in range(0, 60, 3):
        mine = [event for event in events if event.index == index]
        kinds = [type(event).__name__ for event in mine]
        assert kinds == [
            "StepStarted",
            "StepProgress",
            "StepProgress",
            "StepProgress",
            "StepFinished",
        ]
        data = [event.data for event in mine if isinstance(event, StepProgress)]
        assert data == ["first", "m" * 300_000, "last"]


def test_large_prompts_arrive_whole() -> None:
    """Specs too large to keep encoded are encoded again when sent, and arrive intact."""
    prompts = [str(i) * (300_000 + i) for i in range(1, 7)]
    specs = [AgentStepSpec(f"s{i}", "length", "d", p) for i, p in enumerate(prompts)]
    out = execute_steps_parallel(HotPathExecutor(2), specs)
    assert [outcome.output for outcome in out] == [str(len(p)) for p in prompts]


@pytest.mark.slow
def test_a_time_limit_inside_a_long_chunk_does_not_wait_for_the_chunk(
    chunk_sizes: list[int],
) -> None:
    """A step that hangs mid-chunk fails at its own limit; the chunk's other steps succeed."""
    specs = [spec(f"s{i}", "hang" if i == 700 else "ok") for i in range(1000)]
    events: list[Event] = []
    out = execute_steps_parallel(HotPathExecutor(1), specs, events=events.append, step_timeout=2)
    assert max(chunk_sizes) >= 100, chunk_sizes
    for index, outcome in enumerate(out):
        if index == 700:
            assert outcome.error is not None and outcome.error.kind == "timeout", outcome
        else:
            assert outcome.success, outcome
    finished = {e.index: e.duration for e in events if isinstance(e, StepFinished)}
    assert finished[700] < 30  # its limit, not the minute it would have slept


@pytest.mark.slow
def test_a_soft_time_limit_stops_one_step_of_a_long_chunk_only(chunk_sizes: list[int]) -> None:
    """StepTimeout reaches the late step alone; its worker runs the rest of the chunk."""
    specs = [spec(f"s{i}", "swallow" if i == 400 else "ok") for i in range(800)]
    out = execute_steps_parallel(HotPathExecutor(1), specs, step_timeout=1, timeout_grace=20)
    assert max(chunk_sizes) >= 100, chunk_sizes
    late = out[400]
    assert late.error is not None and late.error.kind == "timeout", late
    assert all(outcome.success for index, outcome in enumerate(out) if index != 400)
    pids = {outcome.structured["pid"] for outcome in out[380:420] if outcome.success}
    assert len(pids) == 1  # nobody was killed: the same worker ran on


def test_cancel_stops_a_call_of_long_chunks() -> None:
    """Cancelling mid-call: what finished stays, the rest is cancelled, the call returns."""
    token = CancelToken()
    seen = 0

    def on_event(event: Event) -> None:
        nonlocal seen
        if isinstance(event, StepFinished):
            seen += 1
            if seen == 300:
                token.cancel()

    specs = [spec(f"s{i}", "hang" if i == 1500 else "ok") for i in range(3000)]
    out = execute_steps_parallel(HotPathExecutor(2), specs, events=on_event, cancel=token)
    kinds = {outcome.error.kind for outcome in out if outcome.error is not None}
    assert kinds == {"cancelled"}
    assert sum(outcome.success for outcome in out) >= 300
    assert not out[-1].success


def test_the_pipe_is_back_to_8_kib_after_a_lane_died_mid_frame() -> None:
    """The lane that replaced a worker killed mid-frame starts with an 8 KiB pipe."""
    specs = [spec("a", "cut_big"), *[spec(f"s{i}") for i in range(20)]]
    out = execute_steps_parallel(HotPathExecutor(1), specs)
    assert out[0].error is not None and out[0].error.kind == "crash"
    lanes = _pool._engine._idle
    assert lanes and all(
        _protocol.pipe_size(lane.channel.fileno()) == _protocol.PIPE_BYTES for lane in lanes
    )
    assert all(outcome.success for outcome in out[1:])
