"""Step functions and executors shared by the benchmarks (importable by workers)."""

from __future__ import annotations

import ctypes
import os

from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome


def noop(task_id: str) -> str:
    """The cheapest possible step for a raw pool."""
    return task_id


class NoopExecutor(AgentExecutor):
    """Returns at once; the agent 'segfault' crashes its worker instead."""

    def __init__(self, hint: int = 2) -> None:
        self.hint = hint

    def concurrency_hint(self) -> int:
        return self.hint

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "segfault":
            ctypes.string_at(0)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True)


def pid_step(task_id: str) -> int:
    return os.getpid()
