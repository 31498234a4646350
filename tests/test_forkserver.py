"""procorch's own fork server: the caller's multiprocessing left alone, no step harmed by its death.

Where process-wide state is the point (the program's start method and
preload list, a caller killed mid-call), the program runs as a script in a
process of its own, in its own session, killed with everything it started if
it outlives a generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    FaultyExecutor,
    GuardExecutor,
    ServerKillerExecutor,
    WorkerFactsExecutor,
    gone,
    kill_tree,
    running,
    spec,
)

from procorch import StepOutcome, _context, execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

TESTS = Path(__file__).resolve().parent
BOUND = 60.0  # seconds for a whole program; far above what any of these needs


def _run_program(tmp_path: Path, source: str, *args: str) -> str:
    """Run ``source`` as a script and return its standard output; fail if it fails or hangs."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source).format(tests=str(TESTS)))
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the program ran for more than {BOUND:g} s:\n{stdout}\n{stderr}")
    assert process.returncode == 0, stderr
    return stdout


def _outputs(outcomes: list[StepOutcome]) -> list[str]:
    return [outcome.output for outcome in outcomes]


# -- the calling program's own fork server -------------------------------------

_FORKSERVER_PROGRAM = """
import json
import multiprocessing
import sys
sys.path.insert(0, {tests!r})

import procorch
from helpers import WorkerFactsExecutor, spec


def has_program_preload(_):
    return "colorsys" in sys.modules


if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")
    multiprocessing.set_forkserver_preload(["colorsys"])
    from multiprocessing import forkserver

    report = {{}}
    pool = None
    if sys.argv[1] == "program-first":
        pool = multiprocessing.Pool(2)
        report["pool_before"] = pool.map(has_program_preload, range(2))
    [outcome] = procorch.execute_steps_parallel(WorkerFactsExecutor(), [spec("a")])
    report["procorch_worker"] = outcome.structured
    report["preload"] = forkserver._forkserver._preload_modules
    if pool is None:
        pool = multiprocessing.Pool(2)
    report["pool_after"] = pool.map(has_program_preload, range(2))
    procorch.shutdown()
    report["pool_after_shutdown"] = pool.map(has_program_preload, range(2))
    print(json.dumps(report), flush=True)
    # The interpreter exits with the program's pool and fork server alive.
"""


@pytest.mark.parametrize("order", ["program-first", "procorch-first"])
def test_program_using_the_forkserver_keeps_its_server_and_preloads(
    tmp_path: Path, order: str
) -> None:
    """The program keeps its preload list, server and pool; procorch's workers have its own."""
    report = json.loads(_run_program(tmp_path, _FORKSERVER_PROGRAM, order))
    assert report["preload"] == ["colorsys"]
    assert report.get("pool_before", [True, True]) == [True, True]
    assert report["pool_after"] == [True, True]
    assert report["pool_after_shutdown"] == [True, True]
    worker = report["procorch_worker"]
    assert worker["parent_is_server"]  # forked by procorch's server, not the program's
    assert worker["modules"] == []  # without the program's preloads
    assert worker["frozen"]  # with procorch's, frozen before the fork


# -- a step that kills the fork server -------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_step_that_kills_the_fork_server_fails_no_other_step(tmp_path: Path, signum: int) -> None:
    """Steps running when their server is killed finish; the next worker comes from a new server."""
    killer = ServerKillerExecutor(str(tmp_path / "first"), parties=3, signum=signum)
    (tmp_path / "first").mkdir()
    out = execute_steps_parallel(
        killer, [spec("k", "kill"), spec("a", "witness"), spec("b", "witness")]
    )
    assert [o.success for o in out] == [True, True, True], _outputs(out)
    [server] = {o.structured["server"] for o in out}  # type: ignore[index]
    assert gone([server])

    # Three warm workers outlived their server; a fourth has to be forked.
    (tmp_path / "second").mkdir()
    facts = execute_steps_parallel(
        WorkerFactsExecutor(hint=4, barrier_dir=str(tmp_path / "second")),
        [spec(str(i)) for i in range(4)],
    )
    assert all(o.success for o in facts), _outputs(facts)
    parents = [o.structured for o in facts]
    assert server not in {p["parent"] for p in parents}  # type: ignore[index]
    assert any(p["parent_is_server"] for p in parents)  # type: ignore[index]


@pytest.mark.slow
def test_step_that_kills_the_fork_server_and_exits_is_a_crash_of_unknown_code(
    tmp_path: Path,
) -> None:
    """Its exit status died with the server; the worker replacing it comes from a new server."""
    killer = ServerKillerExecutor(str(tmp_path), parties=1, signum=signal.SIGKILL)
    for attempt in range(5):
        crashed, *rest = execute_steps_parallel(
            killer, [spec(f"k{attempt}", "kill_then_exit"), spec(f"a{attempt}")]
        )
        assert crashed.error is not None and crashed.error.kind == "crash", crashed.output
        assert crashed.error.exit_code is None  # the server that could tell is gone
        assert all(o.success for o in rest), _outputs(rest)


def test_crash_of_a_worker_whose_server_died_has_an_unknown_exit_code(tmp_path: Path) -> None:
    """Only the dead server knew its workers' exit status: procorch says so instead of guessing."""
    (tmp_path / "kill").mkdir()
    killer = ServerKillerExecutor(str(tmp_path / "kill"), parties=2, signum=signal.SIGKILL)
    killed = execute_steps_parallel(killer, [spec("k", "kill"), spec("a", "witness")])
    assert all(o.success for o in killed), _outputs(killed)

    # Both warm workers are orphans now: one exits with code 3, one segfaults.
    (tmp_path / "crash").mkdir()
    faulty = FaultyExecutor(hint=2, barrier_dir=str(tmp_path / "crash"), parties=2)
    exit_3, segfault = execute_steps_parallel(faulty, [spec("x", "exit"), spec("s", "segfault")])
    assert exit_3.error is not None and exit_3.error.kind == "crash"
    assert exit_3.error.exit_code is None
    assert "with an unknown exit code" in exit_3.output
    assert segfault.error is not None and segfault.error.kind == "crash"
    assert segfault.error.exit_code == -11  # faulthandler named the signal
    assert segfault.error.signal == "SIGSEGV"

    # Their replacements come from a new server, which reports exit codes again.
    [again] = execute_steps_parallel(FaultyExecutor(hint=1), [spec("y", "exit")])
    assert again.error is not None and again.error.exit_code == 3, again.output


# -- workers die with the caller --------------------------------------------------

_KILLED_CALLER_PROGRAM = """
import os
import sys
import time
sys.path.insert(0, {tests!r})

import procorch
from helpers import GuardExecutor, spec

executor = GuardExecutor(sys.argv[1], hint=2)
procorch.execute_steps_parallel(executor, [spec("w1"), spec("w2")])  # server and lanes warm
if sys.argv[2] == "forks" and os.fork() == 0:
    # A child forked now inherits the caller's ends of the server's and the
    # workers' pipes: outliving the caller, it must not keep them alive.
    time.sleep(3600)
    os._exit(0)
procorch.execute_steps_parallel(
    executor, [spec("x", "child_then_hang"), spec("y", "child_then_hang")]
)
"""


@pytest.mark.parametrize("fork", ["forks", "does-not-fork"])
def test_killed_caller_leaves_no_server_worker_or_grandchild(tmp_path: Path, fork: str) -> None:
    """SIGKILL the caller mid-call: its server, workers (one stopped) and their children go."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(_KILLED_CALLER_PROGRAM).format(tests=str(TESTS)))
    state = tmp_path / "state"
    state.mkdir()
    caller = subprocess.Popen([sys.executable, str(script), str(state), fork])
    executor = GuardExecutor(str(state))
    deadline = time.monotonic() + BOUND
    while len(executor.pids("grandchild")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    forked: list[int] = []
    try:
        assert len(executor.pids("grandchild")) == 2
        workers = executor.pids("worker")
        assert len(workers) == 2  # the warm-up's workers ran the call
        caller_process = psutil.Process(caller.pid)
        children = caller_process.children()
        servers = [p.pid for p in children if "procorch._forkserver" in " ".join(p.cmdline())]
        forked = [p.pid for p in children if p.cmdline() == caller_process.cmdline()]
        assert len(servers) == 1
        assert len(forked) == (1 if fork == "forks" else 0)
        os.kill(min(workers), signal.SIGSTOP)  # a frozen worker dies all the same
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=BOUND)
        assert gone([*servers, *workers, *executor.pids("grandchild")])
    finally:
        kill_tree(caller)
        for pid in forked:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_worker_starts_right_after_its_server_was_killed() -> None:
    """A server SIGKILLed a moment ago looks alive yet refuses; the next start waits it out."""
    context = _context.worker_context()
    killed = []
    for _ in range(10):  # without the wait, about one start in two failed here
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=writer.send_bytes, args=(b"ready",))
        process.start()
        assert reader.recv_bytes() == b"ready"
        process.join()
        assert process.exitcode == 0
        reader.close()
        writer.close()
        server = _context._server.pid
        assert server is not None and server not in killed
        os.kill(server, signal.SIGKILL)  # the next start comes at once
        killed.append(server)
    assert gone(killed)


def test_server_that_cannot_be_reached_is_replaced() -> None:
    """A live server whose socket is gone is killed and replaced, not asked again and again."""
    context = _context.worker_context()
    reader, writer = context.Pipe(duplex=False)
    first = context.Process(target=writer.send_bytes, args=(b"first",))
    first.start()
    assert reader.recv_bytes() == b"first"
    first.join()
    server, address = _context._server.pid, _context._server._address
    assert server is not None and address is not None
    os.unlink(address)  # as a cleaner of temporary files might
    second = context.Process(target=writer.send_bytes, args=(b"second",))
    second.start()
    assert reader.recv_bytes() == b"second"
    second.join()
    assert second.exitcode == 0
    assert _context._server.pid not in (None, server)
    assert gone([server])


_LIFELINE_WATCHER_PROGRAM = """
import os
import sys
import time

from procorch import _context

lifeline, caller_end = os.pipe()
child = os.fork()
if child == 0:
    os.close(caller_end)
    _context._watch_lifeline(lifeline, os.getpid())  # the way outside Linux
    print("armed", flush=True)
    time.sleep(3600)
    os._exit(0)
os.close(lifeline)
sys.stdin.readline()  # the test says when the caller dies
os.close(caller_end)
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
"""


def test_lifeline_watcher_thread_kills_its_worker_when_the_caller_goes() -> None:
    """The thread used where the kernel cannot send the signal itself does the same job."""
    process = subprocess.Popen(
        [sys.executable, "-c", _LIFELINE_WATCHER_PROGRAM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == "armed\n"
        stdout, _ = process.communicate("go\n", timeout=BOUND)
    finally:
        kill_tree(process)
    assert stdout.strip() == str(-signal.SIGKILL)
