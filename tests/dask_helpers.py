"""What the Dask tests share: what a call leaves on a scheduler and a client, and a step counter.

Importable by the test cluster's workers too (they run with the tests folder on their path).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome


def procorch_state(dask_scheduler: Any = None) -> dict[str, int]:
    """What procorch calls hold on the scheduler: queues, their users, topics, events, tasks."""
    queues = dask_scheduler.extensions["queues"]
    # Not the one topic of the cluster where nannies publish worker deaths (bounded).
    topics = {
        name: t
        for name, t in dask_scheduler._broker._topics.items()
        if "procorch" in name and name != "procorch-worker-exits"
    }
    return {
        "queues": sum("procorch" in name for name in queues.queues),
        "queue users": sum(n for name, n in queues.client_refcount.items() if "procorch" in name),
        "topics": len(topics),
        "events": sum(len(topic.events) for topic in topics.values()),
        "tasks": sum("procorch" in str(key) for key in dask_scheduler.tasks),
    }


def client_state(client: Any) -> dict[str, int]:
    """What procorch calls hold on the client: event handlers and futures."""
    return {
        "handlers": sum("procorch" in topic for topic in client._event_handlers),
        "futures": sum("procorch" in str(key) for key in client.futures),
    }


class CountingExecutor(AgentExecutor):
    """Writes a new file ``<task_id>.<random>`` in ``run_dir`` per run; agent 'segfault' crashes."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        (Path(self.run_dir) / f"{spec.task_id}.{uuid.uuid4().hex}").touch()
        if spec.agent == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        events.emit("ran")
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True)


def runs_by_task(run_dir: Path) -> dict[str, int]:
    """How many times each task_id ran, from CountingExecutor's files."""
    counts: dict[str, int] = {}
    for path in run_dir.iterdir():
        task_id = path.name.split(".")[0]
        counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def _rebuild_named(name: str, log_path: str | None) -> NamedExecutor:
    if log_path is not None:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} {name}\n")
    return NamedExecutor(name, log_path)


class NamedExecutor(AgentExecutor):
    """Answers every step with its own name; with ``log_path``, each unpickling appends
    "pid name" there."""

    def __init__(self, name: str, log_path: str | None = None) -> None:
        self.name = name
        self.log_path = log_path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_named, (self.name, self.log_path))

    def concurrency_hint(self) -> int:
        return 8

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        time.sleep(0.01)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, self.name, True)
