"""The Dask backend, on a LocalCluster of worker processes with nannies, on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from dask_helpers import CountingExecutor, NamedExecutor, client_state, procorch_state, runs_by_task
from helpers import (
    ChattyExecutor,
    FaultyExecutor,
    GuardExecutor,
    SeedExecutor,
    UsageExecutor,
    gone,
    identity,
    peak_overlap,
    read_records,
    spec,
)

from procorch import (
    CancelToken,
    DaskBackend,
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

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

pytestmark = pytest.mark.dask

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """Two single-threaded worker processes with nannies and a 400 MiB memory limit each.

    allowed-failures is 0, as advised for untrusted steps: a crash costs two worker deaths.
    The lost-worker timeout is long: a LocalCluster closes a worker's nanny for good when,
    that long after the worker was once removed (a crash), it is away again (a restart).
    """
    config = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.deploy.lost-worker-timeout": "1h",
    }
    with (
        dask.config.set(config),
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
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    outcomes = [msgspec.json.decode(line, type=StepOutcome) for line in result.stdout.splitlines()]
    assert [(o.task_id, o.success) for o in outcomes] == [("a", True), ("x", False), ("b", True)]


@pytest.fixture(params=["local", "dask"])
def either(request: pytest.FixtureRequest) -> DaskBackend | None:
    """The local worker processes (None), then the Dask backend: the same test on both."""
    if request.param == "local":
        return None
    backend: DaskBackend = request.getfixturevalue("backend")
    return backend


def test_dask_crash_counts_one_attempt_and_one_crashed_event(backend: DaskBackend) -> None:
    """Dask's re-runs of a crashing step are not charged: attempts 1, one StepCrashed, then done."""
    seen: list[Event] = []
    out = execute_steps_parallel(
        FaultyExecutor(hint=1), [spec("x", "segfault")], events=seen.append, backend=backend
    )
    error = out[0].error
    assert error is not None and error.kind == "crash" and error.attempts == 1
    kinds = [type(event).__name__ for event in seen]
    assert kinds.count("StepCrashed") == 1 and kinds.count("StepFinished") == 1
    assert kinds[-2:] == ["StepCrashed", "StepFinished"]
    assert isinstance(seen[-2], StepCrashed) and seen[-2].attempt == seen[-1].attempt
    assert "on the Dask worker at tcp://" in out[0].output
    assert error.signal == "SIGSEGV" and error.exit_code == -11, out[0].output


def test_dask_retry_waits_its_backoff(tmp_path: Path, backend: DaskBackend) -> None:
    """Attempt n + 1 starts at least backoff * 2 ** (n - 1) s after attempt n (worker's clock)."""
    policy = RetryPolicy(attempts=3, backoff=0.5, on=frozenset({"exception"}))
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path), succeed_on=3),
        [spec("f", "flaky")],
        retry=policy,
        backend=backend,
    )
    assert out[0].success, out[0].output
    starts = [float((tmp_path / f"try-f-{attempt}").read_text()) for attempt in (1, 2, 3)]
    assert starts[1] - starts[0] >= 0.5
    assert starts[2] - starts[1] >= 1.0


def test_step_cancelled_in_its_backoff_finishes_once(
    tmp_path: Path, either: DaskBackend | None
) -> None:
    """Cancelled while waiting to be retried: one StepFinished, and it did not run again."""
    token = CancelToken()
    seen: list[Event] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, StepRerun):
            token.cancel()

    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("r", "always_raise")],
        retry=RetryPolicy(attempts=3, backoff=60.0),
        cancel=token,
        events=on_event,
        backend=either,
    )
    assert out[0].error is not None and out[0].error.kind == "cancelled"
    assert "did not run: the call was cancelled before it could be started again" in out[0].output
    assert [type(event).__name__ for event in seen] == ["StepStarted", "StepRerun", "StepFinished"]


def test_token_cancelled_before_the_call_sends_nothing(
    tmp_path: Path, either: DaskBackend | None
) -> None:
    """A token tripped beforehand: every step did not run, and none reached a worker."""
    token = CancelToken()
    token.cancel()
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)), [spec("a"), spec("b")], cancel=token, backend=either
    )
    for outcome in out:
        assert outcome.output.endswith("did not run: the call was cancelled before it started.")
    assert not GuardExecutor(str(tmp_path)).pids("worker")


def test_dask_cancel_says_did_not_run_for_steps_never_started(
    tmp_path: Path, backend: DaskBackend
) -> None:
    """Cancelled with both workers busy: steps sent but not started, or never sent, did not run."""
    token = CancelToken()
    started: dict[str, int] = {}

    def on_event(event: Event) -> None:
        if isinstance(event, StepStarted):
            started[event.task_id] = event.pid
            if len(started) == 2:  # both single-threaded workers are busy
                token.cancel()

    specs = [spec("h1", "c_hang"), spec("h2", "c_hang"), spec("h3", "c_hang"), spec("a")]
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path), hint=3),
        specs,
        cancel=token,
        call_timeout=120.0,  # a backstop only: should the scheduler queue both on one worker
        events=on_event,
        backend=backend,
    )
    assert len(started) == 2, [o.output for o in out]
    assert all(o.error is not None and o.error.kind == "cancelled" for o in out)
    for outcome in out:
        if outcome.task_id in started:
            assert "was cancelled while running; " in outcome.output
            assert "its Dask worker (tcp://" in outcome.output
        else:
            assert outcome.output.endswith(
                "did not run: the call was cancelled before it started."
            ), outcome.output
    assert "a" not in started
    assert gone(started.values(), within=60)


_SIGTERM_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import GuardExecutor, spec
import procorch

def note(event):
    if isinstance(event, procorch.StepStarted):
        Path({state!r}, "started-" + event.task_id).write_text(str(event.pid))

try:
    procorch.execute_steps_parallel(
        GuardExecutor({state!r}, hint=2),
        [spec("x", "c_hang"), spec("z")],
        events=note,
        backend=procorch.DaskBackend({address!r}),
    )
except KeyboardInterrupt:
    print("KeyboardInterrupt reached the caller", flush=True)
    raise
"""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # not there yet, or not written yet
        return None


def test_dask_sigterm_in_parent_unwinds_and_stops_its_steps(
    tmp_path: Path, cluster: object
) -> None:
    """SIGTERM during a Dask call: KeyboardInterrupt rises; the hung step's worker is replaced."""
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "parent.py"
    address = cluster.scheduler_address  # type: ignore[attr-defined]
    script.write_text(_SIGTERM_SCRIPT.format(tests=str(TESTS), state=str(state), address=address))
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    marker = state / "started-x"
    try:
        # The marker exists before its pid is written: wait for the pid.
        deadline = time.monotonic() + 60
        while not _read_pid(marker) and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        worker = _read_pid(marker)
        if not worker:
            parent.kill()
            pytest.fail(f"the step never started: {parent.communicate()[1]}")
        parent.send_signal(signal.SIGTERM)
        stdout, stderr = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:  # the test failed: leave no parent behind
            parent.kill()
            parent.communicate()
    assert "KeyboardInterrupt reached the caller" in stdout, stderr
    assert parent.returncode != 0
    assert gone([worker], within=60)


@pytest.mark.slow
def test_dask_own_reruns_are_uncharged_attempts() -> None:
    """With allowed-failures 1, each run Dask makes of a crashing step is an attempt, uncharged."""
    seen: list[Event] = []
    with _private_client(allowed_failures=1) as client:
        out = execute_steps_parallel(
            FaultyExecutor(hint=1),
            [spec("x", "segfault")],
            events=seen.append,
            backend=DaskBackend(client),
        )
    error = out[0].error
    assert error is not None and error.kind == "crash" and error.attempts == 1
    assert [e.attempt for e in seen if isinstance(e, StepStarted)] == [1, 2, 3, 4]
    reruns = [e.reason for e in seen if isinstance(e, StepRerun)]
    assert [reason.endswith("Dask runs it again") for reason in reruns] == [True, False, True]
    assert [type(e).__name__ for e in seen][-2:] == ["StepCrashed", "StepFinished"]


# -- many threads per worker, many callers ----------------------------------------------


@contextlib.contextmanager
def _private_client(threads: int = 1, allowed_failures: int | None = None) -> Iterator[Any]:
    """A client of a cluster of its own: two worker processes with nannies, on loopback."""
    settings = (
        {}
        if allowed_failures is None
        else {"distributed.scheduler.allowed-failures": allowed_failures}
    )
    with (
        dask.config.set(settings),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=":0",  # the module's cluster holds the default port
            host="127.0.0.1",
        ) as local,
        distributed.Client(local, set_as_default=False) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def threaded_client() -> Iterator[object]:
    """A client of two worker processes with four threads each, as Dask gives by default."""
    with _private_client(threads=4) as client:
        yield client


def test_dask_four_threads_per_worker_run_every_step(
    tmp_path: Path, threaded_client: object
) -> None:
    """100 steps on 4-thread workers all succeed, with one unpickling per worker process."""
    log = tmp_path / "unpickled"
    out = execute_steps_parallel(
        NamedExecutor("solo", str(log)),
        [spec(str(i)) for i in range(100)],
        backend=DaskBackend(threaded_client),
    )
    assert [o.output for o in out] == ["solo"] * 100, [o.output for o in out if not o.success]
    lines = log.read_text().splitlines()
    assert len(lines) == len(set(lines)) <= 2


def test_dask_map_and_process_pool_carry_each_items_own_bytes(threaded_client: object) -> None:
    """On 4-thread workers every item and call gets its own raw-bytes payload back."""
    import procorch

    items = [os.urandom(1000 + i) for i in range(40)]
    backend = DaskBackend(threaded_client)
    results = procorch.map(identity, items, concurrency=8, backend=backend)
    assert [r.value for r in results] == items, [r.error for r in results if r.error]
    with procorch.ProcessPool(4, backend=backend) as pool:
        assert [f.result(timeout=120) for f in [pool.submit(identity, x) for x in items]] == items


def test_dask_concurrent_callers_each_get_their_own_executor(
    tmp_path: Path, threaded_client: object
) -> None:
    """Two callers from one process at once on 4-thread workers: each step runs its caller's."""
    log = tmp_path / "unpickled"
    backend = DaskBackend(threaded_client)
    with ThreadPoolExecutor(2) as pool:
        runs = {
            name: pool.submit(
                execute_steps_parallel,
                NamedExecutor(name, str(log)),
                [spec(f"{name}-{i}") for i in range(60)],
                backend=backend,
            )
            for name in ("alice", "bob")
        }
        outputs = {name: [o.output for o in run.result()] for name, run in runs.items()}
    assert outputs == {"alice": ["alice"] * 60, "bob": ["bob"] * 60}
    lines = log.read_text().splitlines()
    assert len(lines) == len(set(lines)) <= 4  # once per worker process and caller


# -- nothing left behind ------------------------------------------------------------------


@pytest.mark.slow
def test_dask_calls_leave_nothing_behind_and_are_never_run_again(tmp_path: Path) -> None:
    """30 calls then a crashing one: the scheduler and client hold nothing of them, none re-ran."""
    with _private_client(allowed_failures=0) as client:
        backend = DaskBackend(client)
        before = client.run_on_scheduler(procorch_state), client_state(client)
        for call in range(30):
            out = execute_steps_parallel(
                CountingExecutor(str(tmp_path)),
                [spec(f"c{call}s{i}") for i in range(4)],
                events=lambda event: None,
                backend=backend,
            )
            assert all(o.success for o in out)
        out = execute_steps_parallel(
            CountingExecutor(str(tmp_path)),
            [spec("x", "segfault"), spec("last")],
            backend=backend,
        )
        assert out[0].error is not None and out[0].error.kind == "crash" and out[1].success
        # Releases travel on the client's batched stream: give them a moment to arrive.
        deadline = time.monotonic() + 10
        while True:
            after = client.run_on_scheduler(procorch_state), client_state(client)
            if after == before or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert after == before
    runs = runs_by_task(tmp_path)
    assert {task_id: n for task_id, n in runs.items() if task_id != "x" and n != 1} == {}


# -- the caller never waits on the cluster -------------------------------------------


@pytest.mark.slow
def test_dask_call_timeout_acts_while_a_worker_restarts(tmp_path: Path, cluster: Any) -> None:
    """A step past its limit has its worker restarted; the call's deadline still acts on time."""
    with distributed.Client(cluster, set_as_default=False) as client:
        start = time.monotonic()
        out = execute_steps_parallel(
            GuardExecutor(str(tmp_path)),
            [spec("a", "c_hang"), spec("b", "c_hang")],
            step_timeouts={"a": 1.0},
            call_timeout=3.0,
            backend=DaskBackend(client),
        )
        elapsed = time.monotonic() - start
        # The restarts go on in the background: let them end before the next test
        # (a restarted worker comes back at another address).
        stopped = set(re.findall(r"Dask worker \((tcp://[^)]+)\)", out[0].output + out[1].output))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = set(client.scheduler_info()["workers"])
            if len(workers) == 2 and not workers & stopped:
                break
            time.sleep(0.1)
    assert elapsed < 3.0 + 2.5, elapsed  # 10.5 s when the restart was waited for
    assert out[0].error is not None and out[0].error.kind == "timeout"
    assert out[1].error is not None and out[1].error.kind == "timeout"
    assert "procorch asked the nanny of its Dask worker (tcp://" in out[0].output


# -- what DaskBackend takes --------------------------------------------------------------


def test_dask_backend_takes_a_cluster_object(tmp_path: Path, cluster: Any) -> None:
    """A cluster object (anything with a scheduler_address) is a backend: a client per call."""
    backend = DaskBackend(cluster)
    assert backend.address == cluster.scheduler_address
    out = execute_steps_parallel(SeedExecutor(2, tmp_path), [spec("a"), spec("b")], backend=backend)
    assert [o.success for o in out] == [True, True]


def test_dask_backend_passes_security_to_its_client(tmp_path: Path, cluster: Any) -> None:
    """An address with security= makes its client with it (here an empty one, no TLS)."""
    backend = DaskBackend(cluster.scheduler_address, security=distributed.Security())
    out = execute_steps_parallel(SeedExecutor(2, tmp_path), [spec("a")], backend=backend)
    assert out[0].success


def test_dask_backend_refuses_what_it_cannot_use(backend: DaskBackend) -> None:
    """Neither a client, a cluster nor an address; security beside a Client."""
    with pytest.raises(TypeError, match=r"takes a distributed\.Client, a cluster object"):
        DaskBackend(42)
    with pytest.raises(ValueError, match="security is for a scheduler address or a cluster"):
        DaskBackend(backend.client, security=distributed.Security())


def test_dask_step_usage_is_measured_on_a_one_thread_worker(backend: DaskBackend) -> None:
    """A one-thread Dask worker measures a step's CPU like a lane; a crash leaves the wall time."""
    seen: list[Event] = []
    steps = [spec("burn", "burn"), spec("crash", "segfault")]
    execute_steps_parallel(UsageExecutor(), steps, events=seen.append, backend=backend)
    finished = {e.task_id: e for e in seen if isinstance(e, StepFinished)}
    burn, crash = finished["burn"].usage, finished["crash"].usage
    assert burn is not None and burn.cpu is not None
    assert set(burn.missing) <= {"children_max_rss"}  # the worker may have reaped a child before
    assert 0.25 <= burn.cpu <= 3.0, burn
    assert burn.max_rss is not None and burn.max_rss >= 100 * 2**20
    assert crash is not None and crash.cpu_user is None and "cpu_user" in crash.missing


def test_dask_step_usage_on_a_threaded_worker_is_the_wall_time(threaded_client: object) -> None:
    """Steps sharing a 4-thread worker's process: only their wall time is theirs."""
    seen: list[Event] = []
    execute_steps_parallel(
        UsageExecutor(),
        [spec("burn", "burn")],
        events=seen.append,
        backend=DaskBackend(threaded_client),
    )
    (finished,) = [e for e in seen if isinstance(e, StepFinished)]
    assert finished.usage is not None and finished.usage.wall >= 0.25
    assert finished.usage.cpu_user is None and "cpu_user" in finished.usage.missing
