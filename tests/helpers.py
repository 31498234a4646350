"""Executors that behave (and misbehave) on purpose, importable by workers.

Steps pick their behaviour from ``spec.agent``. Anything a test needs to see
across processes is written to files in a directory the test owns, since the
executor runs in other processes than the test.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome


def ok_outcome(spec: AgentStepSpec, **fields: Any) -> StepOutcome:
    """The outcome an ordinary step returns."""
    return StepOutcome(
        task_id=spec.task_id,
        session_id=f"task-run-{spec.task_id}",
        agent=spec.agent,
        output=f"ran: {spec.prompt}",
        success=True,
        **fields,
    )


class SeedExecutor(AgentExecutor):
    """The seed's mock: sleeps, fails for agent 'fail', raises for agent 'boom'.

    Every step appends its start and end (monotonic clock, shared by all
    processes on the machine) to ``record_dir`` so tests can compute peaks.
    """

    def __init__(self, hint: int, record_dir: Path, sleep: float = 0.02) -> None:
        self.hint = hint
        self.record_dir = Path(record_dir)
        self.sleep = sleep

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        start = time.monotonic()
        time.sleep(self.sleep)
        end = time.monotonic()
        record = {"task_id": spec.task_id, "pid": os.getpid(), "start": start, "end": end}
        (self.record_dir / f"{spec.task_id}.json").write_text(json.dumps(record))
        if spec.agent == "boom":
            raise AssertionError("boom")
        return StepOutcome(
            task_id=spec.task_id,
            session_id=f"task-run-{spec.task_id}",
            agent=spec.agent,
            output=f"ran: {spec.prompt}",
            success=spec.agent != "fail",
        )

    def concurrency_hint(self) -> int:
        return self.hint


class SlowAgentExecutor(SeedExecutor):
    """A SeedExecutor whose steps of agent 'slow' take a second, the others 50 ms."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        self.sleep = 1.0 if spec.agent == "slow" else 0.05
        return super().execute_step(spec, events)


def read_records(record_dir: Path) -> list[dict[str, Any]]:
    """Every record a SeedExecutor wrote."""
    return [json.loads(path.read_text()) for path in sorted(Path(record_dir).glob("*.json"))]


def peak_overlap(records: list[dict[str, Any]]) -> int:
    """The most steps whose [start, end] intervals overlapped at one instant."""
    edges = sorted(
        [(r["start"], 1) for r in records] + [(r["end"], -1) for r in records],
        key=lambda edge: (edge[0], edge[1]),
    )
    active = peak = 0
    for _, change in edges:
        active += change
        peak = max(peak, active)
    return peak


class BareExecutor(AgentExecutor):
    """An executor that keeps the default concurrency hint."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        return StepOutcome.failed(spec.task_id, spec.agent, "unused")


def _wait_for_peers(barrier_dir: str, parties: int, deadline: float = 30.0) -> None:
    """Block until ``parties`` steps have reached the barrier (files in a directory)."""
    Path(barrier_dir, f"{os.getpid()}").touch()
    end = time.monotonic() + deadline
    while len(os.listdir(barrier_dir)) < parties and time.monotonic() < end:
        time.sleep(0.005)


class RendezvousExecutor(AgentExecutor):
    """Keeps the default concurrency hint; records each step's span like SeedExecutor.

    Each step waits (30 s at most) until ``parties`` steps have started, so that
    they overlap however slowly the workers start; a step of agent 'last' also
    waits (60 s at most) until some other step has finished.
    """

    def __init__(self, record_dir: Path, parties: int) -> None:
        self.record_dir = Path(record_dir)
        self.parties = parties

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        start = time.monotonic()
        barrier = self.record_dir / "barrier"
        barrier.mkdir(exist_ok=True)
        _wait_for_peers(str(barrier), self.parties)
        deadline = time.monotonic() + 60
        while spec.agent == "last" and not list(self.record_dir.glob("*.json")):
            assert time.monotonic() < deadline, "no other step finished"
            time.sleep(0.01)
        record = {"task_id": spec.task_id, "pid": os.getpid(), "start": start}
        record["end"] = time.monotonic()
        (self.record_dir / f"{spec.task_id}.json").write_text(json.dumps(record))
        return ok_outcome(spec)


class FaultyExecutor(AgentExecutor):
    """Each step does what its agent names; 'ok' steps succeed.

    Faults: segfault, abort, sigbus, sigfpe, exit, sigkill, raise, systemexit,
    keyboardinterrupt, not_an_outcome, unsendable, bad_field, hang (sleeps
    until killed from outside). With ``barrier_dir``, the faulty steps wait
    for ``parties`` of them to arrive before failing, so they fail together.
    """

    def __init__(self, hint: int = 2, barrier_dir: str | None = None, parties: int = 0) -> None:
        self.hint = hint
        self.barrier_dir = barrier_dir
        self.parties = parties

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit({"step": spec.task_id, "phase": "begin"})
        fault = spec.agent
        if fault != "ok" and self.barrier_dir is not None:
            _wait_for_peers(self.barrier_dir, self.parties)
        if fault == "segfault":
            ctypes.string_at(0)
        elif fault == "abort":
            os.abort()
        elif fault == "sigbus":
            os.kill(os.getpid(), signal.SIGBUS)
        elif fault == "sigfpe":
            os.kill(os.getpid(), signal.SIGFPE)
        elif fault == "exit":
            os._exit(3)
        elif fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "hang":
            time.sleep(3600)
        elif fault == "raise":
            raise ValueError(f"bad input in {spec.task_id}")
        elif fault == "systemexit":
            raise SystemExit(2)
        elif fault == "keyboardinterrupt":
            raise KeyboardInterrupt
        elif fault == "not_an_outcome":
            return {"task_id": spec.task_id}  # type: ignore[return-value]
        elif fault == "unsendable":
            return ok_outcome(spec, structured={"when": object()})
        elif fault == "bad_field":
            return StepOutcome(spec.task_id, "s", spec.agent, "out", "yes")  # type: ignore[arg-type]
        time.sleep(0.01)
        events.emit({"step": spec.task_id, "phase": "end"})
        return ok_outcome(spec)


class ChattyExecutor(AgentExecutor):
    """Emits ``count`` numbered progress events per step, then succeeds."""

    def __init__(self, count: int, hint: int = 2) -> None:
        self.count = count
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        for number in range(self.count):
            events.emit(number)
        if spec.agent == "unencodable":
            events.emit(object())
        return ok_outcome(spec)


class PidExecutor(AgentExecutor):
    """Returns its worker's pid as the output, after ``sleep`` seconds."""

    def __init__(self, hint: int = 2, sleep: float = 0.05) -> None:
        self.hint = hint
        self.sleep = sleep

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        time.sleep(self.sleep)
        return ok_outcome(spec, structured={"pid": os.getpid()})


def _note_unpickle(path: str) -> CountingUnpickleExecutor:
    with open(path, "a") as log:
        log.write(f"{os.getpid()}\n")
    return CountingUnpickleExecutor(path)


class CountingUnpickleExecutor(PidExecutor):
    """Writes a line to ``log_path`` every time it is unpickled."""

    def __init__(self, log_path: str) -> None:
        super().__init__(hint=2)
        self.log_path = log_path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_note_unpickle, (self.log_path,))


def _explode_on_unpickle() -> None:
    raise RuntimeError("this executor refuses to be unpickled")


class UnloadableExecutor(PidExecutor):
    """Pickles in the parent, raises when unpickled in a worker."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_on_unpickle, ())


def spec(task_id: str, agent: str = "ok") -> AgentStepSpec:
    """A spec like the seed's tests build."""
    return AgentStepSpec(task_id, agent, "d", f"prompt-{task_id}")


_leaked: list[bytearray] = []  # memory a LeakyExecutor step keeps after it returns


class GuardExecutor(AgentExecutor):
    """Steps that hang, hog memory, print, start children or fail for a while.

    Agents: ok, c_hang (blocked in a C call), py_busy (a Python busy loop),
    hog (allocates until stopped), leak (keeps ``leak_bytes`` after it
    returns), child_then_crash / child_then_hang (start a grandchild that
    sleeps forever, then segfault or hang), print_then_raise,
    print_then_segfault, print_megabytes, flaky (fails until its attempt
    number in ``state_dir`` reaches ``succeed_on``; each attempt's file holds
    when it started, by the machine's monotonic clock), always_raise,
    always_crash (each attempt's file holds its worker's pid), slow. Pids of
    workers and grandchildren go to ``state_dir``.
    """

    def __init__(
        self,
        state_dir: str,
        hint: int = 2,
        succeed_on: int = 3,
        leak_bytes: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.hint = hint
        self.succeed_on = succeed_on
        self.leak_bytes = leak_bytes

    def concurrency_hint(self) -> int:
        return self.hint

    def _note(self, kind: str, pid: int) -> None:
        Path(self.state_dir, f"{kind}-{pid}").touch()

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        import subprocess

        self._note("worker", os.getpid())
        agent = spec.agent
        if agent == "c_hang":
            ctypes.CDLL(None).sleep(3600)
        elif agent == "py_busy":
            while True:
                pass
        elif agent == "hog":
            hoard = []
            for _ in range(400):  # at most 4 GiB: far above any cap a test sets
                hoard.append(bytearray(10 * 2**20))  # bytearray() touches its pages
                time.sleep(0.005)
        elif agent == "leak":
            _leaked.append(bytearray(self.leak_bytes))
            events.emit({"pid": os.getpid()})
        elif agent in ("child_then_crash", "child_then_hang"):
            child = subprocess.Popen(["sleep", "3600"])
            self._note("grandchild", child.pid)
            if agent == "child_then_crash":
                ctypes.string_at(0)
            time.sleep(3600)
        elif agent == "print_then_raise":
            print("python says hello", flush=False)
            os.write(1, b"fd 1 says hello\n")
            subprocess.run(["sh", "-c", "echo child says hello >&2"], check=True)
            raise RuntimeError("failed after printing")
        elif agent == "print_then_segfault":
            print("about to crash")
            ctypes.string_at(0)
        elif agent == "print_megabytes":
            line = b"x" * 1023 + b"\n"
            for _ in range(5 * 1024):
                os.write(1, line)
            os.write(2, b"the end of the output\n")
            raise RuntimeError("printed five megabytes")
        elif agent == "flaky":
            started = time.monotonic()
            attempt = len(list(Path(self.state_dir).glob(f"try-{spec.task_id}-*"))) + 1
            Path(self.state_dir, f"try-{spec.task_id}-{attempt}").write_text(repr(started))
            if attempt < self.succeed_on:
                raise ConnectionError(f"attempt {attempt} failed")
        elif agent in ("always_raise", "always_crash"):
            attempt = len(list(Path(self.state_dir).glob(f"try-{spec.task_id}-*"))) + 1
            Path(self.state_dir, f"try-{spec.task_id}-{attempt}").write_text(str(os.getpid()))
            if agent == "always_raise":
                raise ConnectionError(f"attempt {attempt} never works")
            ctypes.string_at(0)
        elif agent == "slow":
            time.sleep(0.3)
        return ok_outcome(spec, structured={"pid": os.getpid()})

    def pids(self, kind: str) -> set[int]:
        """Pids noted under ``kind`` (worker or grandchild)."""
        return {int(p.name.split("-")[1]) for p in Path(self.state_dir).glob(f"{kind}-*")}


def burn_cpu(seconds: float) -> None:
    """Spin until this process has used ``seconds`` of CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


class UsageExecutor(AgentExecutor):
    """Steps whose cost is known, and the faults a run report draws.

    Agents: ok; burn (0.3 s of CPU, then 100 MiB held at once); child_burn (a
    subprocess that burns 0.3 s of CPU and holds 60 MiB); thread_hog (a
    thread that holds 150 MiB, then exits: the kernel keeps its mark); raise;
    segfault; hang (sleeps until killed); flaky (raises on its first attempt,
    counted in ``state_dir``, succeeds on the next).
    """

    def __init__(self, state_dir: str = "", hint: int = 2) -> None:
        self.state_dir = state_dir
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        import threading

        agent = spec.agent
        if agent == "burn":
            burn_cpu(0.3)
            block = b"x" * (100 * 2**20)  # written, so resident
            del block
        elif agent == "child_burn":
            code = (
                "import time\nblock = b'x' * (60 * 2**20)\nend = time.process_time() + 0.3\n"
                "while time.process_time() < end: pass\n"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
        elif agent == "thread_hog":

            def hold() -> None:
                block = b"x" * (150 * 2**20)
                del block

            thread = threading.Thread(target=hold)
            thread.start()
            thread.join()
        elif agent == "raise":
            raise ValueError(f"bad input in {spec.task_id}")
        elif agent == "segfault":
            ctypes.string_at(0)
        elif agent == "hang":
            time.sleep(3600)
        elif agent == "flaky":
            tries = Path(self.state_dir, f"try-{spec.task_id}")
            if not tries.exists():
                tries.touch()
                raise ConnectionError("first attempt fails")
        else:
            time.sleep(0.01)
        return ok_outcome(spec)


class StructuredExecutor(AgentExecutor):
    """Returns as ``structured`` the JSON found in the spec's prompt ('' for none)."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        value = json.loads(spec.prompt) if spec.prompt else None
        return ok_outcome(spec, structured=value)


class JournaledExecutor(AgentExecutor):
    """Appends 'start <task_id>' and, ``sleep`` seconds later, 'finish <task_id>' to a log.

    A step of agent 'fail' then returns a failed outcome; the others succeed.
    """

    def __init__(self, log_path: str, sleep: float = 0.3, hint: int = 2) -> None:
        self.log_path = log_path
        self.sleep = sleep
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def _log(self, line: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        self._log(f"start {spec.task_id}")
        time.sleep(self.sleep)
        self._log(f"finish {spec.task_id}")
        if spec.agent == "fail":
            return StepOutcome.failed(spec.task_id, spec.agent, "asked to fail")
        return ok_outcome(spec)


def log_counts(log_path: str, word: str) -> dict[str, int]:
    """How many times each task_id appears after ``word`` in a JournaledExecutor log."""
    counts: dict[str, int] = {}
    if not os.path.exists(log_path):
        return counts
    for line in Path(log_path).read_text().splitlines():
        kind, task_id = line.split()
        if kind == word:
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


class AsyncExecutor(AgentExecutor):
    """An executor whose execute_step is a coroutine, awaiting ``delay`` seconds."""

    def __init__(self, delay: float = 0.05, hint: int = 2) -> None:
        self.delay = delay
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    async def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        import asyncio

        events.emit("awaiting")
        await asyncio.sleep(self.delay)
        if spec.agent == "hang":
            await asyncio.sleep(3600)
        return ok_outcome(spec, structured={"loop": type(asyncio.get_running_loop()).__name__})


class QuickExecutor(AgentExecutor):
    """Succeeds at once, unless its agent is 'hang' (sleeps) or 'segfault'."""

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "hang":
            time.sleep(3600)
        if spec.agent == "segfault":
            ctypes.string_at(0)
        if spec.agent == "slow":
            time.sleep(0.2)
        return StepOutcome(spec.task_id, "s", spec.agent, "", True)


def square(x: int) -> int:
    """A plain function for the ProcessPool tests."""
    return x * x


def identity(x: Any) -> Any:
    """Returns its argument: a round trip through a worker."""
    return x


def pid_of(x: Any) -> tuple[Any, int]:
    """Returns its argument with the pid of the worker that ran it."""
    return x, os.getpid()


def crash_or_pid(x: int, bad: int) -> tuple[int, int]:
    """Segfaults when ``x == bad``, else returns x with its worker's pid."""
    if x == bad:
        ctypes.string_at(0)
    return x, os.getpid()


def crash_on(x: int, bad: int) -> int:
    """Segfaults when ``x == bad``, else returns x."""
    if x == bad:
        ctypes.string_at(0)
    return x


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def interval(seconds: float) -> tuple[float, float]:
    """Sleeps; returns when it started and ended (monotonic clock, shared by processes)."""
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def running(pid: int) -> bool:
    """Whether process ``pid`` is alive (a zombie counts as gone)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def gone(pids: Iterable[int], within: float = 10.0) -> bool:
    """Poll until none of ``pids`` is alive; False if some still are after ``within`` s."""
    deadline = time.monotonic() + within
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill_tree(process: subprocess.Popen[Any]) -> None:
    """Kill ``process`` and every process below it, then reap it: a test's ``finally``.

    Descendants are listed before anything is killed, while they are still attached
    to the tree, so a worker in a process group of its own is reached all the same.
    A process that has already ended is only reaped; its pipes are closed either way.
    """
    import psutil

    if process.poll() is None:  # once reaped, its pid may name another program
        try:
            top = psutil.Process(process.pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)
        process.kill()
    process.wait(timeout=10)
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def run_to_end(
    command: list[str], timeout: float, **options: Any
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` whose child, and the child's own children, die on timeout too."""
    input_ = options.pop("input", None)
    if options.pop("capture_output", False):
        options.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input_ is not None:
        options["stdin"] = subprocess.PIPE
    process = subprocess.Popen(command, **options)
    try:
        stdout, stderr = process.communicate(input_, timeout=timeout)
    finally:
        if process.poll() is None:
            kill_tree(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class WireTamperingExecutor(AgentExecutor):
    """Steps that break procorch's own reporting channel from inside the worker.

    Agents: ok (succeeds, output ``ran: <prompt>``), garbage (writes bytes that
    are no frame to the lane's channel), forged_done (reports an outcome for
    another step), forged_start (announces another step), forged_next (reports
    another step's outcome and the start of a third in one frame), close_channel (closes
    the channel's file descriptor), then each returns normally.
    """

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        from procorch import _protocol, _worker

        assert _worker._channel is not None
        fd = _worker._channel.fileno()
        if spec.agent == "garbage":
            _protocol.write_frame(fd, b"\xc1 this is not msgpack")
        elif spec.agent == "forged_done":
            forged = StepOutcome(spec.task_id, "s", "x", "forged", True)
            _protocol.write_frame(fd, _protocol.encode(_protocol.Done(10_000, 1, forged, 0.0)))
        elif spec.agent == "forged_start":
            started = _protocol.Started(10_000, 1, os.getpid(), time.monotonic())
            _protocol.write_frame(fd, _protocol.encode(started))
        elif spec.agent == "forged_next":
            forged = StepOutcome(spec.task_id, "s", "x", "forged", True)
            done = _protocol.Done(10_000, 1, forged, 0.0)
            frame = _protocol.Next(done, 10_001, 1, os.getpid(), time.monotonic())
            _protocol.write_frame(fd, _protocol.encode(frame))
        elif spec.agent == "close_channel":
            os.close(fd)
        return ok_outcome(spec)


def _daemonize(pid_file: str) -> None:
    """Start a grandchild that leaves the process group and the session, and sleeps.

    The classic double fork: fork, setsid() in the child, fork again, the
    child exits, the grandchild (re-parented away from the worker) writes its
    pid to ``pid_file`` and sleeps. Returns once the pid is written.
    """
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                with open(pid_file + ".tmp", "w") as out:
                    out.write(str(os.getpid()))
                os.rename(pid_file + ".tmp", pid_file)
                time.sleep(3600)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    deadline = time.monotonic() + 30
    while not os.path.exists(pid_file) and time.monotonic() < deadline:
        time.sleep(0.005)


class EscapingExecutor(AgentExecutor):
    """Every step first starts a daemon (see ``_daemonize``), then ends as its agent says.

    Agents: ok, raise, segfault, hang (until killed), fork_bomb (a bounded
    tree of 30 sleeping processes, then returns). Daemon pids go to
    ``state_dir``/<task_id>.pid.
    """

    def __init__(self, state_dir: str, hint: int = 2) -> None:
        self.state_dir = state_dir
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        _daemonize(os.path.join(self.state_dir, f"{spec.task_id}.pid"))
        if spec.agent == "raise":
            raise RuntimeError("after daemonizing")
        if spec.agent == "segfault":
            ctypes.string_at(0)
        if spec.agent == "hang":
            time.sleep(3600)
        if spec.agent == "fork_bomb":
            for _ in range(5):
                if os.fork() == 0:
                    for _ in range(5):
                        if os.fork() == 0:
                            time.sleep(3600)
                            os._exit(0)
                    time.sleep(3600)
                    os._exit(0)
        return ok_outcome(spec)

    def daemons(self) -> list[int]:
        return [int(path.read_text()) for path in Path(self.state_dir).glob("*.pid")]


class SharingExecutor(AgentExecutor):
    """Agent 'share': touches ``mib`` MiB, forks 3 children that keep the pages shared, holds
    them for ``hold`` seconds, then returns. Agent 'hog' keeps allocating until stopped."""

    def __init__(self, mib: int = 80, hold: float = 1.0) -> None:
        self.mib = mib
        self.hold = hold

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "hog":
            hoard = []
            while True:
                block = bytearray(16 * 2**20)
                block[::4096] = b"x" * len(block[::4096])
                hoard.append(block)
        data = bytearray(self.mib * 2**20)
        data[::4096] = b"x" * len(data[::4096])  # every page written: really resident
        children = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                time.sleep(3600)
                os._exit(0)
            children.append(pid)
        time.sleep(self.hold)  # long enough for several readings of the memory guard
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return ok_outcome(spec, structured={"touched": len(data)})


class SandboxExecutor(AgentExecutor):
    """Each step tries to do what its agent names, to test the ``Sandbox`` limits.

    Agents: ok; busy (a CPU loop of 30 s at most); open_many (opens 300 files
    and keeps them); fork_many (starts 20 sleeping children and waits 30 s);
    write_big (writes 8 MiB to a file); connect (connects to the port in the
    prompt on 127.0.0.1); scratch (writes a file in its directory and in
    TMPDIR, returns both paths); env (returns PROCORCH_SECRET, or '<unset>').
    """

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        import socket
        import tempfile

        agent = spec.agent
        if agent == "busy":
            end = time.monotonic() + 30
            while time.monotonic() < end:
                pass
        elif agent == "open_many":
            kept = [open(os.devnull) for _ in range(300)]
            return ok_outcome(spec, structured={"opened": len(kept)})
        elif agent == "fork_many":
            for _ in range(20):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
            time.sleep(30)
        elif agent == "write_big":
            with tempfile.TemporaryFile() as out:
                for _ in range(8):
                    out.write(b"x" * 2**20)
        elif agent == "connect":
            with socket.create_connection(("127.0.0.1", int(spec.prompt)), timeout=10) as conn:
                conn.sendall(b"hello")
        elif agent == "scratch":
            here = os.path.abspath("made-here.txt")
            Path(here).write_text("x")
            with tempfile.NamedTemporaryFile(delete=False) as temp:
                temp.write(b"x")
            return ok_outcome(spec, structured={"cwd": os.getcwd(), "files": [here, temp.name]})
        elif agent == "env":
            return ok_outcome(
                spec, structured={"secret": os.environ.get("PROCORCH_SECRET", "<unset>")}
            )
        return ok_outcome(spec, structured={"cwd": os.getcwd()})


class SoftTimeoutExecutor(AgentExecutor):
    """Steps that meet their time limit in different ways, with a marker file in ``state_dir``.

    Agents: cleanup (sleeps; its finally block writes <task_id>.cleaned),
    stubborn (catches StepTimeout and sleeps on), swallow (catches StepTimeout
    and returns success), quick (returns at once).
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        from procorch import StepTimeout

        marker = Path(self.state_dir, f"{spec.task_id}.cleaned")
        if spec.agent == "cleanup":
            try:
                time.sleep(60)
            finally:
                marker.write_text("cleaned up")
        elif spec.agent == "stubborn":
            try:
                time.sleep(60)
            except StepTimeout:
                time.sleep(60)
        elif spec.agent == "swallow":
            try:
                time.sleep(60)
            except StepTimeout:
                return ok_outcome(spec)
        return ok_outcome(spec)


def _is_fork_server(pid: int) -> bool:
    """Whether process ``pid`` is a procorch fork server."""
    try:
        return b"procorch._forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ServerKillerExecutor(AgentExecutor):
    """Steps of agent 'kill' send ``signum`` to their worker's parent, procorch's fork server.

    Every step first checks that its worker's parent is a fork server (so
    nothing else is ever signalled) and waits at a barrier until ``parties``
    steps are running. Then 'kill' and 'witness' steps wait until their
    worker has lost that parent; a 'kill_then_exit' step kills the server and
    exits with code 3 at once; any other agent just goes on. Steps that
    return succeed, with the server's pid as ``structured["server"]``.
    """

    def __init__(self, barrier_dir: str, parties: int, signum: int) -> None:
        self.barrier_dir = barrier_dir
        self.parties = parties
        self.signum = signum

    def concurrency_hint(self) -> int:
        return self.parties

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        server = os.getppid()
        if not _is_fork_server(server):
            raise RuntimeError(f"this worker's parent (pid {server}) is not a fork server")
        _wait_for_peers(self.barrier_dir, self.parties)
        if spec.agent in ("kill", "kill_then_exit"):
            os.kill(server, self.signum)
        if spec.agent == "kill_then_exit":
            os._exit(3)
        deadline = time.monotonic() + 30
        while spec.agent in ("kill", "witness") and os.getppid() == server:
            # A worker is adopted once its parent is gone.
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fork server (pid {server}) is still this worker's parent")
            time.sleep(0.01)
        return ok_outcome(spec, structured={"server": server})


class WorkerFactsExecutor(AgentExecutor):
    """Reports how its worker was started: its parent, and which marker modules it holds.

    ``colorsys`` is what the tests' programs preload in their own fork
    server; ``frozen`` says the worker inherited objects its server froze
    (``gc.freeze``) after preloading, which procorch's server does and the
    standard library's does not. With ``barrier_dir``, steps wait until
    ``hint`` of them run.
    """

    def __init__(self, hint: int = 2, barrier_dir: str | None = None) -> None:
        self.hint = hint
        self.barrier_dir = barrier_dir

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        parent = os.getppid()
        if self.barrier_dir is not None:
            _wait_for_peers(self.barrier_dir, self.hint)
        facts = {
            "pid": os.getpid(),
            "parent": parent,
            "parent_is_server": _is_fork_server(parent),
            "modules": [name for name in ("colorsys",) if name in sys.modules],
            "frozen": gc.get_freeze_count() > 0,
        }
        return ok_outcome(spec, structured=facts)


def _refuse_to_rebuild() -> None:
    raise ValueError("this object refuses to be rebuilt")


class RebuildsWithError:
    """Pickles fine in the worker; unpickling it (in the caller) raises."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse_to_rebuild, ()


def unreadable_result(x: int) -> Any:
    """Returns an object the caller cannot unpickle when ``x == 0``, else x."""
    return RebuildsWithError() if x == 0 else x


def write_pid_then_sleep(path: str, seconds: float) -> int:
    """Writes its worker's pid to ``path``, then sleeps."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


_initialized_with: list[Any] = []


def remember_initargs(*args: Any) -> None:
    """A ProcessPool initializer: keeps its arguments in the worker."""
    _initialized_with.append(args)


def initialized_with() -> list[Any]:
    """What remember_initargs received in this worker."""
    return list(_initialized_with)


def pid_and_initargs() -> tuple[int, list[Any]]:
    """This worker's pid and what remember_initargs received in it."""
    return os.getpid(), list(_initialized_with)


def wait_for_file(path: Path, within: float = 60.0) -> bool:
    """Whether ``path`` appears within ``within`` seconds (polled)."""
    deadline = time.monotonic() + within
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class _KillOnUse:
    """A stand-in for ``sys.stdout`` that SIGKILLs its process when anything looks at it."""

    def __getattr__(self, name: str) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")  # pragma: no cover


class HotPathExecutor(AgentExecutor):
    """Steps for the fast paths: long chunks, large frames, guards inside a chunk.

    Agents: ok (structured: the worker's pid), segfault, big (structured: the
    prompt's number of bytes of b"z"), cut_big (writes the start of a 32 MiB
    frame on the lane's channel, then SIGKILLs its own worker: a large frame
    cut short mid-write), hang (sleeps a minute), swallow (sleeps; returns
    success when its soft time limit raises StepTimeout), emit (emits "first",
    a 300,000-character string, then "last"), length (output: the prompt's
    length), pause (sleeps the prompt's seconds; pause_emit then emits "tick",
    pause_big then returns 100,000 bytes as structured), trap_stdout (succeeds,
    leaving ``sys.stdout`` an object that SIGKILLs the worker when touched:
    the worker dies after the step returned, before the next one starts).
    """

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        agent = spec.agent
        if agent == "segfault":
            ctypes.string_at(0)
        elif agent == "big":
            return ok_outcome(spec, structured=b"z" * int(spec.prompt))
        elif agent == "cut_big":
            from procorch import _protocol, _worker

            assert _worker._channel is not None
            fd = _worker._channel.fileno()
            _protocol.write_all(fd, struct.pack("<I", 32 << 20) + b"\x93" + b"y" * (2 << 20))
            os.kill(os.getpid(), signal.SIGKILL)
        elif agent == "hang":
            time.sleep(60)
        elif agent == "swallow":
            from procorch import StepTimeout

            try:
                time.sleep(60)
            except StepTimeout:
                return ok_outcome(spec, structured={"pid": os.getpid(), "stopped": True})
        elif agent == "emit":
            events.emit("first")
            events.emit("m" * 300_000)
            events.emit("last")
        elif agent == "length":
            return StepOutcome(spec.task_id, "s", agent, str(len(spec.prompt)), True)
        elif agent == "pause":
            time.sleep(float(spec.prompt))
        elif agent == "pause_emit":
            time.sleep(float(spec.prompt))
            events.emit("tick")
        elif agent == "pause_big":
            time.sleep(float(spec.prompt))
            return ok_outcome(spec, structured=b"z" * 100_000)
        elif agent == "trap_stdout":
            # Returns normally, leaving sys.stdout an object whose first use
            # SIGKILLs the worker: it dies between this step and the next.
            sys.stdout = _KillOnUse()  # type: ignore[assignment]
        return ok_outcome(spec, structured={"pid": os.getpid()})


class KillOnUnpickle:
    """Unpickled in a worker, SIGKILLs it: put first in a large call, it dies mid-transfer."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _kill_this_process, ()


def _kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def large_result_cut_by_sigkill(size: int) -> bytes:
    """Returns ``size`` bytes; its worker SIGKILLs itself once half its Done frame is written."""
    from procorch import _protocol, _worker

    def write_half_then_die(fd: int, parts: list[bytes]) -> None:
        whole = b"".join(parts)
        _protocol.write_all(fd, whole[: len(whole) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    _worker.write_parts = write_half_then_die  # type: ignore[assignment]
    return b"r" * size


class KillOnceOnUnpickle:
    """Like KillOnUnpickle, but only where ``flag`` does not exist yet (it creates it)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[Any, ...]:
        return _kill_this_process_once, (self.flag,)


def _kill_this_process_once(flag: str) -> str:
    if not os.path.exists(flag):
        Path(flag).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return flag
