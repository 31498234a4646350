"""Executors for the identity tests, importable by workers.

Steps pick their behaviour from ``spec.agent``; an ordinary step ('ok')
returns ``helpers.ok_outcome``, whose output ``ran: <prompt>`` names the step
it belongs to. Anything a test needs to see across processes goes to files in
a directory the test owns.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from helpers import ok_outcome

from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome

# A file name that is not UTF-8 on disk, as os.listdir would hand it over:
# a str holding a lone surrogate, which no UTF-8 encoder accepts.
SURROGATE_NAME = os.fsdecode(b"caf\xe9.txt")


class UnprintableError(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise LookupError("this exception cannot be printed")


class UnrepresentableError(UnprintableError):
    """An exception whose ``str()`` and ``repr()`` both raise."""

    def __repr__(self) -> str:
        raise LookupError("this exception cannot be printed")


def _refuse_pickling(self: BaseException) -> Any:
    raise TypeError("this exception refuses to be pickled")


class UnpicklableError(Exception):
    """An exception that prints fine but whose pickling raises."""

    __reduce__ = _refuse_pickling
    __reduce_ex__ = _refuse_pickling  # type: ignore[assignment]


class HopelessError(UnrepresentableError):
    """An exception whose ``str()``, ``repr()`` and pickling all raise."""

    __reduce__ = _refuse_pickling
    __reduce_ex__ = _refuse_pickling  # type: ignore[assignment]


class StepOwnError(Exception):
    """What the stdio steps raise once they have broken their output."""


def _self_containing_list() -> list[Any]:
    loop: list[Any] = [1, 2]
    loop.append(loop)
    return loop


class IdentityExecutor(AgentExecutor):
    """Steps whose result, or whose exception, cannot be encoded in the worker.

    Agents: ok; huge_int (``structured`` holds 2**70); surrogate_output
    (``output`` holds a lone surrogate); self_list (``structured`` is a list
    that contains itself); unprintable_exception, unrepresentable_exception,
    hopeless_exception (raise an exception whose str(), repr() and pickling
    raise, cumulatively); surrogate_exception (raises a ValueError whose
    message holds a lone surrogate); unpicklable_exception (raises an
    exception that prints but cannot be pickled).
    """

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        agent = spec.agent
        if agent == "huge_int":
            return ok_outcome(spec, structured={"n": 2**70})
        if agent == "surrogate_output":
            return StepOutcome(
                spec.task_id, f"task-run-{spec.task_id}", agent, SURROGATE_NAME, True
            )
        if agent == "self_list":
            return ok_outcome(spec, structured=_self_containing_list())
        if agent == "unprintable_exception":
            raise UnprintableError(spec.task_id)
        if agent == "unrepresentable_exception":
            raise UnrepresentableError(spec.task_id)
        if agent == "hopeless_exception":
            raise HopelessError(spec.task_id)
        if agent == "surrogate_exception":
            raise ValueError(f"cannot open {SURROGATE_NAME}")
        if agent == "unpicklable_exception":
            raise UnpicklableError(f"unpicklable in {spec.task_id}")
        return ok_outcome(spec)


# What an 'emit_bad:<kind>' step of EmitterExecutor tries to emit.
UNENCODABLE_EVENT_DATA = {
    "object": lambda: object(),
    "huge_int": lambda: 2**70,
    "surrogate": lambda: SURROGATE_NAME,
    "self_list": _self_containing_list,
}


class EmitterExecutor(AgentExecutor):
    """Emits 'before', tries to emit data msgspec cannot encode, emits 'after'.

    Agent ``catch:<kind>``: the step catches what ``emit`` raised and returns
    normally, with the exception's type and message in ``structured``.
    Agent ``let:<kind>``: the step lets it propagate. Agent ok: an ordinary step.
    ``kind`` names an entry of UNENCODABLE_EVENT_DATA.
    """

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit("before")
        if spec.agent == "ok":
            events.emit("after")
            return ok_outcome(spec)
        how, kind = spec.agent.split(":")
        data = UNENCODABLE_EVENT_DATA[kind]()
        if how == "let":
            events.emit(data)
            return ok_outcome(spec)
        try:
            events.emit(data)
        except Exception as exc:
            caught = {"type": type(exc).__name__, "message": str(exc)}
        else:
            caught = None
        events.emit("after")
        return ok_outcome(spec, structured={"caught": caught})


class LaneExecutor(AgentExecutor):
    """Steps for the frozen-worker and slow-consumer tests; each returns its pid.

    Agents: ok (returns at once); meet (waits until ``parties`` meet steps
    have begun, so each runs in a worker of its own); meet_then_hang (meets,
    then sleeps until killed); freeze (notes its pid
    in ``state_dir`` as ``frozen-<pid>``, then stops its own process with
    SIGSTOP); nap (sleeps 0.1 s); late (sleeps 0.3 s, then touches
    ``late-<task_id>`` in ``state_dir`` just before returning).
    """

    def __init__(self, state_dir: str, hint: int = 2, parties: int = 2) -> None:
        self.state_dir = state_dir
        self.hint = hint
        self.parties = parties

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        agent = spec.agent
        if agent in ("meet", "meet_then_hang"):
            meeting = Path(self.state_dir, "meet")
            meeting.mkdir(exist_ok=True)
            Path(meeting, str(os.getpid())).touch()
            deadline = time.monotonic() + 30
            while len(os.listdir(meeting)) < self.parties and time.monotonic() < deadline:
                time.sleep(0.005)
            if agent == "meet_then_hang":
                time.sleep(3600)
        elif agent == "freeze":
            Path(self.state_dir, f"frozen-{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGSTOP)
        elif agent == "nap":
            time.sleep(0.1)
        elif agent == "late":
            time.sleep(0.3)
            Path(self.state_dir, f"late-{spec.task_id}").touch()
        return ok_outcome(spec, structured={"pid": os.getpid()})

    def pids(self, kind: str) -> set[int]:
        """Pids noted under ``kind`` (frozen)."""
        return {int(p.name.split("-")[1]) for p in Path(self.state_dir).glob(f"{kind}-*")}


class _FlushRaises:
    """A stand-in for sys.stdout whose every method raises."""

    def write(self, text: str) -> int:
        raise OSError("this stream cannot be written")

    def flush(self) -> None:
        raise OSError("this stream cannot be flushed")


class StdioExecutor(AgentExecutor):
    """Steps that break their own standard output or error, then raise StepOwnError.

    Agents: close_stdout, close_stderr (close the sys stream), close_fd1,
    close_fd2 (os.close the descriptor), stdout_none (sys.stdout = None),
    stdout_bad_flush (sys.stdout whose write and flush raise); each prints a
    line first and raises ``StepOwnError('own error of <task_id>')`` after.
    Agent ok prints a line to sys.stdout, sys.stderr (flushed), fd 1 and fd 2,
    then succeeds.
    """

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        agent = spec.agent
        if agent == "ok":
            print(f"hello from {spec.task_id}", flush=True)
            print(f"warning from {spec.task_id}", file=sys.stderr, flush=True)
            os.write(1, f"fd 1 hello from {spec.task_id}\n".encode())
            os.write(2, f"fd 2 hello from {spec.task_id}\n".encode())
            return ok_outcome(spec)
        print(f"{spec.task_id} is about to break its output", flush=True)
        if agent == "close_stdout":
            sys.stdout.close()
        elif agent == "close_stderr":
            sys.stderr.close()
        elif agent == "close_fd1":
            os.close(1)
        elif agent == "close_fd2":
            os.close(2)
        elif agent == "stdout_none":
            sys.stdout = None  # type: ignore[assignment]
        elif agent == "stdout_bad_flush":
            sys.stdout = _FlushRaises()  # type: ignore[assignment]
        raise StepOwnError(f"own error of {spec.task_id}")
