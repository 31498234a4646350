"""A demo batch: ordinary, failing, crashing and hanging steps, their events and outcomes.

Run it with ``procorch demo`` or ``python -m procorch.demo``. Every step but
one takes a twentieth of a second; the hanging one is stopped by its 1 s time
limit, so the batch finishes in about a second and a half.
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

STEP_TIMEOUT = 1.0  # seconds: the hanging step is killed after this long
CONCURRENCY = 3


class DemoExecutor(AgentExecutor):
    """Counts the words of each prompt, unless the agent says to misbehave."""

    def concurrency_hint(self) -> int:
        return CONCURRENCY

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        events.emit(f"reading {len(spec.prompt)} characters")
        time.sleep(0.05)
        if spec.agent == "raiser":
            raise ValueError("the prompt mentions a forbidden word")
        if spec.agent == "segfaulter":
            ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
        if spec.agent == "quitter":
            os._exit(7)
        if spec.agent == "sleeper":
            time.sleep(3600)  # hangs until its time limit kills the worker
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
        AgentStepSpec("stuck", "sleeper", "hangs", "wait for me"),
        AgentStepSpec("native", "segfaulter", "crashes in C", "boom"),
        AgentStepSpec("exits", "quitter", "calls os._exit(7)", "bye"),
        AgentStepSpec("review", "counter", "count words", "jumps over the lazy dog again"),
    ]
    print(
        f"running {len(specs)} steps, {CONCURRENCY} at a time, in worker processes, "
        f"each with a {STEP_TIMEOUT:g} s time limit\n"
    )
    start = time.perf_counter()
    outcomes = execute_steps_parallel(
        DemoExecutor(), specs, events=_show, step_timeout=STEP_TIMEOUT
    )
    elapsed = time.perf_counter() - start
    print(f"\n{len(outcomes)} outcomes in input order ({elapsed:.2f} s):")
    for outcome in outcomes:
        mark = "ok  " if outcome.success else "FAIL"
        kind = "" if outcome.error is None else outcome.error.kind
        print(f"  {mark} {outcome.task_id:<8} {kind:<9} {outcome.output}")
        if outcome.error is not None and outcome.error.traceback and outcome.error.kind == "crash":
            frames = [line.strip() for line in outcome.error.traceback.splitlines()]
            shown = [line for line in frames if line.startswith("File")][:2]
            print("       faulthandler: " + "\n                     ".join(shown))


if __name__ == "__main__":
    main()
