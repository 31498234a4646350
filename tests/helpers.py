"""Executors that behave (and misbehave) on purpose, importable by workers.

Steps pick their behaviour from ``spec.agent``. Anything a test needs to see
across processes is written to files in a directory the test owns, since the
executor runs in other processes than the test.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
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
    always_crash, slow. Pids of workers and grandchildren go to ``state_dir``.
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
        elif agent == "always_raise":
            raise ConnectionError("never works")
        elif agent == "always_crash":
            ctypes.string_at(0)
        elif agent == "slow":
            time.sleep(0.3)
        return ok_outcome(spec, structured={"pid": os.getpid()})

    def pids(self, kind: str) -> set[int]:
        """Pids noted under ``kind`` (worker or grandchild)."""
        return {int(p.name.split("-")[1]) for p in Path(self.state_dir).glob(f"{kind}-*")}


class StructuredExecutor(AgentExecutor):
    """Returns as ``structured`` the JSON found in the spec's prompt ('' for none)."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        value = json.loads(spec.prompt) if spec.prompt else None
        return ok_outcome(spec, structured=value)


class JournaledExecutor(AgentExecutor):
    """Appends 'start <task_id>' and, ``sleep`` seconds later, 'finish <task_id>' to a log."""

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
