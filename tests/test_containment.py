"""Nothing a step starts outlives it: daemons, orphans and fork bombs, with real processes.

Every step here first starts a daemon (double fork and setsid(): it leaves
the worker's process group and session), then ends in its own way. When the
call returns, every daemon is gone, whatever happened to its step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import _workers
from helpers import EscapingExecutor, gone, run_to_end, running, spec

from procorch import execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")


@pytest.mark.parametrize(
    "agent", ["ok", "raise", "segfault", pytest.param("hang", marks=pytest.mark.slow)]
)
def test_daemon_of_a_step_is_gone_when_the_call_returns(tmp_path: Path, agent: str) -> None:
    """A daemonized grandchild dies with its step: success, exception, crash or time limit."""
    executor = EscapingExecutor(str(tmp_path))
    out = execute_steps_parallel(executor, [spec("d", agent), spec("n", "ok")], step_timeout=20)
    expected = {"ok": None, "raise": "exception", "segfault": "crash", "hang": "timeout"}[agent]
    assert out[0].success == (expected is None)
    assert (out[0].error.kind if out[0].error else None) == expected
    assert out[1].success
    daemons = executor.daemons()
    assert len(daemons) == 2
    try:
        assert gone(daemons, within=5), f"still running: {[p for p in daemons if running(p)]}"
    finally:
        _kill(daemons)


def test_warm_worker_keeps_no_child_between_calls(tmp_path: Path) -> None:
    """A bounded fork bomb in a step that succeeds leaves nothing behind in the warm worker."""
    executor = EscapingExecutor(str(tmp_path), hint=1)
    out = execute_steps_parallel(executor, [spec("bomb", "fork_bomb"), spec("after", "ok")])
    assert [o.success for o in out] == [True, True]
    # Only procorch's own processes remain: the fork server and the warm worker.
    left = _workers()
    assert len(left) <= 2, [(p.pid, p.cmdline()) for p in left]
    try:
        assert gone(executor.daemons(), within=5)
    finally:
        _kill(executor.daemons())


def _kill(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


SUBREAPER_ONLY = """
import sys
sys.path.insert(0, {tests!r})
from helpers import EscapingExecutor, gone, spec
import procorch
executor = EscapingExecutor({state!r}, hint=1)
specs = [spec("d", "ok"), spec("r", "raise"), spec("bomb", "fork_bomb"), spec("n", "ok")]
out = procorch.execute_steps_parallel(executor, specs)
assert [o.success for o in out] == [True, False, True, True], out
assert gone(executor.daemons(), within=5), executor.daemons()
print("contained")
"""


def test_subreaper_contains_steps_without_cgroups(tmp_path: Path) -> None:
    """With lane cgroups turned off, the worker as subreaper still kills what a step left."""
    import os
    import sys

    tests = str(Path(__file__).parent)
    code = SUBREAPER_ONLY.format(tests=tests, state=str(tmp_path))
    env = {**os.environ, "PROCORCH_CGROUPS": "0"}
    try:
        result = run_to_end(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        _kill(EscapingExecutor(str(tmp_path)).daemons())
    assert result.returncode == 0, result.stderr
    assert "contained" in result.stdout


@pytest.mark.slow
def test_memory_cap_counts_shared_pages_once() -> None:
    """80 MiB shared with 3 forked children is about 100 MiB, not 400: under a 200 MiB cap."""
    from helpers import SharingExecutor

    out = execute_steps_parallel(
        SharingExecutor(), [spec("share", "share"), spec("hog", "hog")], memory_limit=200 * 2**20
    )
    assert out[0].success, out[0].output
    assert out[1].error is not None and out[1].error.kind == "memory", out[1].output
    assert out[1].error.memory is not None and out[1].error.memory > 200 * 2**20


KILLED_CALLER = """
import sys
sys.path.insert(0, {tests!r})
from helpers import EscapingExecutor, spec
import procorch
procorch.execute_steps_parallel(EscapingExecutor({state!r}), [spec("d", "hang")])
"""


def test_daemon_of_a_sigkilled_callers_step_is_gone(tmp_path: Path) -> None:
    """SIGKILL the caller while its step's daemon runs: the daemon goes with the caller."""
    import subprocess
    import sys
    import time

    tests = str(Path(__file__).parent)
    executor = EscapingExecutor(str(tmp_path))
    caller = subprocess.Popen(
        [sys.executable, "-c", KILLED_CALLER.format(tests=tests, state=str(tmp_path))]
    )
    try:
        deadline = time.monotonic() + 60
        while not executor.daemons() and time.monotonic() < deadline:
            time.sleep(0.02)
        daemons = executor.daemons()
        assert daemons, "the step never started its daemon"
        caller.kill()
        caller.wait(timeout=60)
        assert gone(daemons, within=20), f"still running: {[p for p in daemons if running(p)]}"
    finally:
        caller.kill()
        caller.wait()
        _kill(executor.daemons())
