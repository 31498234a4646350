"""procorch side by side with the process pools people would otherwise use.

Every pool gets 2 workers on this machine and the same step functions
(``_peer_workloads.py``); the peers are raw loky (a submit loop on
``get_reusable_executor``), ``concurrent.futures.ProcessPoolExecutor``,
``pebble.ProcessPool`` (schedule + result), ``multiprocessing.Pool``
(apply_async + get) and ``joblib.Parallel(backend="loky")``. The workloads:

1. dispatch: many no-op steps on a warm pool; steps per second, and the
   overhead per step (wall time / steps).
2. cpu: pure-Python busy loops of about 10 ms each (the loop count is
   calibrated once, here, and every pool runs the same count); speed-up over
   running them one after another in the trial's own process.
3. crash: short steps (a 5 ms sleep), every 20th of which segfaults; wall
   time, how many crashes were labelled as such (a peer's crash counts only
   if its error is one that no innocent step got), and how many innocent
   steps produced no result.
4. recovery: one worker, steps alternating "write a timestamp and segfault"
   and "return the time you started"; the gap between the two timestamps,
   median over every crash of every repetition. Pools that keep going after a
   crash get the whole batch at once; pools that break are handled as a user
   would: wait for the failure, make the pool usable again if it can be, and
   submit the next step.
5. events: steps that emit timestamped progress events as fast as they can;
   events per second reaching the caller, and the latency from emit to
   delivery (p50, p99). procorch delivers its own event stream; each peer gets
   a queue handed to its workers through the pool's initializer, drained by
   the caller.
6. memory: the growth of the calling process's resident memory (RSS) over
   many no-op steps, with the results still held.

Cold start and lean workers (procorch, loky, ProcessPoolExecutor, pebble, joblib):

7. import: the milliseconds ``python -X importtime`` reports for importing
   the pool (less what a bare interpreter imports), in fresh interpreters.
8. coldstart: the wall time of a whole process that imports the pool, runs
   2 no-op steps on 2 workers and exits (``_cold_start.py``), beside a bare
   interpreter's start and exit.
9. uss: each worker's private memory (USS, psutil) after a warm call.
10. hint32: 400 x 50 ms sleeps on 32 workers: the pool's first call (cold:
    for the peers, from creating the pool) and a second one (warm), against
    the ideal 13 rounds of 50 ms.

Each trial (one workload, one pool, one repetition) runs in a fresh process
and session of its own: a pool that hangs is killed after a timeout, with
every process it started, and reported as hanging, and no trial inherits
another's memory or workers. A trial warms its pool (starts the workers, runs
a few steps) before timing anything. Repetitions are interleaved: each repetition runs every
workload on every pool, in a rotating order. A figure is the median over the
repetitions. The machine may be shared, so every trial also records how much
of the CPU other processes used while it ran, and the tables say so.

Run: ``python benchmarks/bench_peers.py`` (under 10 minutes on 2 cores), or
``--quick`` for a smoke run with small sizes and one repetition; ``--reports``
also draws procorch's run of each workload (an extra untimed trial) into
``peers-<workload>.html`` beside the tables. Writes
``benchmarks/results/peers.md``, ``peers.png`` and ``peers.json`` (every
trial's figures; ``peers-quick.*`` with ``--quick``) and prints the tables.

To measure one commit while the checkout changes, export it and run from a
directory without a procorch checkout in it (procorch's fork server puts the
current directory first on its workers' path, so workers started from the
checkout would import the checkout's procorch, not the export)::

    git archive HEAD procorch | tar -x -C /tmp/pc && cd /tmp &&
        PYTHONPATH=/tmp/pc python /path/to/benchmarks/bench_peers.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

POOLS = ("procorch", "loky", "ProcessPoolExecutor", "pebble", "multiprocessing.Pool", "joblib")
COLD_POOLS = ("procorch", "loky", "ProcessPoolExecutor", "pebble", "joblib")
RESULT_PREFIX = "RESULT "
STEP_SECONDS = 0.010  # target length of one cpu step
REPS = 5  # repetitions of a full run
SLOW_REPS = 3  # repetitions of the slowest workloads in a full run


@dataclass(frozen=True)
class Workload:
    """One workload as run: its sizes, repetitions and trial timeout."""

    key: str
    title: str
    params: dict[str, Any]
    reps: int
    timeout: float
    pools: Sequence[str] = POOLS


@dataclass(frozen=True)
class Sizes:
    """A workload's parameters for a full and a quick run, and how to title it."""

    title: str  # formatted with the parameters
    full: dict[str, Any]
    quick: dict[str, Any]
    timeout: tuple[float, float]  # seconds a trial may take: full, quick
    slow: bool = False  # fewer repetitions in a full run
    pools: Sequence[str] = POOLS


SIZES = {
    "dispatch": Sizes(
        "Dispatch: {steps:,} no-op steps", {"steps": 20_000}, {"steps": 2_000}, (60, 60)
    ),
    "cpu": Sizes(
        "CPU-bound: {steps} pure-Python steps of ~10 ms", {"steps": 200}, {"steps": 40}, (60, 60)
    ),
    "crash": Sizes(
        "Crash-heavy: {steps} steps of 5 ms, every {every}th segfaults",
        {"steps": 400, "every": 20, "step_seconds": 0.005},
        {"steps": 100, "every": 20, "step_seconds": 0.005},
        (30, 15),
    ),
    "recovery": Sizes(
        "Recovery: crash to next step started, 1 worker, {crashes} crashes a run",
        {"crashes": 20},
        {"crashes": 5},
        (60, 60),
        slow=True,
    ),
    "events": Sizes(
        "Events: {steps} steps x {per_step:,} progress events",
        {"steps": 20, "per_step": 5_000},
        {"steps": 10, "per_step": 2_000},
        (60, 60),
    ),
    "memory": Sizes(
        "Parent memory: RSS growth over {steps:,} no-op steps",
        {"steps": 100_000},
        {"steps": 10_000},
        (120, 60),
        slow=True,
    ),
    # Cold start and lean workers (issue 16): what a short program pays.
    "import": Sizes(
        "Import: `import POOL` in a fresh interpreter, -X importtime ({runs} runs a trial)",
        {"runs": 5},
        {"runs": 2},
        (60, 60),
        pools=COLD_POOLS,
    ),
    "coldstart": Sizes(
        "Whole process: import, 2 steps on 2 workers, exit ({runs} runs a trial)",
        {"runs": 5},
        {"runs": 2},
        (120, 60),
        pools=COLD_POOLS,
    ),
    "uss": Sizes(
        "Worker private memory (USS) after a warm call of {steps} short steps",
        {"steps": 40, "step_seconds": 0.005},
        {"steps": 20, "step_seconds": 0.005},
        (60, 60),
        pools=COLD_POOLS,
    ),
    "hint32": Sizes(
        "Hint {workers}: {steps} x 50 ms sleeps, the pool's first call and its second",
        {"steps": 400, "workers": 32, "step_seconds": 0.05},
        {"steps": 200, "workers": 32, "step_seconds": 0.05},
        (120, 60),
        pools=("procorch", "loky", "ProcessPoolExecutor", "pebble"),
    ),
}

# The hot path (issue 16): CPU-bound efficiency, joblib's dispatch, large payloads.
_BULK_PEERS = ("procorch", "loky", "ProcessPoolExecutor")
SIZES.update(
    {
        "eff10": Sizes(
            "Efficiency: {steps} steps of {step_ms} ms (time inside steps / wall, 2.00 = ideal)",
            {"steps": 200, "step_ms": 10},
            {"steps": 60, "step_ms": 10},
            (60, 60),
            pools=("procorch", "loky", "ProcessPoolExecutor", "pebble"),
        ),
        "eff1": Sizes(
            "Efficiency: {steps:,} steps of {step_ms} ms (time inside steps / wall, 2.00 = ideal)",
            {"steps": 2000, "step_ms": 1},
            {"steps": 500, "step_ms": 1},
            (60, 60),
            pools=("procorch", "loky", "ProcessPoolExecutor", "pebble"),
        ),
        "dispatch_joblib": Sizes(
            "Dispatch against auto-batching: {steps:,} no-op steps, with the caller's CPU",
            {"steps": 20_000},
            {"steps": 2_000},
            (60, 60),
            pools=("procorch", "joblib"),
        ),
        "out10": Sizes(
            "Large outputs: {count} steps returning {mb} MB of bytes each",
            {"count": 40, "mb": 10},
            {"count": 8, "mb": 10},
            (120, 60),
            pools=_BULK_PEERS,
        ),
        "out100": Sizes(
            "Large outputs: {count} steps returning {mb} MB of bytes each",
            {"count": 4, "mb": 100},
            {"count": 2, "mb": 100},
            (120, 60),
            pools=_BULK_PEERS,
        ),
        "prompts": Sizes(
            "Large prompts: {count} steps given a distinct {mb} MB prompt each",
            {"count": 40, "mb": 10},
            {"count": 8, "mb": 10},
            (120, 60),
            pools=_BULK_PEERS,
        ),
    }
)


@dataclass
class Plan:
    """Everything one run does, and what came of it."""

    quick: bool
    workloads: list[Workload]
    loops: int
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def make_plan(quick: bool, reps: int | None, only: Sequence[str], loops: int) -> Plan:
    """The workloads, their sizes and repetitions, for a full or a quick run."""
    workloads = []
    for key, sizes in SIZES.items():
        if only and key not in only:
            continue
        params = dict(sizes.quick if quick else sizes.full)
        if key == "cpu":
            params["loops"] = loops
        if "step_ms" in params:  # the hot path's efficiency workloads
            params["loops"] = max(1, round(loops * params["step_ms"] / (STEP_SECONDS * 1e3)))
        default_reps = 1 if quick else (SLOW_REPS if sizes.slow else REPS)
        timeout = sizes.timeout[1] if quick else sizes.timeout[0]
        title = sizes.title.format(**params)
        workloads.append(
            Workload(key, title, params, reps or default_reps, timeout, tuple(sizes.pools))
        )
    return Plan(quick, workloads, loops)


# -- running trials --------------------------------------------------------------


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid``: the trial and every worker it started.

    A whole session rather than one process group, because some pools (procorch
    among them) move their workers into process groups of their own.
    """
    import psutil

    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def _parse_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return {"status": "error", "detail": f"exit code {returncode}: {tail}"}


class LoadMeter:
    """The share of the machine's CPU that processes other than a trial's used meanwhile.

    This machine may be shared; a trial's figures mean less when something else
    was busy. Busy CPU time of the whole machine, less the CPU time of the trial
    and of the workers it waited for, over the cores times the wall time.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._wall = time.perf_counter()
        self._busy = self._machine_busy()
        self._own = self._children_cpu()

    def _machine_busy(self) -> float:
        times = self._psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @staticmethod
    def _children_cpu() -> float:
        """CPU time of this process and of the children it (and they) waited for."""
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def share(self) -> float:
        """Other processes' CPU use since construction, as a fraction of all cores."""
        wall = time.perf_counter() - self._wall
        busy = self._machine_busy() - self._busy
        own = self._children_cpu() - self._own
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def run_trial_process(
    workload: Workload, pool: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one trial in a fresh session; kill the session on timeout or exit."""
    command = [sys.executable, __file__, "--trial", workload.key, pool, json.dumps(workload.params)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        load = LoadMeter()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            proc.wait(timeout=workload.timeout)
            background = load.share()
        except subprocess.TimeoutExpired:
            background = None
        _kill_session(proc.pid)  # also any worker the trial left behind
        proc.wait()
        if background is None:
            return {"status": "hang", "timeout": workload.timeout}
        out.seek(0)
        err.seek(0)
        return {**_parse_result(out.read(), err.read(), proc.returncode), "load": background}


def _trial_note(result: dict[str, Any], seconds: float) -> str:
    if result["status"] != "ok":
        detail = result.get("detail") or f"(killed after {result.get('timeout')} s)"
        return f"{result['status']} {detail}"
    return f"ok in {seconds:.1f} s"


def run_plan(plan: Plan) -> None:
    """Repetitions outside, workloads inside them, pools innermost in a rotating order."""
    for rep in range(max(w.reps for w in plan.workloads)):
        for workload in plan.workloads:
            if rep >= workload.reps:
                continue
            shift = rep % len(workload.pools)
            order = [*workload.pools[shift:], *workload.pools[:shift]]
            for pool in order:
                runs = plan.results.setdefault(workload.key, {}).setdefault(pool, [])
                if runs and all(run["status"] == "hang" for run in runs):
                    runs.append({**runs[-1], "skipped": True})  # it always hangs: don't wait again
                    continue
                start = time.perf_counter()
                result = run_trial_process(workload, pool)
                runs.append(result)
                note = _trial_note(result, time.perf_counter() - start)
                print(
                    f"  rep {rep + 1}/{workload.reps} {workload.key:9} {pool:21} {note}",
                    file=sys.stderr,
                    flush=True,
                )


# -- summarising ------------------------------------------------------------------


@dataclass
class Row:
    """One pool's line in a workload's table."""

    pool: str
    value: float | None  # the headline figure (None: the pool could not produce it)
    cells: list[str]
    status: str = ""  # why there is no value, or a note
    lost: int = 0  # steps the pool lost (crash workload)


def _ok_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if run["status"] == "ok"]


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def _span(runs: list[dict[str, Any]], key: str) -> str:
    """A count over repetitions: one value, or the range when they differ."""
    values = sorted({run[key] for run in runs})
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _failure_text(runs: list[dict[str, Any]]) -> str:
    """Why a pool has no figure: it hung, broke or errored (in how many repetitions)."""
    bad = [run for run in runs if run["status"] != "ok"]
    run = bad[0]
    if run["status"] == "hang":
        skipped = (
            " (so later repetitions were skipped)" if any(r.get("skipped") for r in bad) else ""
        )
        return f"hangs (killed after {run['timeout']:.0f} s){skipped}"
    if run["status"] == "broken":
        return f"broken: {run['detail']}"
    return f"error: {run.get('detail', '?')[:160]}"


def _rows(
    plan: Plan,
    key: str,
    make: Callable[[str, list[dict[str, Any]]], Row],
    blank: int,
) -> list[Row]:
    rows = []
    for pool, runs in plan.results.get(key, {}).items():
        good = _ok_runs(runs)
        if good:
            row = make(pool, good)
            if len(good) < len(runs):
                failed = f"{len(runs) - len(good)} of {len(runs)} runs: {_failure_text(runs)}"
                row.status = f"{row.status}; {failed}" if row.status else failed
            rows.append(row)
        else:
            rows.append(Row(pool, None, ["-"] * blank, _failure_text(runs)))
    return sorted(rows, key=lambda row: POOLS.index(row.pool))


def dispatch_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    seconds = _med(runs, "seconds")
    steps = runs[0]["steps"]
    failed = [r for r in runs if r["succeeded"] != steps]
    status = "batches steps by itself (batch_size='auto')" if pool == "joblib" else ""
    if failed:
        status += f" {len(failed)} runs had failed steps"
    return Row(
        pool, steps / seconds, [f"{steps / seconds:,.0f}", f"{seconds / steps * 1e6:.0f}"], status
    )


def cpu_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    speedup = _med(runs, "speedup")
    cells = [
        f"{speedup:.2f}x",
        f"{_med(runs, 'seconds'):.2f}",
        f"{_med(runs, 'serial'):.2f}",
        f"{_med(runs, 'step_ms'):.1f}",
    ]
    return Row(pool, speedup, cells)


def crash_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    first = runs[0]
    lost = max(run["lost"] for run in runs)
    if lost:
        errors = ", ".join(sorted(first["innocent_errors"]))
        after = max(run["broken_after"] for run in runs if run["broken_after"])
        verdict = f"breaks: {errors} for the pending steps after crash #{after}"
    elif all(run["labelled"] == run["crashes"] for run in runs):
        verdict = "isolates every crash"
    else:
        verdict = "loses no step, but not every crash is labelled"
    cells = [
        f"{_med(runs, 'seconds'):.2f}",
        f"{_span(runs, 'labelled')} / {first['crashes']}",
        f"{_span(runs, 'lost')} / {first['innocents']}",
    ]
    return Row(pool, _med(runs, "seconds"), cells, verdict, lost)


RECOVERY_HOW = {
    "procorch": "by itself (the batch is submitted at once)",
    "pebble": "by itself (the batch is submitted at once)",
    "multiprocessing.Pool": "by itself, but a crashed step's result never comes (waiting on it "
    "hangs); only the other steps are waited on",
    "loky": "after the crash is reported, call get_reusable_executor() again (a new executor)",
    "joblib": "after the crash is reported, the next Parallel call (a new executor, 2 workers: "
    "n_jobs=1 runs in-process)",
    "ProcessPoolExecutor": "after the crash is reported, submit again",
}


def recovery_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    gaps = sorted(gap for run in runs for gap in run["gaps_ms"])
    median = float(statistics.median(gaps))
    p90 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.9))]
    how = RECOVERY_HOW.get(pool, "")
    events = [gap for run in runs for gap in run.get("event_gap_ms", [])]
    if events:
        how += f"; StepCrashed to StepStarted: {statistics.median(events):.0f} ms"
    return Row(pool, median, [f"{median:.0f}", f"{p90:.0f}", str(len(gaps))], how)


EVENT_CHANNEL = {
    "procorch": "its event stream (events= callback)",
    "loky": "loky Queue, via initializer",
    "joblib": "joblib's loky Queue, via initializer",
}


def events_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    rate = _med(runs, "per_second")
    cells = [f"{rate:,.0f}", f"{_med(runs, 'p50_ms'):.1f}", f"{_med(runs, 'p99_ms'):.1f}"]
    channel = EVENT_CHANNEL.get(pool, "multiprocessing.Queue, via initializer")
    return Row(pool, rate, cells, channel)


def memory_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    growth = _med(runs, "growth_mb")
    cells = [f"{growth:.1f}", f"{_med(runs, 'peak_growth_mb'):.1f}", f"{_med(runs, 'seconds'):.1f}"]
    return Row(pool, growth, cells)


def efficiency_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    cells = [
        f"{_med(runs, 'efficiency'):.3f}",
        f"{_med(runs, 'seconds'):.2f}",
        f"{_med(runs, 'step_ms'):.2f}",
        f"{_med(runs, 'parent_cpu'):.2f}",
    ]
    return Row(pool, _med(runs, "efficiency"), cells)


def dispatch_cpu_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    row = dispatch_row(pool, runs)
    row.cells.append(f"{_med(runs, 'parent_cpu_us'):.1f}")
    return row


def payload_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    rate = _med(runs, "mb_per_s")
    cells = [
        f"{rate:,.0f}",
        f"{_med(runs, 'seconds'):.2f}",
        f"{_med(runs, 'peak_mb'):.0f}",
        f"{_med(runs, 'peak_above_mb'):.0f}",
    ]
    return Row(pool, rate, cells)


_PAYLOAD_COLUMNS = ["MB/s", "wall s", "caller peak RSS MiB", "peak above start MiB"]


# -- cold start and lean workers: rows -----------------------------------------------


def import_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    ms = _med(runs, "import_ms")
    status = ""
    if pool == "procorch":
        status = (
            f"a first call also loads the pool: `{_PROCORCH_CORE}` {_med(runs, 'core_ms'):.0f} ms"
        )
    return Row(pool, ms, [f"{ms:.0f}"], status)


def coldstart_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    wall = _med(runs, "wall_ms")
    python = _med(runs, "python_ms")
    return Row(pool, wall, [f"{wall:.0f}", f"{python:.0f}"])


def uss_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    uss = _med(runs, "uss_mib")
    cells = [f"{uss:.1f}", f"{max(run['max_mib'] for run in runs):.1f}", _span(runs, "workers")]
    return Row(pool, uss, cells)


def hint32_row(pool: str, runs: list[dict[str, Any]]) -> Row:
    cold, warm, ideal = _med(runs, "cold_s"), _med(runs, "warm_s"), runs[0]["ideal_s"]
    cells = [
        f"{cold:.2f}",
        f"{cold / ideal:.2f}x",
        f"{warm:.2f}",
        f"{warm / ideal:.2f}x",
        _span(runs, "workers_used"),
    ]
    failed = [r for r in runs if r["succeeded"] != r["steps"]]
    status = f"{len(failed)} runs had failed steps" if failed else ""
    return Row(pool, cold, cells, status)


_PROCORCH_CORE = "from procorch import execute_steps_parallel"


@dataclass(frozen=True)
class Table:
    """How one workload is summarised."""

    make: Callable[[str, list[dict[str, Any]]], Row]
    columns: list[str]
    higher_is_better: bool
    unit: str  # for the chart's axis
    note_column: str = "notes"
    words: tuple[str, str] = ("faster", "slower")  # procorch ahead, behind


TABLES = {
    "dispatch": Table(dispatch_row, ["steps/s", "us per step"], True, "steps per second"),
    "cpu": Table(
        cpu_row,
        ["speed-up", "parallel s", "serial s", "ms per step"],
        True,
        "speed-up over serial",
        words=("better", "worse"),
    ),
    "crash": Table(
        crash_row,
        ["wall s", "crashes labelled", "innocents lost"],
        False,
        "wall seconds",
        "what happens",
    ),
    "recovery": Table(
        recovery_row,
        ["median ms", "p90 ms", "crashes"],
        False,
        "ms from crash to next start",
        "how it recovers",
    ),
    "events": Table(
        events_row, ["events/s", "p50 ms", "p99 ms"], True, "events per second", "channel"
    ),
    "memory": Table(
        memory_row,
        ["RSS growth MiB", "peak growth MiB", "wall s"],
        False,
        "RSS growth (MiB)",
        words=("less memory", "more memory"),
    ),
    "import": Table(import_row, ["import ms"], False, "ms", words=("faster", "slower")),
    "coldstart": Table(
        coldstart_row,
        ["wall ms", "bare interpreter ms"],
        False,
        "ms for the whole process",
    ),
    "uss": Table(
        uss_row,
        ["USS MiB (median)", "max MiB", "workers"],
        False,
        "MiB private per worker",
        words=("less memory", "more memory"),
    ),
    "hint32": Table(
        hint32_row,
        ["cold s", "cold vs ideal", "warm s", "warm vs ideal", "workers used"],
        False,
        "seconds for the first call",
    ),
}


TABLES.update(
    {
        "eff10": Table(
            efficiency_row,
            ["efficiency", "wall s", "ms in a step", "caller CPU s"],
            True,
            "efficiency (2.00 = ideal)",
            words=("better", "worse"),
        ),
        "eff1": Table(
            efficiency_row,
            ["efficiency", "wall s", "ms in a step", "caller CPU s"],
            True,
            "efficiency (2.00 = ideal)",
            words=("better", "worse"),
        ),
        "dispatch_joblib": Table(
            dispatch_cpu_row, ["steps/s", "us per step", "caller CPU us/step"], True, "steps/s"
        ),
        "out10": Table(payload_row, _PAYLOAD_COLUMNS, True, "MB/s"),
        "out100": Table(payload_row, _PAYLOAD_COLUMNS, True, "MB/s"),
        "prompts": Table(payload_row, _PAYLOAD_COLUMNS, True, "MB/s"),
    }
)


def _versus(mine: Row | None, peer: Row, table: Table) -> str:
    """procorch's headline figure against this peer's, in words."""
    if peer.pool == "procorch":
        return "-"
    if mine is None or mine.value is None:
        return "n/a"
    if peer.value is None:
        return "n/a (peer failed)"
    if peer.lost:
        return "n/a (peer lost steps)"
    if peer.value <= 0 or mine.value <= 0:
        return "n/a"
    ratio = mine.value / peer.value if table.higher_is_better else peer.value / mine.value
    ahead, behind = table.words
    return f"{max(ratio, 1 / ratio):.2f}x {ahead if ratio >= 1 else behind}"


def workload_rows(plan: Plan) -> dict[str, list[Row]]:
    return {
        w.key: _rows(plan, w.key, TABLES[w.key].make, len(TABLES[w.key].columns))
        for w in plan.workloads
    }


def runs_of(plan: Plan, key: str) -> list[dict[str, Any]]:
    """Every trial run of one workload, all pools."""
    return [run for runs in plan.results.get(key, {}).values() for run in runs]


def _load_text(runs: list[dict[str, Any]]) -> str:
    """The other processes' CPU share during these trials: median and worst."""
    loads = [run["load"] for run in runs if "load" in run and not run.get("skipped")]
    if not loads:
        return "other load unknown"
    return (
        f"other processes used {statistics.median(loads):.0%} of the CPU, "
        f"{max(loads):.0%} in the worst trial"
    )


def _markdown_table(plan: Plan, workload: Workload, rows: list[Row]) -> list[str]:
    table = TABLES[workload.key]
    mine = next((row for row in rows if row.pool == "procorch"), None)
    reps = f"median of {workload.reps} run{'s' if workload.reps > 1 else ''}"
    load = _load_text(runs_of(plan, workload.key))
    lines = [
        f"### {workload.title} ({reps}; {load})",
        "",
        f"| pool | {' | '.join(table.columns)} | procorch vs this pool | {table.note_column} |",
        f"|---|{'---:|' * len(table.columns)}---|---|",
    ]
    for row in rows:
        cells = " | ".join(row.cells)
        lines.append(f"| {row.pool} | {cells} | {_versus(mine, row, table)} | {row.status} |")
    return [*lines, ""]


# -- targets -----------------------------------------------------------------------


def _value(rows: dict[str, list[Row]], key: str, pool: str) -> float | None:
    row = next((r for r in rows.get(key, []) if r.pool == pool), None)
    return None if row is None else row.value


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _at_least(value: float | None, bound: float | None) -> bool | None:
    return None if value is None or bound is None else value >= bound


def _at_most(value: float | None, bound: float | None) -> bool | None:
    return None if value is None or bound is None else value <= bound


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _procorch_runs(plan: Plan, key: str) -> list[dict[str, Any]]:
    return _ok_runs(plan.results.get(key, {}).get("procorch", []))


Target = tuple[str, str, bool | None]  # what, what procorch measured, met (None: no figure)


def dispatch_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine, loky, pebble = (_value(rows, "dispatch", p) for p in ("procorch", "loky", "pebble"))
    measured = f"{_fmt(mine, ',.0f')} steps/s"
    return [
        ("steps/s >= raw loky's", f"{measured} vs {_fmt(loky, ',.0f')}", _at_least(mine, loky)),
        ("steps/s >= pebble's", f"{measured} vs {_fmt(pebble, ',.0f')}", _at_least(mine, pebble)),
    ]


def cpu_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    speedup = _value(rows, "cpu", "procorch")
    return [("speed-up >= 1.8", _fmt(speedup, ".2f", "x"), _at_least(speedup, 1.8))]


def crash_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    runs = _procorch_runs(plan, "crash")
    if not runs:
        return [("crash-heavy batch completes", "no figure", False)]
    lost = max(run["lost"] for run in runs)
    labelled = all(run["labelled"] == run["crashes"] for run in runs)
    wall, pebble = _value(rows, "crash", "procorch"), _value(rows, "crash", "pebble")
    return [
        ("no innocent step lost", f"{lost} of {runs[0]['innocents']} lost", lost == 0),
        ("every crash labelled", f"{_span(runs, 'labelled')} of {runs[0]['crashes']}", labelled),
        (
            "wall <= 1.2x pebble's",
            f"{_fmt(wall, '.2f', ' s')} vs {_fmt(pebble, '.2f', ' s')}",
            _at_most(wall, _scaled(pebble, 1.2)),
        ),
    ]


def recovery_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    gap = _value(rows, "recovery", "procorch")
    return [("median <= 60 ms", _fmt(gap, ".0f", " ms"), _at_most(gap, 60))]


def events_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    runs = _procorch_runs(plan, "events")
    rate = _value(rows, "events", "procorch")
    p99 = _med(runs, "p99_ms") if runs else None
    return [
        (">= 50,000 events/s", _fmt(rate, ",.0f", "/s"), _at_least(rate, 50_000)),
        ("p99 latency < 10 ms", _fmt(p99, ".1f", " ms"), None if p99 is None else p99 < 10),
    ]


def memory_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine, loky = _value(rows, "memory", "procorch"), _value(rows, "memory", "loky")
    return [
        (
            "RSS growth <= 1.5x raw loky's",
            f"{_fmt(mine, '.1f', ' MiB')} vs {_fmt(loky, '.1f', ' MiB')}",
            _at_most(mine, _scaled(loky, 1.5)),
        )
    ]


# -- cold start and lean workers: targets (issue 16) ---------------------------------


def import_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    ms = _value(rows, "import", "procorch")
    return [("import procorch < 60 ms", _fmt(ms, ".0f", " ms"), None if ms is None else ms < 60)]


def coldstart_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine, pebble = _value(rows, "coldstart", "procorch"), _value(rows, "coldstart", "pebble")
    return [
        (
            "whole process <= pebble's",
            f"{_fmt(mine, '.0f', ' ms')} vs {_fmt(pebble, '.0f', ' ms')}",
            _at_most(mine, pebble),
        )
    ]


def uss_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine, ppe = _value(rows, "uss", "procorch"), _value(rows, "uss", "ProcessPoolExecutor")
    bound = None if ppe is None else 2 * ppe + 2
    return [
        (
            "worker USS <= 2x ProcessPoolExecutor's + 2 MiB",
            f"{_fmt(mine, '.1f', ' MiB')} vs bound {_fmt(bound, '.1f', ' MiB')}",
            _at_most(mine, bound),
        )
    ]


def hint32_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine = _value(rows, "hint32", "procorch")
    ppe = _value(rows, "hint32", "ProcessPoolExecutor")
    return [
        (
            "cold <= 1.2x ProcessPoolExecutor's cold",
            f"{_fmt(mine, '.2f', ' s')} vs {_fmt(ppe, '.2f', ' s')}",
            _at_most(mine, _scaled(ppe, 1.2)),
        )
    ]


TARGETS = {
    "dispatch": dispatch_targets,
    "cpu": cpu_targets,
    "crash": crash_targets,
    "recovery": recovery_targets,
    "events": events_targets,
    "memory": memory_targets,
    "import": import_targets,
    "coldstart": coldstart_targets,
    "uss": uss_targets,
    "hint32": hint32_targets,
}


def _runs_value(plan: Plan, key: str, pool: str, field: str) -> float | None:
    runs = _ok_runs(plan.results.get(key, {}).get(pool, []))
    return _med(runs, field) if runs else None


def efficiency_targets(plan: Plan, rows: dict[str, list[Row]], key: str) -> list[Target]:
    mine = _value(rows, key, "procorch")
    ppe, pebble = _value(rows, key, "ProcessPoolExecutor"), _value(rows, key, "pebble")
    best = max((v for v in (ppe, pebble) if v is not None), default=None)
    measured = f"{_fmt(mine, '.3f')} vs {_fmt(ppe, '.3f')} / {_fmt(pebble, '.3f')}"
    targets = []
    if key == "eff10":
        targets.append((">= 1.95", _fmt(mine, ".3f"), _at_least(mine, 1.95)))
        targets.append((">= ProcessPoolExecutor's and pebble's", measured, _at_least(mine, best)))
    else:
        ahead = None if mine is None or best is None else mine > best
        targets.append(("ahead of ProcessPoolExecutor and pebble", measured, ahead))
    return targets


def dispatch_joblib_targets(plan: Plan, rows: dict[str, list[Row]]) -> list[Target]:
    mine, joblib = (
        _value(rows, "dispatch_joblib", "procorch"),
        _value(rows, "dispatch_joblib", "joblib"),
    )
    cpu = _runs_value(plan, "dispatch_joblib", "procorch", "parent_cpu_us")
    return [
        (
            "steps/s >= 0.75x joblib's auto-batching",
            f"{_fmt(mine, ',.0f')} vs {_fmt(joblib, ',.0f')}",
            _at_least(mine, _scaled(joblib, 0.75)),
        ),
        ("caller CPU <= 3 us per step", _fmt(cpu, ".1f", " us"), _at_most(cpu, 3.0)),
    ]


def payload_targets(plan: Plan, rows: dict[str, list[Row]], key: str) -> list[Target]:
    mine, ppe = _value(rows, key, "procorch"), _value(rows, key, "ProcessPoolExecutor")
    peak = _runs_value(plan, key, "procorch", "peak_mb")
    ppe_peak = _runs_value(plan, key, "ProcessPoolExecutor", "peak_mb")
    return [
        (
            "MB/s >= ProcessPoolExecutor's",
            f"{_fmt(mine, ',.0f')} vs {_fmt(ppe, ',.0f')}",
            _at_least(mine, ppe),
        ),
        (
            "caller peak <= 1.5x ProcessPoolExecutor's",
            f"{_fmt(peak, '.0f', ' MiB')} vs {_fmt(ppe_peak, '.0f', ' MiB')}",
            _at_most(peak, _scaled(ppe_peak, 1.5)),
        ),
    ]


TARGETS.update(
    {
        "eff10": lambda plan, rows: efficiency_targets(plan, rows, "eff10"),
        "eff1": lambda plan, rows: efficiency_targets(plan, rows, "eff1"),
        "dispatch_joblib": dispatch_joblib_targets,
        "out10": lambda plan, rows: payload_targets(plan, rows, "out10"),
        "out100": lambda plan, rows: payload_targets(plan, rows, "out100"),
        "prompts": lambda plan, rows: payload_targets(plan, rows, "prompts"),
    }
)


def _target_lines(plan: Plan, rows: dict[str, list[Row]]) -> list[str]:
    """One line per target: what it is, what procorch measured (vs the peer), met or missed."""
    lines = ["| workload | target | procorch (vs peer) | verdict |", "|---|---|---|---|"]
    for workload in plan.workloads:
        for target, measured, ok in [*TARGETS[workload.key](plan, rows), _finished(plan, workload)]:
            lines.append(f"| {workload.key} | {target} | {measured} | {_verdict(ok)} |")
    return [*lines, ""]


def _finished(plan: Plan, workload: Workload) -> Target:
    """Whether every procorch run of the workload finished (no hang, no error)."""
    runs = plan.results.get(workload.key, {}).get("procorch", [])
    bad = [run["status"] for run in runs if run["status"] != "ok"]
    summary = ", ".join(f"{bad.count(s)} {s}" for s in sorted(set(bad)))
    measured = f"{len(runs) - len(bad)} of {len(runs)} ok" + (f" ({summary})" if bad else "")
    return ("every run finishes", measured, not bad if runs else None)


# -- the report ---------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _procorch_source() -> str:
    """procorch's version and where it was imported from (commit, if it is this checkout)."""
    import procorch

    where = Path(procorch.__file__).resolve().parent
    repo = HERE.parent
    if where.parent != repo:
        return f"procorch {procorch.__version__} from {where}"
    git = ["git", "-C", str(repo)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "procorch"], capture_output=True, text=True
    ).stdout.strip()
    state = " + uncommitted changes" if dirty else ""
    return f"procorch {procorch.__version__} at commit {commit or '?'}{state}"


def header_lines(plan: Plan, elapsed: float) -> list[str]:
    all_runs = [run for w in plan.workloads for run in runs_of(plan, w.key)]
    reps = ", ".join(f"{w.key} {w.reps}" for w in plan.workloads)
    if len({w.reps for w in plan.workloads}) > 1:
        reps += " (fewer for the slowest workloads, to keep the run near 15 minutes)"
    peers = ", ".join(f"{name} {_version(name)}" for name in ("loky", "Pebble", "joblib"))
    return [
        "# procorch and its peers" + (" (quick smoke run)" if plan.quick else ""),
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.system()}",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- {_procorch_source()}; {peers}",
        f"- repetitions (each a fresh process per pool, interleaved): {reps}",
        f"- every pool has 2 workers (recovery: 1, joblib 2); busy loop: {plan.loops:,} "
        f"iterations for ~{STEP_SECONDS * 1e3:.0f} ms; the whole run took {elapsed / 60:.1f} min",
        "- command: `python benchmarks/bench_peers.py" + (" --quick`" if plan.quick else "`"),
        f"- while the trials ran, {_load_text(all_runs)}: this machine may be shared, so "
        "figures from busy trials are less trustworthy (CPU-bound ones most)",
        "",
    ]


def run_reports(plan: Plan, out: Path) -> dict[str, Path]:
    """``--reports``: one more procorch trial per workload, untimed, writing its run report."""
    from _peer_trials import REPORT_ENV

    written = {}
    for workload in plan.workloads:
        if "procorch" not in workload.pools:
            continue
        path = out.with_name(f"{out.name}-{workload.key}.html")
        result = run_trial_process(workload, "procorch", {REPORT_ENV: str(path)})
        print(f"  report    {workload.key:9} {result['status']} {path}", file=sys.stderr)
        if result["status"] == "ok" and path.exists():
            written[workload.key] = path
    return written


def markdown(
    plan: Plan, rows: dict[str, list[Row]], elapsed: float, reports: dict[str, Path] | None = None
) -> str:
    lines = header_lines(plan, elapsed)
    lines += ["## Targets", "", *_target_lines(plan, rows), "## Workloads", ""]
    for workload in plan.workloads:
        lines += _markdown_table(plan, workload, rows[workload.key])
        report = (reports or {}).get(workload.key)
        if report is not None:
            lines += [
                f"procorch's run, drawn: [{report.name}]({report.name}) (an extra, untimed "
                "trial with a `procorch.ReportSink` listening)",
                "",
            ]
    lines += [
        "Notes: a peer's crash counts as labelled only if its error differs from every error "
        "an innocent step got. 'procorch vs this pool' compares the first column; it is left "
        "out where the peer failed or lost steps. Event latency is measured while the steps "
        "emit as fast as they can, so it includes the backlog waiting in the pipe or queue. "
        "A peer's memory growth is mostly the futures of its submit-everything loop (100,000 "
        "bare concurrent.futures.Future objects alone take about 160 MiB, and the allocator "
        "keeps much of it after they are freed); joblib batches and holds no future per step.",
        "",
    ]
    return "\n".join(lines)


def chart(plan: Plan, rows: dict[str, list[Row]], path: Path) -> None:
    """One subplot per workload, one bar per pool; a pool without a figure says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(plan.workloads)
    cols = min(3, count)
    fig_rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(fig_rows, cols, figsize=(5.2 * cols, 4.2 * fig_rows), squeeze=False)
    for ax, workload in zip(axes.flat, plan.workloads, strict=False):
        _bars(ax, workload, rows[workload.key])
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.suptitle(
        f"procorch and its peers ({platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(value: float) -> str:
    """A bar label: 38.4k, 153, 1.74."""
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(ax: Any, workload: Workload, rows: list[Row]) -> None:
    table = TABLES[workload.key]
    names = [
        row.pool.replace("ProcessPoolExecutor", "ProcessPool\nExecutor").replace(
            "multiprocessing.Pool", "multiprocessing\n.Pool"
        )
        for row in rows
    ]
    values = [row.value or 0.0 for row in rows]
    colors = ["tab:orange" if row.pool == "procorch" else "tab:blue" for row in rows]
    hatches = ["//" if row.lost else "" for row in rows]
    bars = ax.bar(range(len(rows)), values, color=colors, hatch=hatches, edgecolor="white")
    top = max(values, default=1.0) or 1.0
    for bar, row in zip(bars, rows, strict=True):
        if row.value is None:
            label = row.status.split(" (")[0].split(":")[0]
        elif row.lost:
            label = f"{_short(row.value)}\n{row.lost} lost"
        else:
            label = _short(row.value)
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + top * 0.01,
            label,
            ha="center",
            va="bottom",
            fontsize=7,
            color="black" if row.value else "red",
        )
    ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel(table.unit, fontsize=8)
    better = "higher" if table.higher_is_better else "lower"
    ax.set_title(f"{workload.key}: {better} is better", fontsize=9)


# -- entry points ----------------------------------------------------------------------


def trial_main(workload: str, pool: str, params: str) -> None:
    """The ``--trial`` process: run one trial and print its result line."""
    from _peer_trials import run_trial

    result = run_trial(workload, pool, json.loads(params))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _compile_procorch() -> None:
    """Write procorch's bytecode, as installing it does, so imports are timed as users see them.

    A checkout run with PYTHONDONTWRITEBYTECODE (this machine sets it) would
    otherwise compile every procorch module in every trial; the peers come
    from site-packages, compiled when pip installed them.
    """
    import compileall

    import procorch

    compileall.compile_dir(os.path.dirname(procorch.__file__), quiet=1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--reps", type=int, help="repetitions for every workload")
    parser.add_argument("--only", default="", help="comma-separated workloads to run")
    parser.add_argument("--out", type=Path, help="output path without suffix")
    parser.add_argument(
        "--reports",
        action="store_true",
        help="also run each workload once more on procorch, untimed, and write its run "
        "report (procorch.write_report) beside the tables: OUT-WORKLOAD.html",
    )
    parser.add_argument(
        "--trial", nargs=3, metavar=("WORKLOAD", "POOL", "PARAMS"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.trial:
        trial_main(*args.trial)
        return
    from _peer_workloads import calibrate_loops

    _compile_procorch()
    started = time.perf_counter()
    only = [key for key in args.only.split(",") if key]
    plan = make_plan(args.quick, args.reps, only, calibrate_loops(STEP_SECONDS))
    run_plan(plan)
    elapsed = time.perf_counter() - started
    rows = workload_rows(plan)
    out = args.out or HERE / "results" / ("peers-quick" if args.quick else "peers")
    out.parent.mkdir(parents=True, exist_ok=True)
    reports = run_reports(plan, out) if args.reports else None
    text = markdown(plan, rows, elapsed, reports)
    out.with_suffix(".md").write_text(text)
    chart(plan, rows, out.with_suffix(".png"))
    raw = {w.key: {"params": w.params, "runs": plan.results.get(w.key, {})} for w in plan.workloads}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(text)
    print(f"wrote {out}.md, .png and .json (every trial's figures)", file=sys.stderr)


if __name__ == "__main__":
    main()
