"""Shapes built on the barrier's engine: the pipeline and the loop.

Both run their steps through the same dispatcher and pool as
``execute_steps_parallel``, so every guarantee of the core (crash isolation,
guards, events, the concurrency hint) holds inside them. Stage functions and
the loop's ``next`` run in the calling process: they only build specs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, Unpack

from ._call import EventTarget, Guards, add_step, check_spec, prepare_call
from ._errors import InvalidSpecError
from ._executor import Executor
from ._model import AgentStepSpec, StepError, StepOutcome
from ._parallel import execute_steps_parallel

__all__ = ["Stage", "execute_loop", "execute_pipeline"]

Item = TypeVar("Item")

Stage = Callable[[StepOutcome | None, Any], AgentStepSpec | None]
"""A pipeline stage: (previous outcome or None, item) -> next spec, or None to stop."""


def execute_pipeline(
    executor: Executor,
    items: Iterable[Item],
    stages: Sequence[Callable[[StepOutcome | None, Item], AgentStepSpec | None]],
    events: EventTarget | None = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome | None]:
    """Flow each item through the stages, chains running side by side; one result per item.

    Stage *k* receives the item's previous outcome (None for the first stage)
    and the item, and returns the next spec or None to end the chain there.
    There is no barrier between stages: one item can be in stage 3 while
    another is still in stage 1, and all chains together never run more than
    the executor's concurrency hint at once. A chain ends early when a stage
    returns None or a step fails; a stage function that raises (or returns
    something that is not a valid spec) fails only its own chain.

    Returns, in input order, each item's last outcome, or None for an item
    whose first stage produced no spec.
    """
    call = prepare_call(executor, events, guards)
    items = list(items)
    stages = list(stages)
    if not stages:
        raise ValueError("stages must name at least one stage")
    for number, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(f"stages[{number}] must be callable (got {type(stage).__name__})")
    results: list[StepOutcome | None] = [None] * len(items)
    chain_of: dict[int, tuple[int, int]] = {}  # step index -> (item, stage)

    def start_stage(item: int, stage: int, previous: StepOutcome | None) -> None:
        try:
            spec = stages[stage](previous, items[item])
            if spec is None:
                results[item] = previous
                return
            data = check_spec(dispatch.next_index, spec)
        except InvalidSpecError as exc:
            results[item] = _stage_failure(item, stage, previous, f"built a bad spec: {exc.reason}")
            return
        except Exception as exc:
            detail = f"raised {type(exc).__name__}: {exc}"
            results[item] = _stage_failure(item, stage, previous, detail, exc)
            return
        chain_of[add_step(dispatch, spec, data, item)] = (item, stage)

    def advance(index: int, outcome: StepOutcome) -> None:
        item, stage = chain_of.pop(index)
        results[item] = outcome
        if outcome.success and stage + 1 < len(stages) and not dispatch.stopping:
            start_stage(item, stage + 1, outcome)

    dispatch = call.dispatch(
        on_outcome=advance
    )  # kept: a raising consumer's exception carries them
    for item in range(len(items)):
        start_stage(item, 0, None)
    if dispatch.remaining:
        dispatch.run(min(call.limit, len(items)))
    return results


def _stage_failure(
    item: int,
    stage: int,
    previous: StepOutcome | None,
    detail: str,
    exc: BaseException | None = None,
) -> StepOutcome:
    """A failed outcome for a chain whose stage function went wrong."""
    task_id = previous.task_id if previous is not None else f"item-{item}"
    agent = previous.agent if previous is not None else "pipeline"
    message = f"stage {stage} of pipeline item {item} {detail}"
    error = StepError(
        kind="exception",
        message=message,
        exception_type=None if exc is None else type(exc).__qualname__,
        traceback=None if exc is None else "".join(traceback.format_exception(exc)),
        attempts=0,
    )
    return StepOutcome.failed(task_id, agent, message, error)


def execute_loop(
    executor: Executor,
    initial: Iterable[AgentStepSpec],
    max_iterations: int,
    next: Callable[[list[StepOutcome]], Iterable[AgentStepSpec] | None],
    events: EventTarget | None = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome]:
    """Run rounds of the barrier until ``next`` says stop; return the last round's outcomes.

    Round 1 runs ``initial``. After each round, ``next(outcomes)`` returns the
    specs of the following round, or None to stop. The loop also stops when a
    round has no specs, and always after ``max_iterations`` rounds: a hard
    cap, so a predicate that never says stop cannot loop forever.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
        raise TypeError(f"max_iterations must be an int (got {max_iterations!r})")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1 (got {max_iterations})")
    if not callable(next):
        raise TypeError(f"next must be callable (got {type(next).__name__})")
    specs = list(initial)
    outcomes: list[StepOutcome] = []
    for round_number in range(1, max_iterations + 1):
        if not specs:
            break
        outcomes = execute_steps_parallel(executor, specs, events, **guards)
        if round_number == max_iterations:
            break
        following = next(outcomes)
        if following is None:
            break
        specs = list(following)
    return outcomes
