"""One whole process for bench_peers.py's cold-start workload: import a pool, run 2 steps, exit.

``python _cold_start.py POOL``: everything a short script pays is timed by
the caller from outside, interpreter start-up and exit included. Each pool
gets 2 workers and the same 2 no-op steps, through its ordinary API.
"""

from __future__ import annotations

import sys


def noop(task_id: str) -> str:
    return task_id


def _procorch() -> list[str]:
    import procorch
    from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome

    class Echo(AgentExecutor):
        def concurrency_hint(self) -> int:
            return 2

        def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
            return StepOutcome(spec.task_id, spec.task_id, spec.agent, noop(spec.task_id), True)

    specs = [AgentStepSpec(str(i), "echo", "", "") for i in range(2)]
    return [outcome.output for outcome in procorch.execute_steps_parallel(Echo(), specs)]


def _process_pool() -> list[str]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(noop, ["0", "1"]))


def _pebble() -> list[str]:
    import pebble

    with pebble.ProcessPool(max_workers=2) as pool:
        futures = [pool.schedule(noop, args=(str(i),)) for i in range(2)]
        return [future.result() for future in futures]


def _loky() -> list[str]:
    import loky

    return list(loky.get_reusable_executor(max_workers=2).map(noop, ["0", "1"]))


def _joblib() -> list[str]:
    import joblib

    return list(joblib.Parallel(n_jobs=2)(joblib.delayed(noop)(str(i)) for i in range(2)))


RUNS = {
    "procorch": _procorch,
    "ProcessPoolExecutor": _process_pool,
    "pebble": _pebble,
    "loky": _loky,
    "joblib": _joblib,
}

if __name__ == "__main__":
    if sys.argv[1] == "python":
        sys.exit(0)  # the interpreter alone: start-up and exit
    assert RUNS[sys.argv[1]]() == ["0", "1"]
