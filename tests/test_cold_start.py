"""Cold start and lean workers: a light import, lazy doors, frozen preloads, lanes started at once.

What a program pays before its first step is measured in
``benchmarks/bench_peers.py`` (import, whole process, hint 32); here, only
behaviour: what importing procorch loads, that every public name still
resolves, and that the first call of a process, its lanes still starting in
the background, runs every step with the right outcome.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import WorkerFactsExecutor, run_to_end, spec

import procorch
from procorch import _pool, execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

TESTS = Path(__file__).resolve().parent
BOUND = 120.0  # seconds for a whole program: a hang guard, far above what any needs

# Loaded only by the doors that need them, never by ``import procorch``.
HEAVY = ("asyncio", "jsonschema", "distributed", "dask", "sqlite3", "loky", "psutil")


def _python(source: str, cwd: Path) -> str:
    """Run ``source`` (TESTS: the tests' directory) in a fresh interpreter; its standard output."""
    done = run_to_end(
        [sys.executable, "-c", textwrap.dedent(source).replace("TESTS", repr(str(TESTS)))],
        BOUND,
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def test_import_procorch_loads_none_of_the_heavy_modules(tmp_path: Path) -> None:
    """``import procorch`` and the data model leave asyncio, jsonschema, Dask, loky... unloaded."""
    out = _python(
        f"""
        import json, sys
        import procorch
        from procorch import AgentExecutor, AgentStepSpec, StepOutcome, RetryPolicy
        print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
        """,
        tmp_path,
    )
    assert json.loads(out) == []


def test_a_door_loads_what_it_needs_on_first_use(tmp_path: Path) -> None:
    """The asyncio door brings asyncio; the plain door does not, nor jsonschema or Dask."""
    out = _python(
        """
        import json, sys
        import procorch
        procorch.execute_steps_parallel
        plain = [name for name in ("asyncio", "jsonschema", "distributed") if name in sys.modules]
        procorch.execute_steps_parallel_async
        print(json.dumps({"plain": plain, "async": "asyncio" in sys.modules}))
        """,
        tmp_path,
    )
    assert json.loads(out) == {"plain": [], "async": True}


def test_every_public_name_resolves_and_is_listed() -> None:
    """Each name of __all__ (and map, imap) is an attribute, in dir(), the real object."""
    from procorch import _aio, _map, _parallel, _stream

    for name in [*procorch.__all__, "map", "imap"]:
        assert name in dir(procorch), name
        assert getattr(procorch, name) is not None, name
    assert procorch.execute_steps_parallel is _parallel.execute_steps_parallel
    assert procorch.stream_steps_parallel is _stream.stream_steps_parallel
    assert procorch.EventStream is _aio.EventStream
    assert procorch.map is _map.map
    assert "map" not in procorch.__all__  # star imports never hide the builtin


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'execute_step_paralel'"):
        procorch.execute_step_paralel  # noqa: B018
    with pytest.raises(ImportError):
        from procorch import no_such_door  # type: ignore[attr-defined]  # noqa: F401


def test_star_import_brings_every_public_name(tmp_path: Path) -> None:
    out = _python(
        """
        import json
        import procorch
        namespace = {}
        exec("from procorch import *", namespace)
        print(json.dumps(sorted(set(procorch.__all__) - set(namespace))))
        """,
        tmp_path,
    )
    assert json.loads(out) == []


def test_workers_inherit_frozen_preloads_and_still_collect_garbage() -> None:
    """Forked after gc.freeze, a worker runs steps, and gc.collect works in it."""
    outcomes = execute_steps_parallel(WorkerFactsExecutor(), [spec("a"), spec("b")])
    for outcome in outcomes:
        assert outcome.success, outcome.error
        assert outcome.structured is not None
        assert outcome.structured["frozen"]
        assert outcome.structured["parent_is_server"]


_COLD_PROGRAM = """
import json, sys
sys.path.insert(0, TESTS)
from helpers import FaultyExecutor, spec
import procorch

if __name__ == "__main__":
    # The process's first call: no fork server yet, 32 lanes to start at once;
    # one step of the first lanes' work segfaults while the others start.
    agents = ["segfault" if i == 3 else "raise" if i == 40 else "ok" for i in range(200)]
    specs = [spec(f"s{i}", agent) for i, agent in enumerate(agents)]
    outcomes = procorch.execute_steps_parallel(FaultyExecutor(hint=32), specs)
    print(json.dumps([
        [o.task_id, o.success, o.error.kind if o.error else None] for o in outcomes
    ]))
"""


@pytest.mark.slow
def test_first_call_with_hint_32_runs_every_step_with_its_own_outcome(tmp_path: Path) -> None:
    """Cold, 32 lanes starting side by side: each outcome in order, the crash on its step alone."""
    got = json.loads(_python(_COLD_PROGRAM, tmp_path))
    assert [task_id for task_id, _, _ in got] == [f"s{i}" for i in range(200)]
    failed = {task_id: kind for task_id, ok, kind in got if not ok}
    assert failed == {"s3": "crash", "s40": "exception"}, failed


def test_new_lanes_each_get_work_once_their_worker_runs(tmp_path: Path) -> None:
    """Steps wait for lanes still starting and reach every one of them: 4 steps meet at once."""
    procorch.shutdown()  # no warm lanes: all four start in the background
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    executor = WorkerFactsExecutor(hint=4, barrier_dir=str(barrier))
    outcomes = execute_steps_parallel(executor, [spec(f"s{i}") for i in range(4)])
    assert all(outcome.success for outcome in outcomes), [o.error for o in outcomes]
    pids = {outcome.structured["pid"] for outcome in outcomes if outcome.structured}
    assert len(pids) == 4  # four lanes, each with a worker of its own, all running at once


def test_shutdown_waits_for_lanes_still_starting() -> None:
    """Lanes acquired and released before their workers are up are stopped whole by shutdown."""
    lanes = _pool._engine.acquire(3)
    _pool._engine.release(lanes)
    procorch.shutdown()
    for lane in lanes:
        assert not lane.starting
    # Nothing left: the no_leaked_processes fixture checks no worker outlived the test.


def test_a_script_run_from_a_checkout_of_another_procorch_is_unaffected_by_lazy_names(
    tmp_path: Path,
) -> None:
    """The lazy doors load from the procorch that was imported, not from the current directory."""
    fake = tmp_path / "procorch"
    fake.mkdir()
    (fake / "_parallel.py").write_text("raise SystemExit('the wrong procorch')\n")
    out = _python(
        f"""
        import sys
        sys.path.remove("") if "" in sys.path else None
        sys.path.insert(0, {str(Path(procorch.__file__).parent.parent)!r})
        import procorch
        sys.path.insert(0, ".")
        print(procorch.execute_steps_parallel.__module__)
        """,
        tmp_path,
    )
    assert out.strip() == "procorch._parallel"


_TRACKER_PROGRAM = """
import json, multiprocessing, os, sys
sys.path.insert(0, TESTS)
from multiprocessing import resource_tracker
import psutil
from helpers import FaultyExecutor, spec
import procorch

if __name__ == "__main__":
    procorch.execute_steps_parallel(FaultyExecutor(), [spec("a"), spec("b")])
    tracker = resource_tracker._resource_tracker
    alive = tracker._check_alive()
    lock = multiprocessing.get_context("forkserver").Lock()  # registers with the tracker
    spawned = [
        " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)
        if any("resource_tracker" in part for part in p.cmdline())
    ]
    print(json.dumps({"alive": alive, "spawned": spawned, "fd": tracker._fd is not None}))
"""


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the server forks the tracker on 3.11")
def test_the_fork_server_forks_the_callers_resource_tracker(tmp_path: Path) -> None:
    """No interpreter of its own for the tracker: the server forked it, and it takes work."""
    got = json.loads(_python(_TRACKER_PROGRAM, tmp_path))
    assert got == {"alive": True, "spawned": [], "fd": True}


def test_shutdown_before_any_call_loads_no_pool(tmp_path: Path) -> None:
    """procorch.shutdown() with nothing running is a no-op that imports neither loky nor psutil."""
    out = _python(
        """
        import json, sys
        import procorch
        procorch.shutdown()
        pool = ("loky", "psutil", "procorch._pool")
        print(json.dumps([name for name in pool if name in sys.modules]))
        """,
        tmp_path,
    )
    assert json.loads(out) == []
