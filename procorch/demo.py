"""A demo batch: ordinary, failing and crashing steps, their events and outcomes.

Run it with ``python -m procorch.demo``.
"""

from __future__ import annotations

import ctypes
import os
import time

from procorch import (
    AgentExecutor,
    AgentStepSpec,
    Event,
    EventSink,
    StepOutcome,
    StepProgress,
    execute_steps_parallel,
)


class DemoExecutor(AgentExecutor):
    """Counts the words of each prompt, unless the agent says to misbehave."""

    def concurrency_hint(self) -> int:
        return 2

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit(f"reading {len(spec.prompt)} characters")
        time.sleep(0.05)
        if spec.agent == "raiser":
            raise ValueError("the prompt mentions a forbidden word")
        if spec.agent == "segfaulter":
            ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
        if spec.agent == "quitter":
            os._exit(7)
        words = len(spec.prompt.split())
        events.emit({"words": words})
        return StepOutcome(
            task_id=spec.task_id,
            session_id=f"session-{spec.task_id}",
            agent=spec.agent,
            output=f"{words} words",
            success=True,
            structured={"words": words},
        )


def _show(event: Event) -> None:
    name = type(event).__name__
    detail = f" {event.data!r}" if isinstance(event, StepProgress) else ""
    print(f"  event  {event.task_id:<10} attempt {event.attempt}  {name}{detail}")


def main() -> None:
    specs = [
        AgentStepSpec("summary", "counter", "count words", "the quick brown fox"),
        AgentStepSpec("strict", "raiser", "refuses", "a forbidden word"),
        AgentStepSpec("native", "segfaulter", "crashes in C", "boom"),
        AgentStepSpec("exits", "quitter", "calls os._exit(7)", "bye"),
        AgentStepSpec("review", "counter", "count words", "jumps over the lazy dog again"),
    ]
    print(f"running {len(specs)} steps, 2 at a time, in worker processes\n")
    start = time.perf_counter()
    outcomes = execute_steps_parallel(DemoExecutor(), specs, events=_show)
    elapsed = time.perf_counter() - start
    print(f"\n{len(outcomes)} outcomes in input order ({elapsed:.2f} s):")
    for outcome in outcomes:
        mark = "ok  " if outcome.success else "FAIL"
        print(f"  {mark} {outcome.task_id:<8} {outcome.output}")
        if outcome.error is not None and outcome.error.traceback and outcome.error.kind == "crash":
            frames = [line.strip() for line in outcome.error.traceback.splitlines()]
            shown = [line for line in frames if line.startswith("File")][:2]
            print("       faulthandler: " + "\n                     ".join(shown))


if __name__ == "__main__":
    main()
