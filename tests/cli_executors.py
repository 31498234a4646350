"""Things for ``procorch run`` to import by path in the command-line tests.

Each one is named by an import path such as ``cli_executors:make_executor``;
the tests put this directory on the subprocess's PYTHONPATH, which its
worker processes inherit.
"""

from __future__ import annotations

import os
import time

from helpers import FaultyExecutor, GuardExecutor, SandboxExecutor

from procorch import AgentStepSpec, EventSink, StepOutcome


def make_executor() -> FaultyExecutor:
    """A factory: called with no arguments, it returns the executor."""
    return FaultyExecutor(hint=3)


INSTANCE = FaultyExecutor(hint=3)
"""An executor instance, used as it is."""


class NotAnExecutor:
    """A class with no execute_step method."""

    def run(self, spec: AgentStepSpec) -> None:
        """Not the seam."""


class BrokenInit:
    """A class whose constructor raises."""

    def __init__(self) -> None:
        raise RuntimeError("no configuration found")

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        """Never reached."""
        raise AssertionError("unreachable")


class ReportsFailure(FaultyExecutor):
    """Returns an unsuccessful outcome itself for agent 'no'; otherwise a FaultyExecutor."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "no":
            return StepOutcome.failed(spec.task_id, spec.agent, "the executor said no")
        return super().execute_step(spec, events)


class Printer(FaultyExecutor):
    """Prints to standard output (through Python and through fd 1), then succeeds."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        print(f"print() from {spec.task_id}", flush=True)
        os.write(1, f"fd 1 from {spec.task_id}\n".encode())
        return super().execute_step(spec, events)


def make_guard_executor() -> GuardExecutor:
    """A GuardExecutor noting its pids in the directory named by PROCORCH_TEST_STATE_DIR."""
    return GuardExecutor(os.environ["PROCORCH_TEST_STATE_DIR"], hint=3)


class Sleeper(FaultyExecutor):
    """A FaultyExecutor whose 'ok' steps take 0.2 s, so a run lasts long enough to interrupt."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "ok":
            time.sleep(0.2)
        return super().execute_step(spec, events)


def make_sandbox_executor() -> SandboxExecutor:
    """A SandboxExecutor, for the sandbox options."""
    return SandboxExecutor()
