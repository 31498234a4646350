"""The Dask backend on a cluster of real processes, as a user runs one.

A ``dask scheduler`` and two ``dask worker`` processes (with nannies, unless a
test says otherwise) on loopback, started from this venv's ``dask`` command,
not a ``LocalCluster``: the nannies, restarts and connections are those of a
real deployment. Deselect with ``-m 'not dask_cluster'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from dask_helpers import CountingExecutor, NamedExecutor, client_state, procorch_state, runs_by_task
from helpers import FaultyExecutor, GuardExecutor, gone, kill_tree, run_to_end, spec

from procorch import (
    AgentExecutor,
    AgentStepSpec,
    CancelToken,
    DaskBackend,
    Event,
    EventSink,
    RetryPolicy,
    StepCrashed,
    StepOutcome,
    StepProgress,
    StepStarted,
    execute_steps_parallel,
)

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask_cluster, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
DASK = Path(sys.executable).parent / "dask"
STARTUP_SECONDS = 120.0  # a hang guard: a busy 2-core machine takes a few seconds


@contextlib.contextmanager
def real_cluster(
    where: Path,
    *,
    workers: int = 2,
    threads: int = 1,
    nanny: bool = True,
    allowed_failures: int = 0,
    extra_scheduler: tuple[str, ...] = (),
    extra_worker: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes on loopback; yields the scheduler's address.

    Every process is started in a session of its own and killed with its
    children in the ``finally``, whatever happened. The workers find the test
    executors through PYTHONPATH (the tests' directory), as a user's workers
    find theirs on their own path.
    """
    where.mkdir(parents=True, exist_ok=True)
    scheduler_file = where / f"scheduler-{uuid.uuid4().hex}.json"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(allowed_failures),
        **(env or {}),
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(where / f"{name}.log", "wb")
        logs.append(log)
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append(process)
        return process

    try:
        scheduler = start(
            "scheduler",
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file), *extra_scheduler],
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_SECONDS
        address = None
        while address is None:
            if scheduler.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the scheduler did not start: {(where / 'scheduler.log').read_text()}")
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):  # not written yet, or half written
                time.sleep(0.05)
        for number in range(workers):
            start(
                f"worker-{number}",
                [str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", str(threads),
                 "--no-dashboard", "--memory-limit", "400MiB", "--name", f"w{number}",
                 "--nanny" if nanny else "--no-nanny", *extra_worker],
            )  # fmt: skip
        with distributed.Client(
            address, set_as_default=False, timeout=f"{STARTUP_SECONDS:g}s", **_tls(extra_worker)
        ) as client:
            client.wait_for_workers(workers, timeout=STARTUP_SECONDS)
        yield address
    finally:
        for process in reversed(processes):
            kill_tree(process)
        for log in logs:
            log.close()


def _tls(extra: tuple[str, ...]) -> dict[str, Any]:
    """The client's Security for a cluster started with TLS options (none otherwise)."""
    options = dict(zip(extra[::2], extra[1::2], strict=False))
    if "--tls-ca-file" not in options:
        return {}
    security = distributed.Security(
        tls_ca_file=options["--tls-ca-file"],
        tls_client_cert=options["--tls-cert"],
        tls_client_key=options["--tls-key"],
        require_encryption=True,
    )
    return {"security": security}


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the module's cluster keeps its scheduler file and its processes' logs."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(cluster_dir: Path) -> Iterator[str]:
    """Two single-threaded workers with nannies; allowed-failures 0, as advised."""
    with real_cluster(cluster_dir) as address:
        yield address


@pytest.fixture
def client(cluster: str) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as made:
        made.wait_for_workers(2, timeout=STARTUP_SECONDS)  # a restart of an earlier test
        yield made


def test_real_cluster_runs_a_batch(tmp_path: Path, client: Any) -> None:
    """The smoke test: outcomes in order, an exception labelled, a crash labelled."""
    out = execute_steps_parallel(
        FaultyExecutor(hint=2),
        [spec("a"), spec("x", "raise"), spec("b")],
        backend=DaskBackend(client),
    )
    assert [(o.task_id, o.success) for o in out] == [("a", True), ("x", False), ("b", True)]


@pytest.fixture(scope="module")
def threaded_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two workers with four threads each, as Dask gives a 4-core machine by default."""
    with real_cluster(tmp_path_factory.mktemp("threaded"), threads=4) as address:
        yield address


def _settle(client: Any, stopped: set[str], workers: int = 2) -> None:
    """Wait until ``workers`` workers are up and none of them is one at ``stopped``.

    A restart that procorch asked for goes on after the call returns; the next
    test must not find a worker about to go away.
    """
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        up = set(client.scheduler_info()["workers"])
        if len(up) == workers and not up & stopped:
            return
        time.sleep(0.1)
    pytest.fail(f"the workers did not come back: {stopped}")


def _stopped_workers(outcomes: list[StepOutcome]) -> set[str]:
    return {
        address
        for outcome in outcomes
        for address in re.findall(r"Dask worker \((tcp://[^)]+)\)", outcome.output)
    }


# -- whose executor runs a step -------------------------------------------------------


def test_concurrent_callers_on_four_thread_workers_get_their_own_executor(
    threaded_cluster: str,
) -> None:
    """Two callers at once on 4-thread workers: every step runs its own caller's executor."""
    with distributed.Client(threaded_cluster, set_as_default=False) as client:
        backend = DaskBackend(client)
        with ThreadPoolExecutor(2) as pool:
            runs = {
                name: pool.submit(
                    execute_steps_parallel,
                    NamedExecutor(name),
                    [spec(f"{name}-{i}") for i in range(100)],
                    backend=backend,
                )
                for name in ("alice", "bob")
            }
            outputs = {name: [o.output for o in run.result()] for name, run in runs.items()}
    assert outputs == {"alice": ["alice"] * 100, "bob": ["bob"] * 100}


_CALLER = """
import json, os, sys
sys.path.insert(0, {tests!r})
from dask_helpers import NamedExecutor
from helpers import spec
import procorch

out = procorch.execute_steps_parallel(
    NamedExecutor({name!r}),
    [spec({name!r} + "-" + str(i)) for i in range(40)],
    backend=procorch.DaskBackend({address!r}),
)
print(json.dumps({{"pid": os.getpid(), "outputs": [o.output for o in out]}}))
"""


def test_callers_with_the_same_pid_get_their_own_executor(
    tmp_path: Path, threaded_cluster: str
) -> None:
    """Two callers at once with the same pid, as in two containers.

    Each runs in a PID namespace of its own, as pid 1 (skipped where the
    machine does not allow it: replacing ``os.getpid`` breaks ``distributed``
    itself, which asks psutil about its own pid).
    """
    unshare = ["unshare", "--pid", "--fork"]
    try:
        isolated = run_to_end([*unshare, "true"], timeout=60).returncode == 0
    except FileNotFoundError:
        isolated = False
    if not isolated:
        pytest.skip("cannot make a PID namespace here (needs root or user namespaces)")
    callers = {}
    try:
        for name in ("alice", "bob"):
            script = tmp_path / f"{name}.py"
            script.write_text(_CALLER.format(tests=str(TESTS), name=name, address=threaded_cluster))
            callers[name] = subprocess.Popen(
                [*unshare, sys.executable, str(script)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        said = {name: caller.communicate(timeout=240) for name, caller in callers.items()}
    finally:
        for caller in callers.values():
            kill_tree(caller)
    results = {name: json.loads(stdout) for name, (stdout, _) in said.items()}
    assert [results[name]["pid"] for name in ("alice", "bob")] == [1, 1], said
    assert results["alice"]["outputs"] == ["alice"] * 40
    assert results["bob"]["outputs"] == ["bob"] * 40


# -- a client that lives for many calls ---------------------------------------------


def _quiet(client: Any) -> tuple[dict[str, int], dict[str, int]]:
    """The scheduler's and the client's state once no procorch task is left (or 30 s passed).

    Releases travel on the client's batched stream: they arrive a moment after a call returns.
    """
    deadline = time.monotonic() + 30
    while True:
        state = client.run_on_scheduler(procorch_state), client_state(client)
        if state[0]["tasks"] == state[1]["futures"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


class BulkyExecutor(AgentExecutor):
    """Carries ``size`` bytes of ballast (pickled with it); emits two events per step."""

    def __init__(self, size: int) -> None:
        self.ballast = os.urandom(size)

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit(1)
        events.emit(2)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, str(len(self.ballast)), True)


def test_fifty_calls_on_one_client_leave_nothing_behind(client: Any) -> None:
    """50 calls: the scheduler's queues, topics, stored events and the client's memory stay flat."""
    me = psutil.Process()

    def call() -> None:
        out = execute_steps_parallel(
            BulkyExecutor(8 * 2**20),
            [spec(str(i)) for i in range(4)],
            events=lambda event: None,
            backend=DaskBackend(client),
        )
        assert [o.output for o in out] == [str(8 * 2**20)] * 4

    call()  # the first call imports and warms what every later call uses
    before = _quiet(client)
    memory_before = me.memory_info().rss
    for _ in range(50):
        call()
    after = _quiet(client)
    grown = me.memory_info().rss - memory_before
    assert after == before
    assert after[0]["queues"] == after[0]["tasks"] == 0, after
    # 50 calls of an 8 MiB executor: 400 MiB if calls kept their executors.
    assert grown < 100 * 2**20, f"the client grew by {grown / 2**20:.0f} MiB"


def test_a_crash_after_earlier_calls_does_not_run_their_steps_again(
    tmp_path: Path, client: Any
) -> None:
    """10 calls, then one whose step kills two workers: no earlier step ran a second time."""
    backend = DaskBackend(client)
    for call in range(10):
        out = execute_steps_parallel(
            CountingExecutor(str(tmp_path)),
            [spec(f"c{call}s{i}") for i in range(4)],
            backend=backend,
        )
        assert all(o.success for o in out)
    out = execute_steps_parallel(
        CountingExecutor(str(tmp_path)), [spec("x", "segfault"), spec("last")], backend=backend
    )
    assert out[0].error is not None and out[0].error.kind == "crash" and out[1].success
    runs = runs_by_task(tmp_path)
    assert len(runs) == 42
    assert {task_id: n for task_id, n in runs.items() if task_id != "x" and n != 1} == {}


# -- labels from evidence ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "code", "name"),
    [("segfault", -11, "SIGSEGV"), ("abort", -6, "SIGABRT"), ("exit", 3, None)],
)
def test_crash_outcome_carries_the_exit_code_or_signal(
    client: Any, agent: str, code: int, name: str | None
) -> None:
    """The nanny's exit code reaches the outcome and the StepCrashed event; Dask's words do not."""
    seen: list[Event] = []
    out = execute_steps_parallel(
        FaultyExecutor(hint=2),
        [spec("a"), spec("x", agent), spec("b")],
        events=seen.append,
        backend=DaskBackend(client),
    )
    error = out[1].error
    assert error is not None and error.kind == "crash", out[1].output
    assert (error.exit_code, error.signal) == (code, name), out[1].output
    assert out[0].success and out[2].success
    crashed = [event for event in seen if isinstance(event, StepCrashed)]
    assert [(e.task_id, e.exit_code, e.signal) for e in crashed] == [("x", code, name)]
    assert f"(pid {error.pid}) on the Dask worker at tcp://127.0.0.1:" in out[1].output
    for dask_words in ("procorch-step-", "different workers", "KilledWorker"):
        assert dask_words not in out[1].output


def test_retry_waits_its_backoff(tmp_path: Path, client: Any) -> None:
    """Attempt n + 1 starts at least backoff * 2 ** (n - 1) s after attempt n (worker's clock)."""
    policy = RetryPolicy(attempts=3, backoff=0.5, on=frozenset({"exception"}))
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path), succeed_on=3),
        [spec("f", "flaky")],
        retry=policy,
        backend=DaskBackend(client),
    )
    assert out[0].success, out[0].output
    starts = [float((tmp_path / f"try-f-{attempt}").read_text()) for attempt in (1, 2, 3)]
    assert starts[1] - starts[0] >= 0.5
    assert starts[2] - starts[1] >= 1.0


class AckExecutor(AgentExecutor):
    """Emits 0, waits for the caller to acknowledge it (a file ``<task_id>``), then emits 1.

    A step whose first event is not delivered while it runs waits out
    ``patience`` and fails: only live delivery lets every step succeed.
    """

    def __init__(self, ack_dir: str, patience: float = 10.0) -> None:
        self.ack_dir = ack_dir
        self.patience = patience

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit(0)
        ack = Path(self.ack_dir, spec.task_id)
        deadline = time.monotonic() + self.patience
        while not ack.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        events.emit(1)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", ack.exists())


def test_live_progress_for_every_step_of_a_batch(tmp_path: Path, client: Any) -> None:
    """50 steps: each step's first event reaches the caller while the step runs, all in order."""
    seen: list[Event] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, StepProgress) and event.data == 0:
            Path(tmp_path, event.task_id).touch()

    out = execute_steps_parallel(
        AckExecutor(str(tmp_path)),
        [spec(str(i)) for i in range(50)],
        events=on_event,
        backend=DaskBackend(client),
    )
    assert [o.success for o in out] == [True] * 50
    for i in range(50):
        kinds = [(type(e).__name__, getattr(e, "data", None)) for e in seen if e.task_id == str(i)]
        assert kinds == [
            ("StepStarted", None),
            ("StepProgress", 0),
            ("StepProgress", 1),
            ("StepFinished", None),
        ], kinds


# -- the caller never waits on the cluster --------------------------------------------


@pytest.mark.parametrize("guard", ["call_timeout", "cancel", "step_timeout"])
def test_guards_act_on_time_while_a_worker_restarts(
    tmp_path: Path, client: Any, guard: str
) -> None:
    """Step 'a' passes its 1 s limit: its worker restarts, and meanwhile another guard acts.

    The bound is a hang guard (the restart alone takes seconds; waiting for it
    made call_timeout=5 return after 10 s).
    """
    token = CancelToken()
    options: dict[str, Any] = {"step_timeouts": {"a": 1.0}}
    if guard == "call_timeout":
        options["call_timeout"] = 3.0
    elif guard == "cancel":
        options["cancel"] = token
        threading.Timer(3.0, token.cancel).start()
    else:
        options["step_timeouts"]["b"] = 3.0
    start = time.monotonic()
    out = execute_steps_parallel(
        GuardExecutor(str(tmp_path)),
        [spec("a", "c_hang"), spec("b", "c_hang")],
        backend=DaskBackend(client),
        **options,
    )
    elapsed = time.monotonic() - start
    _settle(client, _stopped_workers(out))
    assert elapsed < 3.0 + 2.5, elapsed
    assert out[0].error is not None and out[0].error.kind == "timeout"
    expected = "cancelled" if guard == "cancel" else "timeout"
    assert out[1].error is not None and out[1].error.kind == expected, out[1].output
    assert "asked the nanny of its Dask worker (tcp://" in out[1].output


def test_a_step_on_a_worker_without_a_nanny_is_said_to_be_maybe_running(tmp_path: Path) -> None:
    """--no-nanny: a timed-out step cannot be stopped, and its outcome says so.

    Without work stealing both steps are queued on the worker that holds the
    executor: the other step runs only if procorch takes that worker out of
    the scheduler's rotation, as it must, its one thread being stuck for good.
    """
    no_stealing = {"DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}
    with (
        real_cluster(tmp_path / "cluster", nanny=False, env=no_stealing) as address,
        distributed.Client(address, set_as_default=False) as client,
    ):
        out = execute_steps_parallel(
            GuardExecutor(str(tmp_path)),
            [spec("a", "c_hang"), spec("b")],
            step_timeout=1.0,
            backend=DaskBackend(client),
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while len(client.scheduler_info()["workers"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(client.scheduler_info()["workers"]) == 1  # the stuck worker is retired
    assert out[1].success
    assert out[0].error is not None and out[0].error.kind == "timeout"
    assert "asked the scheduler to retire that worker" in out[0].output
    assert "has no nanny to restart it" in out[0].output
    assert "may still be running there" in out[0].output
    assert "asked the nanny" not in out[0].output


# -- the command line ---------------------------------------------------------------------

_WORDCOUNT = """
from procorch import AgentExecutor, StepOutcome

def count(text):
    return len(text.split())

class WordCount(AgentExecutor):
    def execute_step(self, spec, events):
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, str(count(spec.prompt)), True)
"""


def test_command_line_ships_an_executor_module_the_workers_cannot_import(
    tmp_path: Path, cluster: str
) -> None:
    """procorch run --dask with an executor module in the current directory only."""
    module = f"wordcount_{uuid.uuid4().hex[:8]}"  # no worker has it on its path
    (tmp_path / f"{module}.py").write_text(_WORDCOUNT)
    lines = [
        msgspec.json.encode(AgentStepSpec(f"t{i}", "wc", "d", "a b c"[: 2 * i + 1])).decode()
        for i in range(3)
    ]
    (tmp_path / "specs.jsonl").write_text("\n".join(lines) + "\n")
    result = run_to_end(
        [sys.executable, "-m", "procorch", "run", f"{module}:WordCount", "specs.jsonl",
         "--dask", cluster, "-q"],
        timeout=120,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcomes = [msgspec.json.decode(line, type=StepOutcome) for line in result.stdout.splitlines()]
    assert [(o.task_id, o.output) for o in outcomes] == [("t0", "1"), ("t1", "2"), ("t2", "3")]


def _self_signed(where: Path) -> tuple[str, str] | None:
    """A certificate for 127.0.0.1 and its key (the certificate is its own CA), or None."""
    cert, key = where / "cert.pem", where / "key.pem"
    made = run_to_end(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=procorch-test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        timeout=60,
        capture_output=True,
    )  # fmt: skip
    return (str(cert), str(key)) if made.returncode == 0 else None


def test_command_line_reaches_a_tls_cluster(tmp_path: Path) -> None:
    """--dask tls://... with --dask-tls-ca-file/--dask-tls-cert/--dask-tls-key runs the batch."""
    try:
        made = _self_signed(tmp_path)
    except FileNotFoundError:
        made = None
    if made is None:
        pytest.skip("openssl cannot make a certificate here")
    cert, key = made
    tls = ("--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key)
    (tmp_path / "specs.jsonl").write_text(
        "".join(msgspec.json.encode(spec(t)).decode() + "\n" for t in ("a", "b"))
    )
    with real_cluster(
        tmp_path / "cluster",
        extra_scheduler=("--protocol", "tls", *tls),
        extra_worker=tls,
    ) as address:
        assert address.startswith("tls://")
        command = [sys.executable, "-m", "procorch", "run", "helpers:FaultyExecutor",
                   "specs.jsonl", "--dask", address, "-q"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(TESTS)}
        plain = run_to_end(
            command, timeout=120, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        result = run_to_end(
            [*command, "--dask-tls-ca-file", cert, "--dask-tls-cert", cert, "--dask-tls-key", key],
            timeout=120,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
    assert plain.returncode == 2, plain.stderr
    assert "needs --dask-tls-ca-file and --dask-tls-cert" in plain.stderr
    assert result.returncode == 0, result.stderr
    outcomes = [msgspec.json.decode(line, type=StepOutcome) for line in result.stdout.splitlines()]
    assert [(o.task_id, o.success) for o in outcomes] == [("a", True), ("b", True)]


# -- per-step annotations -------------------------------------------------------------------


def test_annotations_pin_a_step_to_a_worker(client: Any) -> None:
    """annotations={"x": {"workers": [address]}}: step x runs there, each time."""
    workers = client.scheduler_info()["workers"]
    address = sorted(workers, key=lambda worker: workers[worker]["name"])[0]
    pid = client.run(os.getpid, workers=[address])[address]
    pinned = {f"x{i}": {"workers": [address], "allow_other_workers": False} for i in range(6)}
    seen: list[Event] = []
    out = execute_steps_parallel(
        FaultyExecutor(hint=2),
        [spec(f"x{i}") for i in range(6)],
        events=seen.append,
        backend=DaskBackend(client, annotations=pinned),
    )
    assert all(o.success for o in out)
    pids = {event.pid for event in seen if isinstance(event, StepStarted)}
    assert pids == {pid}


@pytest.mark.parametrize(
    ("annotations", "error", "words"),
    [
        ({"a": {"gpu": 1}}, ValueError, "annotations['a']: unknown 'gpu'"),
        ({"a": {"priority": "high"}}, ValueError, "annotations['a']['priority'] has the wrong"),
        ({"a": 3}, TypeError, r"annotations\['a'\] must be a dict"),
        ([("a", {})], TypeError, "annotations must map a task_id"),
    ],
)
def test_annotations_that_dask_cannot_take_are_refused_up_front(
    cluster: str, annotations: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words) if error is ValueError else words):
        DaskBackend(cluster, annotations=annotations)


# -- the README -----------------------------------------------------------------------------


def test_readme_dask_example_runs_on_a_real_cluster(tmp_path: Path, client: Any) -> None:
    """The README's Dask section, against the cluster its shell block starts, prints its promise."""
    text = (TESTS.parent / "README.md").read_text()
    section = text[text.index("## Beyond one machine") :]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    promised = [line[2:] for line in block.splitlines() if re.match(r"# [abc] ", line)]
    script = tmp_path / "example.py"
    script.write_text(block)
    address = client.scheduler.address
    result = run_to_end(
        [sys.executable, str(script)],
        timeout=120,
        env={**os.environ, "DASK_SCHEDULER": address},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.splitlines()
        == promised
        == ["a True HELLO", "b False SIGABRT", "c True WORLD"]
    )


_HANG = """
import os, time
from pathlib import Path
from procorch import AgentExecutor, StepOutcome

STATE = {state!r}

class Hang(AgentExecutor):
    def execute_step(self, spec, events):
        Path(STATE, "pid.part").write_text(str(os.getpid()))
        Path(STATE, "pid.part").rename(Path(STATE, "pid"))
        time.sleep(3600)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True)
"""


def test_ctrl_c_on_the_command_line_stops_the_step_on_the_cluster(
    tmp_path: Path, client: Any
) -> None:
    """Ctrl-C while a step runs on a worker: exit 130, and that worker process is restarted.

    (The command line writes only finished outcomes at a Ctrl-C.)
    """
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "hang_executor.py").write_text(_HANG.format(state=str(state)))
    (tmp_path / "specs.jsonl").write_text(msgspec.json.encode(spec("h")).decode() + "\n")
    address = client.scheduler.address
    caller = subprocess.Popen(
        [sys.executable, "-m", "procorch", "run", "hang_executor:Hang", "specs.jsonl",
         "--dask", address, "-q", "-o", "outcomes.jsonl"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (state / "pid").exists():
            if caller.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the step never started: {caller.communicate()[1]}")
            time.sleep(0.02)
        worker = int((state / "pid").read_text())
        pids = client.run(os.getpid)  # by worker address
        caller.send_signal(signal.SIGINT)
        _, stderr = caller.communicate(timeout=120)
    finally:
        kill_tree(caller)
    assert caller.returncode == 130, stderr
    assert "1 running were stopped" in stderr
    assert gone([worker], within=60)
    _settle(client, {address for address, pid in pids.items() if pid == worker})


def test_the_scheduler_logs_no_errors_of_procorch_calls(cluster_dir: Path, client: Any) -> None:
    """After every test above on this cluster: no scheduler handler failed on procorch's account.

    (A queue wait that timed out logged a 22-line traceback every 0.2 s while a step ran.)
    """
    execute_steps_parallel(
        GuardExecutor(str(cluster_dir)), [spec("slow", "slow")], backend=DaskBackend(client)
    )
    log = (cluster_dir / "scheduler.log").read_text()
    assert "Exception while handling op" not in log
    assert "Run out-of-band function '_forget_on_scheduler'" in log  # the log is the right one
