"""Guards: time limits, memory cap, retries, captured output, cancel, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest
from helpers import GuardExecutor, gone, kill_tree, run_to_end, running, spec

import procorch
from procorch import (
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
)

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")

MiB = 2**20
TESTS = Path(__file__).resolve().parent


def _ok(outcomes: list[StepOutcome], task_ids: Iterable[str]) -> None:
    by_id = {o.task_id: o for o in outcomes}
    for task_id in task_ids:
        assert by_id[task_id].success, by_id[task_id].output


# -- time limits --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["c_hang", "py_busy"])
def test_step_timeout_stops_a_stuck_step(tmp_path: Path, agent: str) -> None:
    """A step stuck in C or in a Python loop is killed at its limit; the rest succeed."""
    executor = GuardExecutor(str(tmp_path))
    start = time.monotonic()
    out = execute_steps_parallel(
        executor, [spec("a"), spec("stuck", agent), spec("b"), spec("c")], step_timeout=1.0
    )
    assert time.monotonic() - start < 30
    stuck = out[1]
    assert not stuck.success and stuck.error is not None
    assert stuck.error.kind == "timeout"
    assert stuck.error.limit == 1.0
    assert f"step 'stuck' (agent '{agent}') timed out: it ran for more than its 1 s limit" in (
        stuck.output
    )
    _ok(out, "abc")


def test_step_timeouts_override_per_task(tmp_path: Path) -> None:
    """A per-task limit applies to its step only."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("slow1", "slow"), spec("slow2", "slow")],
        step_timeout=30,
        step_timeouts={"slow2": 0.1},
    )
    assert out[0].success
    assert out[1].error is not None and out[1].error.kind == "timeout"
    assert out[1].error.limit == 0.1


@pytest.mark.slow
def test_call_timeout_returns_on_time(tmp_path: Path) -> None:
    """When the call's limit runs out, running steps time out and queued ones are cancelled."""
    specs = [spec("quick"), spec("h1", "c_hang"), spec("h2", "py_busy"), spec("h3", "c_hang")]
    executor = GuardExecutor(str(tmp_path))
    # Workers started beforehand: the limit then bounds the steps, not a busy machine's start-up.
    assert all(o.success for o in execute_steps_parallel(executor, [spec("w1"), spec("w2")]))
    start = time.monotonic()
    out = execute_steps_parallel(executor, specs, call_timeout=2.0)
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 30
    assert out[0].success
    kinds = {o.task_id: o.error.kind for o in out[1:] if o.error is not None}
    assert sorted(kinds.values()) == ["cancelled", "timeout", "timeout"]
    queued = next(o for o in out if o.error is not None and o.error.kind == "cancelled")
    assert "the call's time limit ran out before it started" in queued.output
    running = next(o for o in out if o.error is not None and o.error.kind == "timeout")
    assert "the call's 2 s limit ran out while it was running" in running.output


# -- memory --------------------------------------------------------------------


def test_memory_cap_stops_a_hog(tmp_path: Path) -> None:
    """A step that allocates past the cap fails with kind memory and the figure reached."""
    limit = 300 * MiB
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("a"), spec("hog", "hog"), spec("b")],
        memory_limit=limit,
    )
    hog = out[1]
    assert not hog.success and hog.error is not None
    assert hog.error.kind == "memory"
    assert hog.error.memory is not None and limit < hog.error.memory < 3 * limit
    assert hog.error.limit == limit
    assert "went over its memory cap" in hog.output and "300.0 MiB allowed" in hog.output
    _ok(out, "ab")


def test_growing_worker_is_replaced_between_steps(tmp_path: Path) -> None:
    """A worker left above half the cap is replaced; no step fails."""
    executor = GuardExecutor(str(tmp_path), hint=1, leak_bytes=200 * MiB)
    seen: list[Event] = []
    out = execute_steps_parallel(
        executor,
        [spec("leak1", "leak"), spec("leak2", "leak")],
        memory_limit=300 * MiB,
        events=seen.append,
    )
    assert all(o.success for o in out)
    pids = [o.structured["pid"] for o in out]
    assert pids[0] != pids[1]
    assert [e.pid for e in seen if isinstance(e, StepStarted)] == pids
    assert not [e for e in seen if isinstance(e, (StepCrashed, StepRerun))]  # retired, not lost
    assert gone([pids[0]])  # the grown worker is gone, not idle beside the new one


# -- retries -------------------------------------------------------------------


def test_retry_until_success_shows_each_attempt(tmp_path: Path) -> None:
    """A step failing twice then working succeeds on attempt 3, each attempt in the events."""
    seen: list[Event] = []
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path), succeed_on=3),
        [spec("f", "flaky"), spec("ok")],
        retry=RetryPolicy(attempts=3),
        events=seen.append,
    )
    assert out[0].success and out[1].success
    flaky = [e for e in seen if e.task_id == "f"]
    assert [(type(e).__name__, e.attempt) for e in flaky] == [
        ("StepStarted", 1),
        ("StepRerun", 2),
        ("StepStarted", 2),
        ("StepRerun", 3),
        ("StepStarted", 3),
        ("StepFinished", 3),
    ]
    rerun = next(e for e in flaky if isinstance(e, StepRerun))
    assert "ConnectionError: attempt 1 failed" in rerun.reason


def test_retry_gives_up_with_the_last_error(tmp_path: Path) -> None:
    """A step failing every attempt keeps the last attempt's error and the attempt count."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("never", "always_raise"), spec("boom", "always_crash")],
        retry=RetryPolicy(attempts=2, backoff=0.05),
    )
    for outcome, kind in zip(out, ["exception", "crash"], strict=True):
        assert not outcome.success and outcome.error is not None
        assert outcome.error.kind == kind
        assert outcome.error.attempts == 2
    raised, crashed = out[0].error, out[1].error
    assert raised is not None and crashed is not None
    assert "attempt 2 never works" in out[0].output and "attempt 1" not in out[0].output
    assert crashed.pid == int((tmp_path / "try-boom-2").read_text())  # not the first worker's
    assert crashed.pid != int((tmp_path / "try-boom-1").read_text())


def test_retry_only_on_the_kinds_named(tmp_path: Path) -> None:
    """A policy for crashes does not retry an exception."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("never", "always_raise")],
        retry=RetryPolicy(attempts=3, on=frozenset({"crash"})),
    )
    assert out[0].error is not None and out[0].error.attempts == 1


def test_no_retry_by_default(tmp_path: Path) -> None:
    """Without a policy a failed step runs once."""
    out = execute_steps_parallel(GuardExecutor(str(tmp_path)), [spec("f", "flaky")])
    assert out[0].error is not None and out[0].error.attempts == 1
    assert len(list(tmp_path.glob("try-f-*"))) == 1


# -- what the step printed -------------------------------------------------------


def test_captured_output_of_python_fd_and_child(tmp_path: Path) -> None:
    """A failed step's error holds what it, its C calls and its children printed."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("p", "print_then_raise"), spec("ok")],
        capture_output=True,
    )
    printed = out[0].error.printed  # type: ignore[union-attr]
    assert printed is not None
    assert "python says hello" in printed
    assert "fd 1 says hello" in printed
    assert "child says hello" in printed
    assert out[1].success


def test_captured_output_of_a_crash_includes_faulthandler(tmp_path: Path) -> None:
    """A crashed step's printed tail ends with faulthandler's dump."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)), [spec("c", "print_then_segfault")], capture_output=True
    )
    printed = out[0].error.printed  # type: ignore[union-attr]
    assert printed is not None
    assert "about to crash" in printed
    assert "Fatal Python error: Segmentation fault" in printed


def test_megabytes_of_output_keep_only_the_tail(tmp_path: Path) -> None:
    """Five megabytes printed leave a 4 KiB tail in the outcome and do not block."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)), [spec("m", "print_megabytes")], capture_output=True
    )
    printed = out[0].error.printed  # type: ignore[union-attr]
    assert printed is not None and len(printed) <= 4096
    assert printed.endswith("the end of the output\n")


def test_output_is_not_captured_by_default(tmp_path: Path) -> None:
    """Without capture_output the error carries no printed text."""
    out = execute_steps_parallel(GuardExecutor(str(tmp_path)), [spec("p", "print_then_raise")])
    assert out[0].error is not None and out[0].error.printed is None


# -- cancellation and orphans ------------------------------------------------------


def test_cancel_from_another_thread(tmp_path: Path) -> None:
    """Tripping the token stops running steps and skips queued ones, promptly."""
    token = CancelToken()
    specs = [spec("quick"), spec("h1", "c_hang"), spec("h2", "py_busy"), spec("h3", "c_hang")]
    started = threading.Event()
    quick_done = threading.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, StepStarted) and event.task_id.startswith("h"):
            started.set()
        if isinstance(event, StepFinished) and event.task_id == "quick":
            quick_done.set()

    # Cancel once a hanging step runs and the quick one is over (events, not a clock).
    timer = threading.Thread(
        target=lambda: started.wait(30) and quick_done.wait(30) and token.cancel()
    )
    timer.start()
    begin = time.monotonic()
    out = execute_steps_parallel(GuardExecutor(str(tmp_path)), specs, cancel=token, events=on_event)
    assert time.monotonic() - begin < 30
    timer.join()
    assert out[0].success
    for outcome in out[1:]:
        assert outcome.error is not None and outcome.error.kind == "cancelled"
    assert any("was cancelled while running" in o.output for o in out[1:])
    assert any("the call was cancelled before it started" in o.output for o in out[1:])


def test_cancelled_token_before_the_call_runs_nothing(tmp_path: Path) -> None:
    """A token tripped beforehand cancels every step without starting any."""
    token = CancelToken()
    token.cancel()
    out = execute_steps_parallel(GuardExecutor(str(tmp_path)), [spec("a"), spec("b")], cancel=token)
    assert [o.error.kind for o in out] == ["cancelled", "cancelled"]  # type: ignore[union-attr]
    assert not GuardExecutor(str(tmp_path)).pids("worker")


@pytest.mark.parametrize(
    ("agent", "guard"),
    [
        ("child_then_crash", {}),
        pytest.param("child_then_hang", {"step_timeout": 1.0}, marks=pytest.mark.slow),
    ],
)
def test_no_orphans_after_crash_or_timeout(tmp_path: Path, agent: str, guard: dict) -> None:
    """A step that started a child and then crashed or timed out leaves no process."""
    executor = GuardExecutor(str(tmp_path))
    out = execute_steps_parallel(executor, [spec("x", agent), spec("ok")], **guard)
    assert not out[0].success and out[1].success
    grandchildren = executor.pids("grandchild")
    assert grandchildren
    assert gone(grandchildren)


_INTERRUPTED_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import GuardExecutor, spec
import procorch

executor = GuardExecutor({state!r}, hint=2)
try:
    procorch.execute_steps_parallel(
        executor, [spec("x", "child_then_hang"), spec("y", "child_then_hang"), spec("z")]
    )
except KeyboardInterrupt:
    print("KeyboardInterrupt reached the caller", flush=True)
    raise
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_parent_kills_the_whole_tree(tmp_path: Path, signum: int) -> None:
    """Ctrl-C or SIGTERM during a call: workers and grandchildren go, KeyboardInterrupt rises."""
    script = tmp_path / "parent.py"
    state = tmp_path / "state"
    state.mkdir()
    script.write_text(_INTERRUPTED_SCRIPT.format(tests=str(TESTS), state=str(state)))
    scratch = tmp_path / "scratch"  # the parent's own TMPDIR, so others' files do not count
    scratch.mkdir()
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    executor = GuardExecutor(str(state))
    try:
        deadline = time.monotonic() + 60
        while len(executor.pids("grandchild")) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(executor.pids("grandchild")) == 2
        tree = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}
        tree |= executor.pids("grandchild")
        assert list(scratch.glob("procorch-*"))  # the parent's lanes made their directory
        parent.send_signal(signum)
        stdout, stderr = parent.communicate(timeout=60)
    finally:
        grandchildren = executor.pids("grandchild")
        kill_tree(parent)
        for pid in grandchildren:  # in sessions of their own: out of the parent's tree
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert "KeyboardInterrupt reached the caller" in stdout, stderr
    assert parent.returncode != 0
    assert gone(tree, within=5.0)
    assert not list(scratch.glob("procorch-*"))  # and removed it on the way out


def _scratch_dirs() -> set[Path]:
    """This process's capture directories (other programs may make their own meanwhile)."""
    return set(Path(tempfile.gettempdir()).glob(f"procorch-{os.getpid()}-*"))


def _our_semaphores() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if f"loky-{os.getpid()}-" in name}


@pytest.mark.slow
def test_shutdown_leaves_no_files_or_semaphores_behind(tmp_path: Path) -> None:
    """After crashes, timeouts and shutdown: no capture files, directory or semaphores remain."""
    before = _scratch_dirs()
    semaphores_before = _our_semaphores()  # an earlier test's, killed mid-call, are not ours
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("p", "print_then_raise"), spec("c", "always_crash"), spec("h", "c_hang")],
        capture_output=True,
        step_timeout=1.0,
    )
    assert [o.error.kind for o in out] == ["exception", "crash", "timeout"]  # type: ignore[union-attr]
    assert _our_semaphores()  # the lanes hold some while they live
    procorch.shutdown()
    assert not _scratch_dirs() - before
    assert not _our_semaphores() - semaphores_before


# -- bad guard values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_timeout": 0}, r"step_timeout must be a number > 0 \(got 0\)"),
        ({"step_timeouts": {"zz": 1.0}}, "step_timeouts names task_id 'zz', which no spec has"),
        ({"step_timeouts": {"a": -1}}, r"step_timeouts\['a'\] must be a number > 0 \(got -1\)"),
        ({"call_timeout": "5"}, r"call_timeout must be a number > 0 \(got '5'\)"),
        ({"memory_limit": 1.5}, r"memory_limit must be a number of bytes > 0 \(got 1.5\)"),
    ],
)
def test_bad_guard_values_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    """A guard out of range is named before any step starts."""
    with pytest.raises(ValueError, match=message):
        execute_steps_parallel(GuardExecutor(str(tmp_path)), [spec("a")], **kwargs)
    assert not GuardExecutor(str(tmp_path)).pids("worker")


def test_retry_policy_checks_its_fields() -> None:
    """RetryPolicy refuses nonsense at construction."""
    with pytest.raises(ValueError, match=r"attempts must be >= 1 \(got 0\)"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="on must name failure kinds"):
        RetryPolicy(on=frozenset({"bogus"}))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry must be a RetryPolicy"):
        execute_steps_parallel(GuardExecutor("."), [spec("a")], retry=3)  # type: ignore[arg-type]


def test_events_of_a_timed_out_step_end_with_finished(tmp_path: Path) -> None:
    """A timed-out step reports started, then finished with success False."""
    seen: list[Event] = []
    execute_steps_parallel(
        GuardExecutor(str(tmp_path)), [spec("h", "c_hang")], step_timeout=0.5, events=seen.append
    )
    assert [type(e).__name__ for e in seen] == ["StepStarted", "StepFinished"]
    assert isinstance(seen[-1], StepFinished) and not seen[-1].success
    assert not any(isinstance(e, StepProgress) for e in seen)


def test_directories_of_killed_callers_are_swept(tmp_path: Path) -> None:
    """A caller killed by SIGKILL leaves its capture directory; the next caller removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"procorch-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "lane-1.out").write_text("left behind")
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from helpers import GuardExecutor, gone, spec\n"
        "import procorch\n"
        f"procorch.execute_steps_parallel(GuardExecutor({str(tmp_path)!r}), [spec('a')])\n"
    )
    result = run_to_end(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert not list(tmp_path.glob("procorch-*"))  # its own is gone too, at exit
