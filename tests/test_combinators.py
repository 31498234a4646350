"""The pipeline and the loop, on real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    FaultyExecutor,
    SeedExecutor,
    SlowAgentExecutor,
    peak_overlap,
    read_records,
    spec,
)

from procorch import (
    AgentStepSpec,
    Event,
    StepOutcome,
    execute_loop,
    execute_pipeline,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


def _stage(  # type: ignore[no-untyped-def]
    number: int, agent: str = "explore", received: list[tuple[str, int, str | None]] | None = None
):
    """A stage building spec '<item>-s<number>' for every item.

    With ``received``, it notes (item, stage number, the previous outcome's task_id): an
    ``assert`` here would only become a failed outcome, which the pipeline carries on.
    """

    def build(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        if received is not None:
            received.append((item, number, None if previous is None else previous.task_id))
        return spec(f"{item}-s{number}", agent)

    return build


def test_pipeline_returns_each_items_last_outcome_in_input_order(tmp_path: Path) -> None:
    """Every item runs through every stage; its result is its last stage's outcome."""
    received: list[tuple[str, int, str | None]] = []
    stages = [_stage(number, received=received) for number in range(3)]
    out = execute_pipeline(SeedExecutor(4, tmp_path), ["a", "b", "c"], stages)
    assert sorted(received) == [
        (item, number, None if number == 0 else f"{item}-s{number - 1}")
        for item in "abc"
        for number in range(3)
    ]  # each stage was handed its item's previous outcome
    assert [o.task_id for o in out if o is not None] == ["a-s2", "b-s2", "c-s2"]
    assert all(o is not None and o.success for o in out)
    assert len(read_records(tmp_path)) == 9


@pytest.mark.slow
def test_pipeline_has_no_barrier_between_stages(tmp_path: Path) -> None:
    """A fast item finishes its last stage before a slow item's first stage ends."""

    def first(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"{item}-s0", "slow" if item == "slow" else "fast")

    executor = SlowAgentExecutor(2, tmp_path, sleep=0.05)
    out = execute_pipeline(executor, ["slow", "fast"], [first, _stage(1), _stage(2)])
    assert all(o is not None and o.success for o in out)
    records = {r["task_id"]: r for r in read_records(tmp_path)}
    assert records["fast-s2"]["end"] < records["slow-s0"]["end"]


def test_pipeline_stops_a_chain_when_a_stage_returns_none(tmp_path: Path) -> None:
    """A stage returning None ends that chain; None from the first stage gives None."""

    def first(previous: StepOutcome | None, item: str) -> AgentStepSpec | None:
        return None if item == "skip" else spec(f"{item}-s0")

    def second(previous: StepOutcome | None, item: str) -> AgentStepSpec | None:
        return None if item == "short" else spec(f"{item}-s1")

    out = execute_pipeline(SeedExecutor(2, tmp_path), ["skip", "short", "long"], [first, second])
    assert out[0] is None
    assert out[1] is not None and out[1].task_id == "short-s0"
    assert out[2] is not None and out[2].task_id == "long-s1"


def test_pipeline_stops_a_chain_when_a_step_fails(tmp_path: Path) -> None:
    """A failed step ends its chain; the other chains go on."""
    calls: list[str] = []

    def second(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        calls.append(item)
        return spec(f"{item}-s1", "fail" if item == "bad" else "explore")

    def third(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        calls.append(f"{item}-third")
        return spec(f"{item}-s2")

    out = execute_pipeline(SeedExecutor(2, tmp_path), ["bad", "good"], [_stage(0), second, third])
    assert out[0] is not None and not out[0].success and out[0].task_id == "bad-s1"
    assert out[1] is not None and out[1].success and out[1].task_id == "good-s2"
    assert "bad-third" not in calls


def test_pipeline_stage_that_raises_fails_only_its_chain(tmp_path: Path) -> None:
    """A stage function raising is reported on its chain's result alone."""

    def second(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        if item == "bad":
            raise KeyError("no such field")
        return spec(f"{item}-s1")

    out = execute_pipeline(SeedExecutor(2, tmp_path), ["bad", "good"], [_stage(0), second])
    bad = out[0]
    assert bad is not None and not bad.success and bad.error is not None
    assert bad.task_id == "bad-s0"
    assert "stage 1 of pipeline item 0 raised KeyError" in bad.output
    assert out[1] is not None and out[1].success


def test_pipeline_stage_returning_a_bad_spec_fails_its_chain(tmp_path: Path) -> None:
    """A stage that returns something other than a valid spec fails its chain."""

    def first(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        return {"task_id": item} if item == "bad" else spec(item)  # type: ignore[return-value]

    out = execute_pipeline(SeedExecutor(2, tmp_path), ["bad", "good"], [first])
    assert out[0] is not None and "built a bad spec: expected an AgentStepSpec, got dict" in (
        out[0].output
    )
    assert out[1] is not None and out[1].success


def test_pipeline_crash_isolates_to_its_chain() -> None:
    """A step that segfaults fails its chain alone, labelled as a crash."""

    def first(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"{item}-s0", "segfault" if item == "x" else "ok")

    def second(previous: StepOutcome | None, item: str) -> AgentStepSpec:
        return spec(f"{item}-s1")

    out = execute_pipeline(FaultyExecutor(hint=2), ["x", "y", "z"], [first, second])
    assert out[0] is not None and out[0].error is not None and out[0].error.kind == "crash"
    assert out[0].task_id == "x-s0"
    assert [o.task_id for o in out[1:] if o is not None and o.success] == ["y-s1", "z-s1"]


def test_pipeline_never_exceeds_the_hint(tmp_path: Path) -> None:
    """Six chains of three stages with hint 2 never run more than 2 steps at once."""
    executor = SeedExecutor(2, tmp_path, sleep=0.05)
    execute_pipeline(executor, [str(i) for i in range(6)], [_stage(0), _stage(1), _stage(2)])
    records = read_records(tmp_path)
    assert len(records) == 18
    assert peak_overlap(records) == 2


def test_pipeline_needs_stages(tmp_path: Path) -> None:
    """An empty list of stages is refused."""
    with pytest.raises(ValueError, match="stages must name at least one stage"):
        execute_pipeline(SeedExecutor(2, tmp_path), ["a"], [])


# -- the loop -------------------------------------------------------------------


def test_loop_runs_until_next_says_stop(tmp_path: Path) -> None:
    """Rounds go on while next returns specs; the last round's outcomes come back."""
    rounds: list[list[str]] = []

    def following(outcomes: list[StepOutcome]) -> list[AgentStepSpec] | None:
        rounds.append([o.task_id for o in outcomes])
        return None if len(rounds) == 3 else [spec(f"r{len(rounds)}-{i}") for i in range(2)]

    out = execute_loop(SeedExecutor(2, tmp_path), [spec("r0-0")], 10, following)
    assert rounds == [["r0-0"], ["r1-0", "r1-1"], ["r2-0", "r2-1"]]
    assert [o.task_id for o in out] == ["r2-0", "r2-1"]


def test_loop_stops_at_the_hard_cap(tmp_path: Path) -> None:
    """A predicate that never says stop is cut off by max_iterations."""
    counter = iter(range(100))
    out = execute_loop(
        SeedExecutor(2, tmp_path), [spec("x0")], 3, lambda _: [spec(f"x{next(counter) + 1}")]
    )
    assert [o.task_id for o in out] == ["x2"]
    assert len(read_records(tmp_path)) == 3


def test_loop_stops_on_an_empty_round(tmp_path: Path) -> None:
    """A round with no specs ends the loop, returning the round before it."""
    out = execute_loop(SeedExecutor(2, tmp_path), [spec("only")], 5, lambda _: [])
    assert [o.task_id for o in out] == ["only"]


def test_loop_needs_at_least_one_iteration(tmp_path: Path) -> None:
    """max_iterations below 1 is refused."""
    with pytest.raises(ValueError, match=r"max_iterations must be >= 1 \(got 0\)"):
        execute_loop(SeedExecutor(2, tmp_path), [spec("a")], 0, lambda _: None)


def test_pipeline_events_name_the_items_position(tmp_path: Path) -> None:
    """Every event of an item's chain carries the item's position in the input."""
    seen: list[Event] = []
    execute_pipeline(
        SeedExecutor(2, tmp_path), ["a", "b", "c"], [_stage(0), _stage(1)], events=seen.append
    )
    assert {(e.task_id, e.index) for e in seen} == {
        (f"{item}-s{stage}", position) for position, item in enumerate("abc") for stage in range(2)
    }
