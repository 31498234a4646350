"""Identity: every outcome and event belongs to the step it names, whatever goes wrong.

The faults: results, exceptions and output a worker cannot encode; a worker
frozen (SIGSTOP) while idle or while running; a slow or raising events
consumer; a step that breaks its own standard output before raising; and the
events grammar (exactly one StepFinished per started step) on every path.

Each call runs in a daemon thread joined with a generous bound, so a call
that hangs fails its test instead of blocking the run; the bound guards
against hangs and is no speed claim.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fault_executors import (
    IdentityExecutor,
)
from helpers import spec

from procorch import (
    AgentStepSpec,
    StepOutcome,
    execute_steps_parallel,
    stream_steps_parallel,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

BOUND = 60.0  # seconds a call may take before the test calls it hung


class _Background:
    """A call running in a daemon thread, so that a hang fails the test rather than blocks it."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.name = getattr(fn, "__name__", repr(fn))
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as exc:
            self._error = exc

    def result(self, bound: float = BOUND) -> Any:
        """The call's return value (or its exception); a test failure if it is not back in time."""
        self._thread.join(bound)
        if self._thread.is_alive():
            pytest.fail(f"{self.name} did not return within {bound:g} s")
        if self._error is not None:
            raise self._error
        return self._value

    def finish(self, within: float = BOUND) -> None:
        """Give a call unblocked by the test's clean-up the time to end."""
        self._thread.join(within)


def _bounded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, failing the test if it does not return within BOUND."""
    return _Background(fn, *args, **kwargs).result()


def _streamed(executor: Any, specs: list[AgentStepSpec], **kwargs: Any) -> list[StepOutcome]:
    """stream_steps_parallel's outcomes put back in input order, each index yielded once."""
    outcomes: dict[int, StepOutcome] = {}
    for index, outcome in stream_steps_parallel(executor, specs, **kwargs):
        assert index not in outcomes, f"index {index} was yielded twice"
        outcomes[index] = outcome
    assert sorted(outcomes) == list(range(len(specs)))
    return [outcomes[index] for index in range(len(specs))]


RUNNERS = {"barrier": execute_steps_parallel, "stream": _streamed}


def _own_problems(outcome: StepOutcome, step: AgentStepSpec) -> list[str]:
    """How ``outcome`` fails to be the ordinary outcome of ``step`` (an 'ok' step)."""
    problems = []
    if outcome.task_id != step.task_id:
        problems.append(f"task_id {outcome.task_id!r}")
    if outcome.agent != step.agent:
        problems.append(f"agent {outcome.agent!r}")
    if outcome.session_id != f"task-run-{step.task_id}":
        problems.append(f"session_id {outcome.session_id!r}")
    if not outcome.success or outcome.error is not None:
        problems.append(f"failed: {outcome.output[:150]!r}")
    elif outcome.output != f"ran: {step.prompt}":
        problems.append(f"output {outcome.output[:60]!r}")
    return problems


def _assert_all_own(outcomes: list[StepOutcome], specs: list[AgentStepSpec]) -> None:
    """Every outcome is the ordinary, successful outcome of the spec at its index."""
    assert len(outcomes) == len(specs)
    wrong = [
        f"[{i}] {s.task_id}: {'; '.join(p)}"
        for i, (o, s) in enumerate(zip(outcomes, specs, strict=True))
        if (p := _own_problems(o, s))
    ]
    assert not wrong, f"{len(wrong)} of {len(specs)} outcomes are wrong: {wrong[:5]}"


def _kill(pids: set[int]) -> None:
    """SIGKILL processes a test stopped or left hanging (a stopped process dies too)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- outcomes that cannot be encoded ---------------------------------------------------

# fault -> (accepted error kinds, words the error message must hold)
ENCODING_FAULTS: dict[str, tuple[set[str], list[str]]] = {
    "huge_int": ({"serialization", "invalid_result"}, ["OverflowError", "can't serialize ints"]),
    "surrogate_output": (
        {"serialization", "invalid_result"},
        ["UnicodeEncodeError", "surrogates not allowed"],
    ),
    "self_list": ({"serialization", "invalid_result"}, ["RecursionError", "maximum recursion"]),
    "unprintable_exception": (
        {"serialization", "invalid_result"},
        ["UnprintableError", "LookupError", "this exception cannot be printed"],
    ),
    "unrepresentable_exception": (
        {"serialization", "invalid_result"},
        ["UnrepresentableError", "LookupError", "this exception cannot be printed"],
    ),
    "hopeless_exception": (
        {"serialization", "invalid_result"},
        ["HopelessError", "LookupError", "this exception cannot be printed"],
    ),
    "surrogate_exception": (
        {"serialization", "invalid_result"},
        ["UnicodeEncodeError", "surrogates not allowed"],
    ),
    # A control: it prints, so it is the step's exception; nothing pickles it.
    "unpicklable_exception": ({"exception"}, ["UnpicklableError", "unpicklable in"]),
}


def _fault_problems(outcome: StepOutcome, step: AgentStepSpec) -> list[str]:
    """How ``outcome`` fails to be ``step``'s own labelled failure for its encoding fault."""
    kinds, words = ENCODING_FAULTS[step.agent]
    problems = []
    if outcome.task_id != step.task_id:
        problems.append(f"task_id {outcome.task_id!r}")
    if outcome.agent != step.agent:
        problems.append(f"agent {outcome.agent!r}")
    if outcome.success or outcome.error is None:
        problems.append(f"succeeded with output {outcome.output[:60]!r}")
        return problems
    if outcome.error.kind not in kinds:
        problems.append(f"kind {outcome.error.kind!r}: {outcome.output[:150]!r}")
    missing = [word for word in words if word not in outcome.error.message]
    if missing:
        problems.append(f"message lacks {missing}: {outcome.error.message[:150]!r}")
    if f"step {step.task_id!r} (agent {step.agent!r})" not in outcome.output:
        problems.append(f"output does not name the step: {outcome.output[:100]!r}")
    return problems


def _assert_identity(outcomes: list[StepOutcome], specs: list[AgentStepSpec]) -> None:
    """Each outcome is its own step's: culprits failed with their fault, the rest as usual."""
    assert len(outcomes) == len(specs)
    wrong = []
    for index, (outcome, step) in enumerate(zip(outcomes, specs, strict=True)):
        check = _own_problems if step.agent == "ok" else _fault_problems
        problems = check(outcome, step)
        if problems:
            wrong.append(f"[{index}] {step.task_id} ({step.agent}): {'; '.join(problems)}")
    assert not wrong, f"{len(wrong)} of {len(specs)} outcomes are wrong: {wrong[:5]}"


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture_output"])
@pytest.mark.parametrize("fault", sorted(ENCODING_FAULTS))
def test_unencodable_outcome_alone_is_its_steps_failure(fault: str, capture: bool) -> None:
    """A result or exception the worker cannot encode fails its step, labelled, not internal."""
    specs = [spec("solo", fault)]
    out = _bounded(execute_steps_parallel, IdentityExecutor(), specs, capture_output=capture)
    _assert_identity(out, specs)


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture_output"])
@pytest.mark.parametrize("fault", sorted(ENCODING_FAULTS))
def test_unencodable_outcome_in_a_batch_leaves_the_others_alone(fault: str, capture: bool) -> None:
    """One unencodable outcome among ordinary steps on two lanes: only the culprit fails."""
    specs = [spec(f"t{i}", fault if i == 3 else "ok") for i in range(8)]
    out = _bounded(execute_steps_parallel, IdentityExecutor(hint=2), specs, capture_output=capture)
    _assert_identity(out, specs)


def _mixed_specs(count: int = 2000, every: int = 25) -> list[AgentStepSpec]:
    """Quick ordinary steps with every ``every``-th an encoding fault, cycling through them."""
    faults = sorted(ENCODING_FAULTS)
    return [
        spec(f"t{i}", faults[(i // every) % len(faults)] if i % every == every - 1 else "ok")
        for i in range(count)
    ]


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture_output"])
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_unencodable_outcomes_among_thousands_land_on_their_own_steps(
    runner: str, capture: bool
) -> None:
    """2,000 quick steps, every 25th unencodable: every outcome is its own step's, checked."""
    specs = _mixed_specs()
    out = _bounded(RUNNERS[runner], IdentityExecutor(hint=2), specs, capture_output=capture)
    _assert_identity(out, specs)
