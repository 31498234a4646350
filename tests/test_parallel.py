"""execute_steps_parallel: the seed's tests, input checks, and the warm pool."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import (
    BareExecutor,
    CountingUnpickleExecutor,
    PidExecutor,
    RendezvousExecutor,
    SeedExecutor,
    peak_overlap,
    read_records,
    run_to_end,
    spec,
)

import procorch
from procorch import (
    DEFAULT_MAX_PARALLEL_TASKS,
    AgentStepSpec,
    ExecutorError,
    InvalidSpecError,
    execute_steps_parallel,
)


def test_fans_out_in_input_order(tmp_path: Path) -> None:
    """Results come back in input order, each from its own step."""
    executor = SeedExecutor(8, tmp_path)
    out = execute_steps_parallel(
        executor, [spec("a", "explore"), spec("b", "review"), spec("c", "plan")]
    )
    assert [o.task_id for o in out] == ["a", "b", "c"]
    assert all(o.success for o in out)
    assert out[0].output == "ran: prompt-a"


def test_input_order_holds_when_completion_order_differs(tmp_path: Path) -> None:
    """A slow first step still comes back first."""
    specs = [spec("0", "last"), *(spec(str(i)) for i in range(1, 8))]
    out = execute_steps_parallel(RendezvousExecutor(tmp_path, parties=1), specs)
    assert [o.task_id for o in out] == [str(i) for i in range(8)]
    ends = {record["task_id"]: record["end"] for record in read_records(tmp_path)}
    assert ends["0"] > min(ends.values())  # the first step did finish after another


def test_respects_concurrency_hint(tmp_path: Path) -> None:
    """With hint 2 and 6 steps, exactly 2 run at once at the peak, on 2 workers."""
    executor = SeedExecutor(2, tmp_path, sleep=0.2)
    out = execute_steps_parallel(executor, [spec(str(i)) for i in range(6)])
    assert all(o.success for o in out)
    records = read_records(tmp_path)
    assert len(records) == 6
    assert peak_overlap(records) == 2
    assert len({r["pid"] for r in records}) == 2


def test_hint_below_one_counts_as_one(tmp_path: Path) -> None:
    """A hint of 0 runs the steps one at a time instead of failing."""
    executor = SeedExecutor(0, tmp_path, sleep=0.05)
    execute_steps_parallel(executor, [spec(str(i)) for i in range(3)])
    assert peak_overlap(read_records(tmp_path)) == 1


def test_isolates_failed_and_panicked_steps(tmp_path: Path) -> None:
    """An explicit failure and a raised error stay with their own steps."""
    executor = SeedExecutor(8, tmp_path)
    out = execute_steps_parallel(
        executor,
        [spec("ok", "explore"), spec("bad", "fail"), spec("crash", "boom"), spec("ok2", "review")],
    )
    assert len(out) == 4
    assert out[0].success
    assert not out[1].success and out[1].error is None
    assert not out[2].success and out[2].agent == "boom" and out[2].task_id == "crash"
    assert out[2].error is not None and out[2].error.kind == "exception"
    assert "AssertionError: boom" in out[2].output
    assert out[3].success


def test_default_concurrency_hint_is_the_module_constant(tmp_path: Path) -> None:
    """An executor that does not override the hint runs DEFAULT_MAX_PARALLEL_TASKS at once."""
    assert BareExecutor().concurrency_hint() == DEFAULT_MAX_PARALLEL_TASKS
    executor = RendezvousExecutor(tmp_path, parties=DEFAULT_MAX_PARALLEL_TASKS)
    specs = [spec(str(i)) for i in range(DEFAULT_MAX_PARALLEL_TASKS + 2)]
    assert all(o.success for o in execute_steps_parallel(executor, specs))
    records = read_records(tmp_path)
    assert peak_overlap(records) == DEFAULT_MAX_PARALLEL_TASKS
    assert len({r["pid"] for r in records}) == DEFAULT_MAX_PARALLEL_TASKS


def _run_every_entry_point(executor: SeedExecutor, tmp_path: Path, concurrency: int) -> None:
    """Six steps through each entry point, with ``concurrency=``; each checks its own peak."""
    import asyncio

    def specs(tag: str) -> list[AgentStepSpec]:
        return [spec(f"{tag}{i}") for i in range(6)]

    def one_stage(previous: object, item: str) -> AgentStepSpec:
        return spec(f"pipe{item}")

    runs = {
        "batch": lambda: execute_steps_parallel(executor, specs("batch"), concurrency=concurrency),
        "stream": lambda: list(
            procorch.stream_steps_parallel(executor, specs("stream"), concurrency=concurrency)
        ),
        "pipeline": lambda: procorch.execute_pipeline(
            executor, [str(i) for i in range(6)], [one_stage], concurrency=concurrency
        ),
        "loop": lambda: procorch.execute_loop(
            executor, specs("loop"), 1, lambda _: None, concurrency=concurrency
        ),
        "resumable": lambda: procorch.execute_steps_parallel_resumable(
            executor, specs("resumable"), "w", str(tmp_path / "journal.db"), concurrency=concurrency
        ),
        "async": lambda: asyncio.run(
            procorch.execute_steps_parallel_async(executor, specs("async"), concurrency=concurrency)
        ),
        "map": lambda: procorch.map(abs, range(6), concurrency=concurrency),
    }
    for name, run in runs.items():
        run()
        if name == "map":
            continue  # plain functions write no records; its lanes are checked in test_map
        records = [r for r in read_records(tmp_path) if r["task_id"].startswith(name[:4])]
        assert len(records) == 6, name
        assert peak_overlap(records) == concurrency, name
        assert len({r["pid"] for r in records}) == concurrency, name


@pytest.mark.slow
def test_concurrency_guard_replaces_the_hint_on_every_entry_point(tmp_path: Path) -> None:
    """concurrency=3 runs 3 at once where the executor's hint says 1, at every door."""
    _run_every_entry_point(SeedExecutor(1, tmp_path, sleep=0.3), tmp_path, 3)


def test_concurrency_must_be_a_positive_int() -> None:
    """concurrency=0 is refused before any step starts, in the house's words."""
    with pytest.raises(ValueError, match=r"concurrency must be an int >= 1 \(got 0\)"):
        execute_steps_parallel(PidExecutor(), [spec("a")], concurrency=0)


def test_empty_input_returns_empty_list() -> None:
    """No specs, no work, no outcomes."""
    assert execute_steps_parallel(PidExecutor(), []) == []


def test_pool_stays_warm_between_calls() -> None:
    """A second call runs on the same worker processes as the first."""
    specs = [spec(str(i)) for i in range(6)]
    first = {o.structured["pid"] for o in execute_steps_parallel(PidExecutor(hint=2), specs)}
    second = {o.structured["pid"] for o in execute_steps_parallel(PidExecutor(hint=2), specs)}
    assert len(first) == 2
    assert second == first


def test_executor_is_unpickled_once_per_worker_per_call(tmp_path: Path) -> None:
    """Ten steps on two workers unpickle the executor twice, not ten times."""
    log = tmp_path / "unpickles.log"
    out = execute_steps_parallel(
        CountingUnpickleExecutor(str(log)), [spec(str(i)) for i in range(10)]
    )
    assert all(o.success for o in out)
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) == 2


def test_executor_defined_in_main_runs(tmp_path: Path) -> None:
    """An executor class written in a script's __main__ is shipped with cloudpickle."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import procorch

            class Echo(procorch.AgentExecutor):
                def execute_step(self, spec, events):
                    return procorch.StepOutcome(
                        spec.task_id, "s", spec.agent, spec.prompt.upper(), True
                    )

            if __name__ == "__main__":
                specs = [procorch.AgentStepSpec(str(i), "a", "d", f"p{i}") for i in range(3)]
                print([o.output for o in procorch.execute_steps_parallel(Echo(), specs)])
            """
        )
    )
    result = run_to_end([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['P0', 'P1', 'P2']"


def test_concurrent_calls_from_threads_do_not_mix() -> None:
    """Two calls at once from two threads each get their own outcomes."""
    results: dict[str, list[str]] = {}

    def call(prefix: str) -> None:
        out = execute_steps_parallel(PidExecutor(), [spec(f"{prefix}{i}") for i in range(4)])
        results[prefix] = [o.task_id for o in out]

    threads = [threading.Thread(target=call, args=(p,)) for p in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {"x": ["x0", "x1", "x2", "x3"], "y": ["y0", "y1", "y2", "y3"]}


# -- bad input is refused before any step starts ------------------------------


def _nothing_ran(record_dir: Path) -> bool:
    return not any(record_dir.iterdir())


def test_item_that_is_not_a_spec_is_refused(tmp_path: Path) -> None:
    """A dict in the list names its index and type."""
    with pytest.raises(InvalidSpecError, match=r"specs\[1\]: expected an AgentStepSpec, got dict"):
        execute_steps_parallel(SeedExecutor(2, tmp_path), [spec("a"), {"task_id": "b"}])
    assert _nothing_ran(tmp_path)


def test_duplicate_task_ids_are_refused(tmp_path: Path) -> None:
    """Two specs with one task_id name both positions."""
    with pytest.raises(
        InvalidSpecError, match=r"specs\[2\]: task_id 'a' is already used by specs\[0\]"
    ):
        execute_steps_parallel(SeedExecutor(2, tmp_path), [spec("a"), spec("b"), spec("a")])
    assert _nothing_ran(tmp_path)


def test_wrong_field_type_names_the_field(tmp_path: Path) -> None:
    """A field of the wrong type is named, msgspec style."""
    bad = AgentStepSpec(7, "a", "d", "p")  # type: ignore[arg-type]
    with pytest.raises(
        InvalidSpecError, match=r"specs\[1\]: Expected `str`, got `int` - at `\$\.task_id`"
    ):
        execute_steps_parallel(SeedExecutor(2, tmp_path), [spec("a"), bad])
    assert _nothing_ran(tmp_path)


def test_unencodable_output_schema_is_refused(tmp_path: Path) -> None:
    """An output_schema holding a non-JSON value is refused up front."""
    bad = spec("a").with_output_schema({"x": object()})
    with pytest.raises(InvalidSpecError, match=r"specs\[0\]: cannot be encoded"):
        execute_steps_parallel(SeedExecutor(2, tmp_path), [bad])


def test_specs_must_be_a_list() -> None:
    """A single spec instead of a list is refused with a clear message."""
    with pytest.raises(TypeError, match="specs must be a list of AgentStepSpec"):
        execute_steps_parallel(PidExecutor(), spec("a"))  # type: ignore[arg-type]


def test_executor_without_execute_step_is_refused() -> None:
    """An object lacking the seam is refused."""
    with pytest.raises(ExecutorError, match="execute_step"):
        execute_steps_parallel(object(), [spec("a")])


def test_unpicklable_executor_is_refused_before_work(tmp_path: Path) -> None:
    """An executor holding a lock cannot travel and says so."""
    executor = SeedExecutor(2, tmp_path)
    executor.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(ExecutorError, match="cannot be pickled"):
        execute_steps_parallel(executor, [spec("a")])
    assert _nothing_ran(tmp_path)


def test_concurrency_hint_must_be_an_int() -> None:
    """A hint of the wrong type is named."""

    class Odd(PidExecutor):
        def concurrency_hint(self) -> int:
            return "2"  # type: ignore[return-value]

    with pytest.raises(ExecutorError, match=r"concurrency_hint\(\) must return an int \(got '2'\)"):
        execute_steps_parallel(Odd(), [spec("a")])


def test_events_target_must_be_callable_or_queue() -> None:
    """An events argument that cannot receive events is refused."""
    with pytest.raises(TypeError, match="events must be a callable or an object with a put"):
        execute_steps_parallel(PidExecutor(), [spec("a")], events=5)


def test_shutdown_then_next_call_starts_fresh_workers(no_leaked_processes: None) -> None:
    """After shutdown the pool starts new workers on demand."""
    before = {o.structured["pid"] for o in execute_steps_parallel(PidExecutor(), [spec("a")])}
    procorch.shutdown()
    after = {o.structured["pid"] for o in execute_steps_parallel(PidExecutor(), [spec("a")])}
    assert before.isdisjoint(after)
    assert os.getpid() not in after


def test_thousands_of_quick_steps_all_succeed() -> None:
    """Steps that finish faster than the parent polls are never mistaken for lost ones."""
    out = execute_steps_parallel(
        PidExecutor(hint=2, sleep=0.0), [spec(str(i)) for i in range(3000)]
    )
    assert [o.task_id for o in out] == [str(i) for i in range(3000)]
    assert all(o.success for o in out), next(o.output for o in out if not o.success)


def test_script_without_main_guard_is_not_rerun_by_workers(tmp_path: Path) -> None:
    """Workers never re-import the caller's __main__, so an unguarded script runs once."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import procorch

            print("top level ran", flush=True)

            class Echo(procorch.AgentExecutor):
                def execute_step(self, spec, events):
                    return procorch.StepOutcome(spec.task_id, "s", spec.agent, "ok", True)

            specs = [procorch.AgentStepSpec(str(i), "a", "d", "p") for i in range(4)]
            print([o.success for o in procorch.execute_steps_parallel(Echo(), specs)])
            """
        )
    )
    result = run_to_end([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["top level ran", "[True, True, True, True]"]


@pytest.mark.slow
def test_a_program_done_before_all_its_workers_started_exits_cleanly(tmp_path: Path) -> None:
    """A call that ends while some of its lanes still start: the program exits at once, silent.

    The lanes not yet used are killed at exit rather than asked to exit
    through their call queue, which needs a thread Python 3.12 refuses then
    (it printed loky's traceback in about half the runs, and hung in one of
    ten). Ten runs, each its own interpreter.
    """
    script = tmp_path / "quick.py"
    script.write_text(
        textwrap.dedent(
            """
            import procorch

            class Echo(procorch.AgentExecutor):
                def execute_step(self, spec, events):
                    return procorch.StepOutcome(spec.task_id, "s", spec.agent, "ok", True)

            # 4 lanes; the first to start may run all 4 steps before the others start.
            specs = [procorch.AgentStepSpec(str(i), "a", "d", "p") for i in range(4)]
            print([o.success for o in procorch.execute_steps_parallel(Echo(), specs)])
            """
        )
    )
    for _ in range(10):
        result = run_to_end(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["[True, True, True, True]"]
        assert result.stderr == ""


def test_a_procorch_folder_in_the_current_directory_does_not_reach_the_workers(
    tmp_path: Path,
) -> None:
    """Workers run the caller's procorch even from a directory holding another one."""
    work = tmp_path / "work"
    work.mkdir()
    # A checkout of procorch: importable, and not the caller's.
    shutil.copytree(Path(procorch.__file__).parent, work / "procorch")
    script = tmp_path / "where.py"
    script.write_text(
        textwrap.dedent(
            """
            import procorch

            class Where(procorch.AgentExecutor):
                def execute_step(self, spec, events):
                    return procorch.StepOutcome(spec.task_id, "s", "a", procorch.__file__, True)

            if __name__ == "__main__":
                spec = procorch.AgentStepSpec("a", "a", "", "")
                [outcome] = procorch.execute_steps_parallel(Where(), [spec])
                print(outcome.success, outcome.output == procorch.__file__)
            """
        )
    )
    result = run_to_end(
        [sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
