"""Make docs/report.png: a run report of a mixed batch, as headless chromium shows it.

Run from the repository root (needs /usr/bin/chromium and websocket-client, the
test extra): ``python docs/report_screenshot.py``. It runs 120 steps on 4
workers (CPU-bound ones, sleepers, a few that raise, segfault, hang past
their time limit, or fail once and are retried), writes the report to
``docs/report.html`` (not committed) and its screenshot to ``docs/report.png``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import procorch  # noqa: E402
from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome  # noqa: E402


class MixedExecutor(AgentExecutor):
    """Steps of varied cost; some misbehave, as their agent says."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    def concurrency_hint(self) -> int:
        return 4

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        n = int(spec.task_id.split("-")[1])
        if spec.agent == "cruncher":
            end = time.process_time() + 0.02 + (n % 5) * 0.03
            block = b"x" * ((n % 4) * 40 * 2**20)
            while time.process_time() < end:
                pass
            del block
        elif spec.agent == "waiter":
            time.sleep(0.05 + (n % 3) * 0.05)
        elif spec.agent == "raiser":
            raise ValueError(f"record {n} is malformed")
        elif spec.agent == "segfaulter":
            ctypes.string_at(0)
        elif spec.agent == "sleeper":
            time.sleep(3600)
        elif spec.agent == "flaky":
            marker = Path(self.state_dir, spec.task_id)
            if not marker.exists():
                marker.touch()
                raise ConnectionError("the service was busy")
            time.sleep(0.05)
        return StepOutcome(
            task_id=spec.task_id,
            session_id=f"s-{spec.task_id}",
            agent=spec.agent,
            output="done",
            success=True,
        )


def main() -> None:
    from browser import Browser

    agents = ["cruncher", "waiter", "cruncher", "waiter", "cruncher"]
    specs = []
    for n in range(120):
        agent = agents[n % len(agents)]
        if n in (17, 61, 95):
            agent = "raiser"
        elif n in (33, 80):
            agent = "segfaulter"
        elif n == 50:
            agent = "sleeper"
        elif n in (8, 70):
            agent = "flaky"
        specs.append(AgentStepSpec(f"{agent}-{n}", agent, "a step of the demo", "go"))
    report = procorch.ReportSink()
    with tempfile.TemporaryDirectory() as state:
        procorch.execute_steps_parallel(
            MixedExecutor(state),
            specs,
            events=report,
            step_timeout=1.5,
            retry=procorch.RetryPolicy(attempts=2, on=("exception",)),
        )
    procorch.shutdown()
    page = HERE / "report.html"
    report.write(page, title="procorch run: 120 steps on 4 workers")
    browser = Browser(width=1200, height=900)
    try:
        browser.open(page)
        assert browser.errors == [], browser.errors
        browser.screenshot(HERE / "report.png")
    finally:
        browser.close()
    print(f"wrote {page} and {HERE / 'report.png'}", file=sys.stderr)
    os.environ.pop("PYTHONPATH", None)


if __name__ == "__main__":
    main()
