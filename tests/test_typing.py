"""mypy strict catches a misspelt guard and a non-executor at every door (typing environment)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

_PROGRAM = textwrap.dedent(
    """
    import asyncio
    import procorch
    from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome


    class Echo(AgentExecutor):
        def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
            return StepOutcome(spec.task_id, "s", spec.agent, spec.prompt, True)


    specs = [AgentStepSpec("a", "echo", "", "hi")]
    procorch.execute_steps_parallel(Echo(), specs, step_timeout=1.0, concurrency=2)  # fine
    procorch.execute_steps_parallel(123, specs)  # E: not an executor
    procorch.execute_steps_parallel(Echo(), specs, step_timout=1.0)  # E: misspelt
    procorch.stream_steps_parallel(Echo(), specs, concurency=2)  # E: misspelt
    procorch.execute_pipeline(Echo(), [1], [lambda p, i: None], memory_limt=1)  # E: misspelt
    procorch.execute_loop(Echo(), specs, 1, lambda o: None, retries=2)  # E: misspelt
    procorch.execute_steps_parallel_resumable(Echo(), specs, "w", "j.db", timeout=1)  # E
    asyncio.run(procorch.execute_steps_parallel_async(Echo(), specs, step_timout=1))  # E
    procorch.map(abs, [1], step_timout=1.0)  # E: misspelt
    procorch.imap(abs, [1], n_jobs=2)  # E: misspelt
    procorch.ProcessPool(2, step_timout=1.0)  # E: misspelt
    procorch.ProcessPool(2, max_tasks_per_child=2, idle_timeout=60.0)  # fine
    procorch.map(abs, [1], max_tasks_per_child=2, idle_timeout=0)  # fine
    procorch.ProcessPool(2, max_task_per_child=2)  # E: misspelt
    """
)


@pytest.mark.slow
def test_mypy_strict_refuses_misspelt_guards_and_non_executors(tmp_path: Path) -> None:
    """Every line marked E is an error under mypy --strict; the rest are not."""
    # Skipped here, not at import: the module is still collected (test_packaging counts them).
    api = pytest.importorskip("mypy.api", reason="mypy is in the lint extra (tox -e typing)")
    program = tmp_path / "misspelt.py"
    program.write_text(_PROGRAM)
    stdout, _, _ = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(program)]
    )
    flagged = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    expected = {number for number, line in enumerate(_PROGRAM.splitlines(), 1) if "# E" in line}
    assert flagged == expected, stdout
