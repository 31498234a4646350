"""The crash matrix: every fault, alone and in company, with real worker processes.

Each test checks which steps failed, their labels and causes, that every
other step succeeded, that the call returned in bounded time (a generous
guard against hangs, not a speed claim), and that no worker process is left
behind after shutdown.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import FaultyExecutor, UnloadableExecutor, gone, run_to_end, spec

from procorch import (
    Event,
    StepCrashed,
    StepFinished,
    StepOutcome,
    StepStarted,
    execute_steps_parallel,
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

BOUND = 60.0  # seconds; far above what any of these needs

# fault -> (error kind, exit code, signal name, words the output must contain)
FAULTS = {
    "segfault": (
        "crash",
        -11,
        "SIGSEGV",
        "killed by SIGSEGV (exit code -11): a segmentation fault",
    ),
    "abort": ("crash", -6, "SIGABRT", "killed by SIGABRT (exit code -6): abort() was called"),
    "sigbus": ("crash", -7, "SIGBUS", "killed by SIGBUS (exit code -7): a bus error"),
    "sigfpe": ("crash", -8, "SIGFPE", "killed by SIGFPE (exit code -8): a fatal arithmetic error"),
    "exit": ("crash", 3, None, "exited with code 3 while running it"),
    "sigkill": ("crash", -9, "SIGKILL", "killed by SIGKILL (exit code -9): something outside"),
    "raise": ("exception", None, None, "raised ValueError: bad input in"),
    "systemexit": ("exception", None, None, "raised SystemExit: 2"),
    "keyboardinterrupt": ("exception", None, None, "raised KeyboardInterrupt"),
    "not_an_outcome": ("invalid_result", None, None, "returned dict, not a StepOutcome"),
    "bad_field": ("invalid_result", None, None, "Expected `bool`, got `str` - at `$.success`"),
    "unsendable": ("serialization", None, None, "cannot be sent back"),
}
FATAL_SIGNALS = {"segfault", "abort", "sigbus", "sigfpe"}


def _timed_run(executor: object, specs: list, **kwargs: object) -> list[StepOutcome]:
    start = time.monotonic()
    out = execute_steps_parallel(executor, specs, **kwargs)
    assert time.monotonic() - start < BOUND
    return out


def _assert_fault(outcome: StepOutcome, task_id: str, fault: str) -> None:
    kind, exit_code, signame, words = FAULTS[fault]
    assert outcome.task_id == task_id
    assert outcome.agent == fault
    assert outcome.session_id == f"task-run-{task_id}"
    assert not outcome.success
    assert outcome.error is not None
    assert outcome.error.kind == kind
    assert outcome.error.exit_code == exit_code
    assert outcome.error.signal == signame
    assert words in outcome.output
    assert f"step {task_id!r} (agent {fault!r})" in outcome.output
    if kind == "crash":
        assert outcome.error.pid is not None and outcome.error.pid != os.getpid()
        assert f"pid {outcome.error.pid}" in outcome.output
    if fault in FATAL_SIGNALS:
        assert outcome.error.traceback is not None
        assert "execute_step" in outcome.error.traceback  # faulthandler saw the step's frame
    if kind == "exception":
        assert outcome.error.traceback is not None and "Traceback" in outcome.error.traceback


def _assert_ok(outcomes: list[StepOutcome], task_ids: list[str]) -> None:
    by_id = {o.task_id: o for o in outcomes}
    for task_id in task_ids:
        assert by_id[task_id].success, by_id[task_id].output
        assert by_id[task_id].output == f"ran: prompt-{task_id}"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_alone_fails_only_its_step(fault: str) -> None:
    """A single faulty step yields its own labelled failure."""
    [outcome] = _timed_run(FaultyExecutor(), [spec("solo", fault)])
    _assert_fault(outcome, "solo", fault)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_in_a_batch_leaves_the_others_alone(fault: str) -> None:
    """One faulty step among ordinary ones: exactly the culprit fails."""
    specs = [spec("a"), spec("b"), spec("bad", fault), spec("c"), spec("d"), spec("e")]
    out = _timed_run(FaultyExecutor(hint=2), specs)
    assert [o.task_id for o in out] == ["a", "b", "bad", "c", "d", "e"]
    _assert_fault(out[2], "bad", fault)
    _assert_ok(out, ["a", "b", "c", "d", "e"])


def test_two_simultaneous_crashes_are_each_attributed(tmp_path: Path) -> None:
    """Two steps that die at the same moment each get their own crash."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    executor = FaultyExecutor(hint=3, barrier_dir=str(barrier), parties=2)
    specs = [spec("x", "segfault"), spec("ok1"), spec("y", "exit"), spec("ok2"), spec("ok3")]
    out = _timed_run(executor, specs)
    _assert_fault(out[0], "x", "segfault")
    _assert_fault(out[2], "y", "exit")
    _assert_ok(out, ["ok1", "ok2", "ok3"])
    assert out[0].error.pid != out[2].error.pid  # type: ignore[union-attr]


def test_crash_on_the_last_step() -> None:
    """A crash in the final step still yields every outcome."""
    specs = [spec(str(i)) for i in range(5)] + [spec("last", "abort")]
    out = _timed_run(FaultyExecutor(hint=2), specs)
    _assert_fault(out[-1], "last", "abort")
    _assert_ok(out, [str(i) for i in range(5)])


@pytest.mark.parametrize("fault", ["segfault", "exit", "sigkill"])
def test_every_step_crashing(fault: str) -> None:
    """A batch where every step kills its worker still returns every outcome."""
    specs = [spec(f"s{i}", fault) for i in range(6)]
    out = _timed_run(FaultyExecutor(hint=2), specs)
    for i, outcome in enumerate(out):
        _assert_fault(outcome, f"s{i}", fault)
    assert len({o.error.pid for o in out}) == 6  # type: ignore[union-attr]


def test_sigkill_from_outside_fails_only_its_step() -> None:
    """A worker killed by another process (as the OOM killer does) fails its step alone."""

    def kill_the_hanging_step(event: Event) -> None:
        if isinstance(event, StepStarted) and event.task_id == "victim":
            os.kill(event.pid, signal.SIGKILL)

    specs = [spec("a"), spec("victim", "hang"), spec("b"), spec("c")]
    out = _timed_run(FaultyExecutor(hint=2), specs, events=kill_the_hanging_step)
    victim = out[1]
    assert not victim.success and victim.error is not None
    assert (victim.error.kind, victim.error.signal, victim.error.exit_code) == (
        "crash",
        "SIGKILL",
        -9,
    )
    assert "out-of-memory killer" in victim.output
    _assert_ok(out, ["a", "b", "c"])


def test_executor_that_cannot_be_rebuilt_fails_every_step() -> None:
    """An executor that raises when unpickled in the worker fails each step, labelled."""
    out = _timed_run(UnloadableExecutor(), [spec("a"), spec("b"), spec("c")])
    for outcome, task_id in zip(out, "abc", strict=True):
        assert not outcome.success and outcome.error is not None
        assert outcome.error.kind == "serialization"
        assert outcome.task_id == task_id
        assert "could not be rebuilt in the worker process" in outcome.output
        assert "this executor refuses to be unpickled" in outcome.output


_HIDDEN_MODULE = """
from procorch import AgentExecutor, StepOutcome

class Hidden(AgentExecutor):
    def execute_step(self, spec, events):
        return StepOutcome(spec.task_id, "session", spec.agent, "ran", True)
"""

_HIDDEN_CALLER = """
import sys
sys.path.insert(0, sys.argv[1])
import hiddenexec  # importable here; the workers' path does not have its folder
sys.path.remove(sys.argv[1])
import cloudpickle
import procorch
from procorch import AgentStepSpec

if sys.argv[2] == "ship":
    cloudpickle.register_pickle_by_value(hiddenexec)
specs = [AgentStepSpec(t, "agent", "d", "p") for t in ("a", "b")]
for outcome in procorch.execute_steps_parallel(hiddenexec.Hidden(), specs):
    print(outcome.task_id, outcome.success, outcome.error and outcome.error.kind, outcome.output)
"""


@pytest.mark.parametrize("ship", [False, True])
def test_executor_module_missing_in_the_worker_says_how_to_ship_it(
    tmp_path: Path, ship: bool
) -> None:
    """A module the workers cannot import fails each step with the way out, which works."""
    hidden, run = tmp_path / "hidden", tmp_path / "run"
    hidden.mkdir()
    run.mkdir()
    (hidden / "hiddenexec.py").write_text(_HIDDEN_MODULE)
    (run / "caller.py").write_text(_HIDDEN_CALLER)
    mode = "ship" if ship else "plain"
    result = run_to_end(
        [sys.executable, "caller.py", str(hidden), mode],
        timeout=120,
        cwd=run,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["a", "b"]
    for line in lines:
        if ship:
            assert line.split()[1:3] == ["True", "None"], line
        else:
            assert line.split()[1:3] == ["False", "serialization"], line
            assert "No module named 'hiddenexec'" in line
            assert "cloudpickle.register_pickle_by_value(hiddenexec)" in line


def test_engine_goes_on_after_crashes() -> None:
    """A call after a crashing call runs normally on healthy workers."""
    _timed_run(FaultyExecutor(hint=2), [spec("x", "segfault"), spec("y", "exit")])
    out = _timed_run(FaultyExecutor(hint=2), [spec(str(i)) for i in range(4)])
    _assert_ok(out, [str(i) for i in range(4)])


def test_crash_events_come_before_finished() -> None:
    """A crashed step reports StepStarted, then StepCrashed, then StepFinished."""
    seen: list[Event] = []
    _timed_run(FaultyExecutor(hint=2), [spec("a"), spec("x", "segfault")], events=seen.append)
    kinds = [type(e).__name__ for e in seen if e.task_id == "x"]
    assert kinds == ["StepStarted", "StepProgress", "StepCrashed", "StepFinished"]
    crashed = next(e for e in seen if isinstance(e, StepCrashed))
    assert (crashed.signal, crashed.exit_code) == ("SIGSEGV", -11)
    finished = next(e for e in seen if isinstance(e, StepFinished) and e.task_id == "x")
    assert finished.success is False


def test_worker_killed_while_idle_costs_nothing() -> None:
    """Workers killed between calls are replaced; the next call's steps all succeed."""
    first = _timed_run(FaultyExecutor(hint=2), [spec("p"), spec("q")])
    _assert_ok(first, ["p", "q"])
    seen: list[Event] = []
    pids = set()

    def remember(event: Event) -> None:
        seen.append(event)
        if isinstance(event, StepStarted):
            pids.add(event.pid)

    warm = {e.pid for e in _started(FaultyExecutor(hint=2), [spec("r")])}
    for pid in warm:
        os.kill(pid, signal.SIGKILL)
    assert gone(warm)  # the kill has landed: the next call finds its workers dead
    out = _timed_run(FaultyExecutor(hint=2), [spec(str(i)) for i in range(4)], events=remember)
    _assert_ok(out, [str(i) for i in range(4)])
    assert not pids & warm
    assert all(e.attempt == 1 for e in seen if isinstance(e, StepStarted))


def _started(executor: object, specs: list) -> list[StepStarted]:
    seen: list[Event] = []
    execute_steps_parallel(executor, specs, events=seen.append)
    return [e for e in seen if isinstance(e, StepStarted)]
