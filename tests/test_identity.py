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
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from fault_executors import (
    UNENCODABLE_EVENT_DATA,
    EmitterExecutor,
    IdentityExecutor,
    LaneExecutor,
    StdioExecutor,
)
from helpers import GuardExecutor, gone, running, spec

import procorch
from procorch import (
    AgentStepSpec,
    CancelToken,
    Event,
    RetryPolicy,
    StepCrashed,
    StepFinished,
    StepOutcome,
    StepProgress,
    StepRerun,
    StepStarted,
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
    # It prints (with the surrogate escaped), so it is the step's own exception.
    "surrogate_exception": ({"exception"}, ["ValueError", "cannot open caf\\udce9.txt"]),
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


# -- events whose data cannot be encoded -------------------------------------------------


@pytest.mark.parametrize("kind", sorted(UNENCODABLE_EVENT_DATA))
def test_unencodable_event_data_raises_in_the_step_which_may_go_on(kind: str) -> None:
    """emit() raises TypeError for data it cannot encode; a step that catches it succeeds."""
    seen: list[Event] = []
    specs = [spec("a"), spec("x", f"catch:{kind}"), spec("b")]
    out = _bounded(execute_steps_parallel, EmitterExecutor(), specs, events=seen.append)
    for outcome, step in zip(out, specs, strict=True):
        assert outcome.task_id == step.task_id and outcome.success, outcome.output
        assert outcome.output == f"ran: {step.prompt}"
    caught = out[1].structured["caught"]
    assert caught is not None, "emit() accepted data it cannot encode"
    assert caught["type"] == "TypeError", caught
    assert "event data must be encodable by msgspec" in caught["message"]
    progress = [e.data for e in seen if isinstance(e, StepProgress) and e.task_id == "x"]
    assert progress == ["before", "after"]
    problems = _grammar_problems(seen, specs, out)
    assert not problems, problems


@pytest.mark.parametrize("kind", sorted(UNENCODABLE_EVENT_DATA))
def test_unencodable_event_data_left_uncaught_fails_its_step(kind: str) -> None:
    """A step that lets emit()'s error through fails as its own exception, named as such."""
    specs = [spec("a"), spec("x", f"let:{kind}"), spec("b")]
    out = _bounded(execute_steps_parallel, EmitterExecutor(), specs)
    assert out[0].success and out[2].success
    assert out[1].task_id == "x" and out[1].error is not None
    assert out[1].error.kind == "exception", out[1].output
    assert "event data must be encodable by msgspec" in out[1].error.message


# -- a frozen worker ------------------------------------------------------------------------


def _warm_workers() -> set[int]:
    """Our worker processes: descendants other than the resource trackers and the fork server."""
    me = os.getpid()
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "resource_tracker" in command:
                continue
            if child.ppid() == me and "forkserver" in command:
                continue
        except psutil.NoSuchProcess:
            continue
        found.add(child.pid)
    return found


def _warm_up_two_workers(executor: LaneExecutor) -> list[int]:
    """Run one step on each of two fresh lanes, left warm; their workers' pids."""
    procorch.shutdown()
    first = _bounded(execute_steps_parallel, executor, [spec("m1", "meet"), spec("m2", "meet")])
    assert all(o.success for o in first)
    pids = sorted({o.structured["pid"] for o in first})
    assert len(pids) == 2
    assert set(pids) <= _warm_workers()
    return pids


@pytest.mark.slow
@pytest.mark.parametrize(
    ("guard", "frozen_count"),
    [({"step_timeout": 2.0}, 1), ({"step_timeout": 2.0}, 2), ({"call_timeout": 30.0}, 1)],
    ids=["step_timeout-one_frozen", "step_timeout-both_frozen", "call_timeout-one_frozen"],
)
def test_frozen_idle_worker_is_replaced_and_costs_no_attempt(
    tmp_path: Path, guard: dict[str, float], frozen_count: int
) -> None:
    """A warm worker stopped between calls: its step runs elsewhere, as attempt 1, and succeeds."""
    executor = LaneExecutor(str(tmp_path))
    frozen = set(_warm_up_two_workers(executor)[:frozen_count])
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    seen: list[Event] = []
    specs = [spec(f"s{i}") for i in range(6)]
    call = _Background(execute_steps_parallel, executor, specs, events=seen.append, **guard)
    try:
        out = call.result()
    finally:
        _kill(frozen)  # unblocks a hung call, whose lanes then end normally
        call.finish()
    _assert_all_own(out, specs)
    started = [e for e in seen if isinstance(e, StepStarted)]
    assert sorted(e.task_id for e in started) == sorted(s.task_id for s in specs)
    assert all(e.attempt == 1 for e in started)
    assert not frozen & {e.pid for e in started}


@pytest.mark.slow
def test_worker_frozen_while_running_times_out_alone(tmp_path: Path) -> None:
    """A step that stops its own worker fails as timeout; the other steps succeed."""
    executor = LaneExecutor(str(tmp_path))
    specs = [spec("a"), spec("x", "freeze"), spec("b"), spec("c"), spec("d")]
    call = _Background(execute_steps_parallel, executor, specs, step_timeout=2.0)
    try:
        out = call.result()
    finally:
        _kill(executor.pids("frozen"))
        call.finish()
    frozen = out[1]
    assert frozen.task_id == "x" and not frozen.success and frozen.error is not None
    assert frozen.error.kind == "timeout", frozen.output
    assert frozen.error.limit == 2.0
    assert executor.pids("frozen") == {frozen.error.pid}
    _assert_all_own([out[0], *out[2:]], [specs[0], *specs[2:]])


# -- a slow events consumer -----------------------------------------------------------------

CONSUMER_DELAY = 2.0  # seconds the slow consumer spends on each event it dwells on


@pytest.mark.slow
@pytest.mark.parametrize("dwell_on", ["every_event", "StepStarted"])
def test_slow_events_consumer_never_turns_finished_steps_into_timeouts(
    tmp_path: Path, dwell_on: str
) -> None:
    """A consumer taking 2 s per event, steps of 0.1 s, a 1 s limit: every step succeeds."""
    seen: list[Event] = []

    def slow_consumer(event: Event) -> None:
        seen.append(event)
        if dwell_on == "every_event" or isinstance(event, StepStarted):
            time.sleep(CONSUMER_DELAY)  # the slowness under test, not a wait for something

    specs = [spec("a", "nap"), spec("b", "nap"), spec("c", "nap")]
    out = _bounded(
        execute_steps_parallel,
        LaneExecutor(str(tmp_path)),
        specs,
        events=slow_consumer,
        step_timeout=1.0,
    )
    for outcome, step in zip(out, specs, strict=True):
        assert outcome.task_id == step.task_id
        assert outcome.success, outcome.output
    finished = [e for e in seen if isinstance(e, StepFinished)]
    assert sorted(e.task_id for e in finished) == ["a", "b", "c"]
    # Measured in the worker: the consumer's delay is not part of a step's duration.
    assert all(e.duration < CONSUMER_DELAY for e in finished), finished


@pytest.mark.slow
@pytest.mark.parametrize(
    "guard", [{"call_timeout": 3.0}, {"step_timeout": 1.0}], ids=["call_timeout", "step_timeout"]
)
def test_slow_stream_consumer_never_turns_finished_steps_into_timeouts(
    tmp_path: Path, guard: dict[str, float]
) -> None:
    """A stream consumer dwelling past the limit while a step finishes: that step succeeds."""
    limit = next(iter(guard.values()))
    specs = [spec("quick"), spec("late", "late")]

    def consume() -> dict[int, StepOutcome]:
        outcomes = {}
        begin = time.monotonic()  # the limits start later, when the stream opens
        for index, outcome in stream_steps_parallel(LaneExecutor(str(tmp_path)), specs, **guard):
            outcomes[index] = outcome
            if len(outcomes) == 1:
                deadline = time.monotonic() + BOUND
                while not (tmp_path / "late-late").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                # Dwell until the limit is long past: the late step's Done is in its pipe.
                while time.monotonic() < begin + limit + 1.0:
                    time.sleep(0.05)
        return outcomes

    outcomes = _bounded(consume)
    assert sorted(outcomes) == [0, 1]
    _assert_all_own([outcomes[0]], [specs[0]])
    late = outcomes[1]
    assert late.task_id == "late"
    assert late.success, late.output


class ConsumerError(Exception):
    """What the raising events consumer raises."""


@pytest.mark.parametrize(
    ("raise_on", "guard"),
    [
        ("StepStarted", {"step_timeout": 30.0, "call_timeout": 60.0}),
        pytest.param("StepFinished", {"step_timeout": 1.0}, marks=pytest.mark.slow),
        pytest.param("StepFinished", {"call_timeout": 2.0}, marks=pytest.mark.slow),
    ],
    ids=["started-with-limits", "finished-after-step-timeout", "finished-after-call-timeout"],
)
def test_raising_events_consumer_with_time_limits_raises_and_leaves_nothing(
    tmp_path: Path, raise_on: str, guard: dict[str, float]
) -> None:
    """The consumer's exception ends the call and reaches the caller; no worker is left hanging."""
    hanging: set[int] = set()

    def raising_consumer(event: Event) -> None:
        if isinstance(event, StepStarted) and event.task_id.startswith("h"):
            hanging.add(event.pid)
        if type(event).__name__ == raise_on and event.task_id == "h1":
            raise ConsumerError(f"the consumer gave up on {type(event).__name__}")

    specs = [spec("h1", "c_hang"), spec("h2", "c_hang"), spec("a"), spec("b")]
    with pytest.raises(ConsumerError, match=f"the consumer gave up on {raise_on}"):
        _bounded(
            execute_steps_parallel,
            GuardExecutor(str(tmp_path), hint=2),
            specs,
            events=raising_consumer,
            **guard,
        )
    assert hanging
    assert gone(hanging), f"workers still running: {[p for p in hanging if running(p)]}"
    out = _bounded(execute_steps_parallel, GuardExecutor(str(tmp_path)), [spec("c"), spec("d")])
    assert all(o.success for o in out)


# -- a step that breaks its own output ----------------------------------------------------

BREAKERS = [
    "close_stdout",
    "close_stderr",
    "close_fd1",
    "close_fd2",
    "stdout_none",
    "stdout_bad_flush",
]


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capture_output"])
@pytest.mark.parametrize("breaker", BREAKERS)
def test_step_that_breaks_its_output_keeps_its_own_error(breaker: str, capture: bool) -> None:
    """A step that closes or replaces its stdout/stderr, then raises, fails with its exception."""
    [outcome] = _bounded(
        execute_steps_parallel, StdioExecutor(), [spec("x", breaker)], capture_output=capture
    )
    assert outcome.task_id == "x" and not outcome.success and outcome.error is not None
    assert outcome.error.kind == "exception", outcome.output
    assert outcome.error.exception_type == "StepOwnError"
    assert "raised StepOwnError: own error of x" in outcome.error.message
    assert outcome.error.traceback is not None and "StepOwnError" in outcome.error.traceback


@pytest.mark.parametrize("breaker", BREAKERS)
def test_step_that_breaks_captured_output_leaves_later_steps_alone(breaker: str) -> None:
    """With capture_output, steps run after it on the same worker print and succeed as usual."""
    # Capture points fds 1 and 2 at the lane's file at each step start
    # (docs/design.md), so what one step did to them is not the next one's problem.
    specs = [spec("x", breaker), spec("a"), spec("b"), spec("c")]
    out = _bounded(execute_steps_parallel, StdioExecutor(hint=1), specs, capture_output=True)
    assert out[0].task_id == "x" and not out[0].success  # how: the test above
    _assert_all_own(out[1:], specs[1:])


# -- the events grammar -------------------------------------------------------------------


def _grammar_problems(
    events: list[Event], specs: list[AgentStepSpec], outcomes: list[StepOutcome]
) -> list[str]:
    """Where a step's events break ``Started Progress* [Crashed] (Rerun Started ...)* Finished``.

    A step that never started has no events at all (and must have been
    cancelled); one that started ends in exactly one StepFinished, matching its
    outcome's success, and nothing follows it.
    """
    problems = []
    by_index: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        by_index[event.index].append(event)
    for index in sorted(set(by_index) - set(range(len(specs)))):
        problems.append(f"events for index {index}, which no spec has")
    for index, (step, outcome) in enumerate(zip(specs, outcomes, strict=True)):
        sequence = by_index.get(index, [])
        names = [f"{type(e).__name__}({e.attempt})" for e in sequence]
        where = f"[{index}] {step.task_id}: {names}"
        if any(e.task_id != step.task_id for e in sequence):
            problems.append(f"{where}: events name another task_id")
        if not sequence:
            if outcome.error is None or outcome.error.kind != "cancelled":
                problems.append(f"[{index}] {step.task_id}: no events, yet it did not start")
            continue
        state, attempt = "new", 1
        for event in sequence:
            if state == "finished":
                problems.append(f"{where}: an event after StepFinished")
                break
            expected: tuple[type, ...]
            if state == "new":
                expected = (StepStarted,)
            elif state == "running":
                expected = (StepProgress, StepCrashed, StepRerun, StepFinished)
            elif state == "crashed":
                expected = (StepRerun, StepFinished)
            else:  # rerun: the next attempt starts, or the step ends while it waits
                expected = (StepStarted, StepFinished)
            if not isinstance(event, expected):
                problems.append(f"{where}: {type(event).__name__} where {state}")
                break
            if isinstance(event, StepRerun):
                attempt += 1
            allowed = {attempt, attempt - 1} if state == "rerun" else {attempt}
            if event.attempt not in allowed:
                problems.append(f"{where}: attempt {event.attempt}, expected {attempt}")
                break
            if isinstance(event, StepStarted):
                state = "running"
            elif isinstance(event, StepCrashed):
                state = "crashed"
            elif isinstance(event, StepRerun):
                state = "rerun"
            elif isinstance(event, StepFinished):
                state = "finished"
                if event.success != outcome.success:
                    problems.append(f"{where}: StepFinished success {event.success}")
        if state != "finished" and not any(p.startswith(where) for p in problems):
            problems.append(f"{where}: no StepFinished")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["retries", "call_timeout", "cancel"])
def test_events_grammar_on_every_path(tmp_path: Path, scenario: str) -> None:
    """Successes, exceptions, crashes, timeouts, retries and cancellation: one StepFinished each."""
    executor = GuardExecutor(str(tmp_path), hint=2, succeed_on=2)
    seen: list[Event] = []
    token = CancelToken()

    def consumer(event: Event) -> None:
        seen.append(event)
        if scenario == "cancel" and isinstance(event, StepStarted) and event.task_id == "hang":
            token.cancel()

    specs = [
        spec("ok1"),
        spec("raise", "always_raise"),
        spec("crash", "always_crash"),
        spec("flaky", "flaky"),
        spec("ok2"),
        spec("hang", "c_hang"),
        spec("ok3"),
        spec("ok4"),
    ]
    guards: dict[str, Any] = {"retry": RetryPolicy(attempts=2, backoff=0.05)}
    if scenario == "retries":
        guards["step_timeouts"] = {"hang": 1.0}
    elif scenario == "call_timeout":
        guards["call_timeout"] = 8.0
    else:
        guards["cancel"] = token
    out = _bounded(execute_steps_parallel, executor, specs, events=consumer, **guards)
    assert [o.task_id for o in out] == [s.task_id for s in specs]
    problems = _grammar_problems(seen, specs, out)
    assert not problems, problems
    if scenario == "retries":
        kinds = [o.error.kind if o.error else None for o in out]
        assert kinds == [None, "exception", "crash", None, None, "timeout", None, None]


@pytest.mark.parametrize("how", ["cancel", pytest.param("call_timeout", marks=pytest.mark.slow)])
def test_step_stopped_during_its_retry_backoff_finishes_exactly_once(
    tmp_path: Path, how: str
) -> None:
    """Cancelled (or out of time) while waiting to be retried: one StepFinished, then nothing."""
    token = CancelToken()
    seen: list[Event] = []

    def consumer(event: Event) -> None:
        seen.append(event)
        kinds = {(type(e).__name__, e.task_id) for e in seen}
        if how == "cancel" and {("StepRerun", "never"), ("StepFinished", "ok")} <= kinds:
            token.cancel()  # 'never' now waits out its backoff; 'ok' is done

    guards: dict[str, Any] = {"retry": RetryPolicy(attempts=3, backoff=600.0)}
    guards.update({"cancel": token} if how == "cancel" else {"call_timeout": 3.0})
    specs = [spec("never", "always_raise"), spec("ok")]
    out = _bounded(
        execute_steps_parallel, GuardExecutor(str(tmp_path)), specs, events=consumer, **guards
    )
    never = out[0]
    assert never.task_id == "never" and not never.success and never.error is not None
    assert never.error.kind == "cancelled", never.output
    assert out[1].success
    names = [type(e).__name__ for e in seen if e.task_id == "never"]
    assert names[:2] == ["StepStarted", "StepRerun"]
    assert names.count("StepFinished") == 1, names
    assert names[-1] == "StepFinished", names
    problems = _grammar_problems(seen, specs, out)
    assert not problems, problems


def test_stream_closed_early_finishes_its_started_steps(tmp_path: Path) -> None:
    """Breaking out of a stream stops its running steps, each ending with one StepFinished."""
    seen: list[Event] = []
    specs = [spec("quick", "meet"), spec("h1", "meet_then_hang"), spec("h2", "meet_then_hang")]

    def take_first() -> tuple[int, StepOutcome]:
        executor = LaneExecutor(str(tmp_path), hint=3, parties=3)
        for index, outcome in stream_steps_parallel(executor, specs, events=seen.append):
            return index, outcome  # closes the stream with two steps still running
        raise AssertionError("the stream yielded nothing")

    index, outcome = _bounded(take_first)
    assert index == 0 and outcome.success
    started = {e.task_id for e in seen if isinstance(e, StepStarted)}
    assert started & {"h1", "h2"}, "the hanging steps had not started: nothing to check"
    for task_id in sorted(started):
        names = [type(e).__name__ for e in seen if e.task_id == task_id]
        assert names.count("StepFinished") == 1 and names[-1] == "StepFinished", (task_id, names)
