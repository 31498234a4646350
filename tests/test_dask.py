"""The Dask backend, on a LocalCluster of worker processes with nannies, on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from helpers import (
    ChattyExecutor,
    FaultyExecutor,
    GuardExecutor,
    SeedExecutor,
    peak_overlap,
    read_records,
    spec,
)

from procorch import (
    DaskBackend,
    Event,
    StepFinished,
    StepOutcome,
    StepProgress,
    StepStarted,
    execute_steps_parallel,
)

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

pytestmark = pytest.mark.dask

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two single-threaded worker processes with nannies and a 400 MiB memory limit each.

    allowed-failures is 0, as advised for untrusted steps: a crash costs two worker deaths.
    """
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="400MiB",
            dashboard_address=None,
            host="127.0.0.1",
        ) as local,
    ):
        yield local


@pytest.fixture
def backend(cluster: object) -> Iterator[DaskBackend]:
    with distributed.Client(cluster, set_as_default=False) as client:
        yield DaskBackend(client)


def test_dask_fans_out_in_input_order(tmp_path: Path, backend: DaskBackend) -> None:
    """Outcomes come back in input order from the cluster."""
    out = execute_steps_parallel(
        SeedExecutor(8, tmp_path), [spec("a", "explore"), spec("b"), spec("c")], backend=backend
    )
    assert [o.task_id for o in out] == ["a", "b", "c"]
    assert all(o.success for o in out) and out[0].output == "ran: prompt-a"


def test_dask_respects_the_concurrency_hint(tmp_path: Path, backend: DaskBackend) -> None:
    """With hint 1, steps run one at a time even with two workers free."""
    execute_steps_parallel(
        SeedExecutor(1, tmp_path, sleep=0.1), [spec(str(i)) for i in range(4)], backend=backend
    )
    records = read_records(tmp_path)
    assert len(records) == 4 and peak_overlap(records) == 1


def test_dask_peak_concurrency_is_the_hint(tmp_path: Path, backend: DaskBackend) -> None:
    """With hint 2 and 6 steps, exactly 2 run at once at the peak."""
    execute_steps_parallel(
        SeedExecutor(2, tmp_path, sleep=0.3), [spec(str(i)) for i in range(6)], backend=backend
    )
    assert peak_overlap(read_records(tmp_path)) == 2


def test_dask_isolates_failed_and_raised_steps(tmp_path: Path, backend: DaskBackend) -> None:
    """An explicit failure and an exception stay with their steps."""
    out = execute_steps_parallel(
        SeedExecutor(2, tmp_path),
        [spec("ok"), spec("bad", "fail"), spec("crash", "boom"), spec("ok2")],
        backend=backend,
    )
    assert out[0].success and out[3].success
    assert not out[1].success and out[1].error is None
    assert out[2].error is not None and out[2].error.kind == "exception"
    assert "AssertionError: boom" in out[2].output


def test_dask_segfault_fails_only_its_step(backend: DaskBackend) -> None:
    """A step that kills every worker it lands on is labelled crashed; the rest succeed."""
    out = execute_steps_parallel(
        FaultyExecutor(hint=2),
        [spec("a"), spec("x", "segfault"), spec("b"), spec("c")],
        backend=backend,
    )
    crashed = out[1]
    assert crashed.error is not None and crashed.error.kind == "crash"
    assert "step 'x' (agent 'segfault') crashed" in crashed.output
    assert [o.success for o in out] == [True, False, True, True]


def test_dask_step_over_the_worker_memory_limit_is_a_crash(
    tmp_path: Path, backend: DaskBackend
) -> None:
    """A step that outgrows the worker's memory limit fails alone, as a crash."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)), [spec("a"), spec("hog", "hog"), spec("b")], backend=backend
    )
    assert out[1].error is not None and out[1].error.kind == "crash"
    assert out[0].success and out[2].success


def test_dask_events_reach_the_callback_in_order(backend: DaskBackend) -> None:
    """Each step's events arrive complete and in order, StepFinished last."""
    seen: list[Event] = []
    out = execute_steps_parallel(
        ChattyExecutor(200), [spec("a"), spec("b"), spec("c")], events=seen.append, backend=backend
    )
    assert all(o.success for o in out)
    for task_id in "abc":
        events = [e for e in seen if e.task_id == task_id]
        assert isinstance(events[0], StepStarted) and isinstance(events[-1], StepFinished)
        assert [e.data for e in events if isinstance(e, StepProgress)] == list(range(200))


def test_dask_step_timeout(tmp_path: Path, backend: DaskBackend) -> None:
    """A step past its limit is stopped (its worker restarted) and fails as a timeout."""
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("a"), spec("stuck", "c_hang"), spec("b")],
        step_timeout=2.0,
        backend=backend,
    )
    assert out[1].error is not None and out[1].error.kind == "timeout"
    assert out[0].success and out[2].success


def test_dask_refuses_local_only_guards(backend: DaskBackend) -> None:
    """A guard the cluster cannot honour is named before any work."""
    with pytest.raises(ValueError, match="memory_limit is not available with the Dask backend"):
        execute_steps_parallel(FaultyExecutor(), [spec("a")], backend=backend, memory_limit=2**30)


def test_dask_command_line_points_at_the_cluster(tmp_path: Path, cluster: object) -> None:
    """procorch run --dask ADDRESS runs the batch on the cluster."""
    lines = "".join(
        msgspec.json.encode(spec(task_id, agent)).decode() + "\n"
        for task_id, agent in [("a", "ok"), ("x", "raise"), ("b", "ok")]
    )
    (tmp_path / "specs.jsonl").write_text(lines)
    result = subprocess.run(
        [sys.executable, "-m", "procorch", "run", "helpers:FaultyExecutor", "specs.jsonl",
         "--dask", cluster.scheduler_address, "-q"],  # type: ignore[attr-defined]
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    outcomes = [msgspec.json.decode(line, type=StepOutcome) for line in result.stdout.splitlines()]
    assert [(o.task_id, o.success) for o in outcomes] == [("a", True), ("x", False), ("b", True)]
