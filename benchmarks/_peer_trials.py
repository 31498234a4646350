"""One trial of bench_peers.py: one workload on one pool, in a process of its own.

bench_peers.py starts ``python bench_peers.py --trial WORKLOAD POOL PARAMS`` for
every (workload, pool, repetition); this module is what that process runs. It
prints one line, ``RESULT {json}``, holding the trial's figures, or the status
``broken`` with the reason the pool could not go on. A trial that never ends
is the parent's business: it kills every process of the trial's session.

The peers are driven through one small interface (``Peer``) so each workload
is written once for all of them; procorch, whose API is a batch call with an
event stream, has a function of its own per workload.
"""

from __future__ import annotations

import collections
import gc
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _peer_workloads as work
import psutil

Outcome = tuple[bool, Any]  # (succeeded, value or exception)
Finish = Callable[[], list[Outcome]]
MIB = 1024 * 1024


class PoolBroken(Exception):
    """The pool cannot run another step; the message says why."""


# -- the peers ---------------------------------------------------------------


class _Refused:
    """Stands for a step that the pool refused to take."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class Peer:
    """A pool driven by submitting one call per step and waiting on its handle."""

    name = ""
    survives_crashes = False  # keeps serving steps after a worker dies

    def __init__(self) -> None:
        self.pool: Any = None
        self.workers = 2
        self.init: tuple[Any, tuple[Any, ...]] = (None, ())

    def start(self, workers: int, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> None:
        self.workers = workers
        self.init = (initializer, initargs)
        self.pool = self._make()

    def _make(self) -> Any:
        raise NotImplementedError

    def make_queue(self) -> Any:
        """A queue the workers can receive through the pool's initializer."""
        import multiprocessing

        return multiprocessing.Queue()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def try_submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A handle, or the exception submit raised (a broken pool refuses new work)."""
        try:
            return self.submit(fn, *args)
        except Exception as exc:
            return _Refused(exc)

    def outcome(self, handle: Any) -> Outcome:
        """Wait for ``handle``: (True, its value) or (False, the exception)."""
        if isinstance(handle, _Refused):
            return False, handle.exc
        try:
            return True, self.result(handle)
        except Exception as exc:
            return False, exc

    def start_batch(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]) -> Finish:
        """Submit every call now; the returned function waits for them in order."""
        handles = [self.try_submit(fn, *args) for args in arg_tuples]
        return lambda: [self.outcome(handle) for handle in handles]

    def map_outcomes(
        self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]
    ) -> list[Outcome]:
        return self.start_batch(fn, arg_tuples)()

    def after_crash(self) -> None:
        """What a user does after a worker died, before submitting again."""

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class LokyPeer(Peer):
    """``loky.get_reusable_executor(max_workers=2)`` and a submit loop."""

    name = "loky"

    def _make(self) -> Any:
        import loky

        initializer, initargs = self.init
        return loky.get_reusable_executor(
            max_workers=self.workers, initializer=initializer, initargs=initargs
        )

    def make_queue(self) -> Any:
        from loky.backend import get_context

        return get_context("loky").Queue()

    def after_crash(self) -> None:
        self.pool = self._make()  # a broken reusable executor is replaced on the next call


class ProcessPoolPeer(Peer):
    """``concurrent.futures.ProcessPoolExecutor(2)`` (fork, Linux's default)."""

    name = "ProcessPoolExecutor"

    def _make(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        initializer, initargs = self.init
        return ProcessPoolExecutor(self.workers, initializer=initializer, initargs=initargs)


class PebblePeer(Peer):
    """``pebble.ProcessPool(max_workers=2)``: schedule, then result."""

    name = "pebble"
    survives_crashes = True

    def _make(self) -> Any:
        import pebble

        initializer, initargs = self.init
        return pebble.ProcessPool(
            max_workers=self.workers, initializer=initializer, initargs=initargs
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()


class MultiprocessingPeer(Peer):
    """``multiprocessing.Pool(2)``: apply_async, then get (fork, Linux's default)."""

    name = "multiprocessing.Pool"
    survives_crashes = True  # it replaces a dead worker, but the dead worker's task never returns

    def _make(self) -> Any:
        import multiprocessing

        initializer, initargs = self.init
        return multiprocessing.Pool(self.workers, initializer, initargs)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any) -> Any:
        return handle.get()

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class JoblibPeer(Peer):
    """``joblib.Parallel(n_jobs=2, backend="loky")`` over the batch, results as a generator.

    joblib runs ``n_jobs=1`` in the calling process (a segfault would kill the
    trial), so it always gets at least 2 workers.
    """

    name = "joblib"

    def _make(self) -> Any:
        return None  # joblib keeps its own reusable executor between Parallel calls

    def make_queue(self) -> Any:
        from joblib.externals.loky.backend import get_context

        return get_context("loky").Queue()

    def _parallel(self) -> Any:
        import joblib

        initializer, initargs = self.init
        extra = {} if initializer is None else {"initializer": initializer, "initargs": initargs}
        return joblib.Parallel(
            n_jobs=max(2, self.workers), backend="loky", return_as="generator", **extra
        )

    def _run(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]) -> list[Outcome]:
        import joblib

        outcomes: list[Outcome] = []
        try:
            for value in self._parallel()(joblib.delayed(fn)(*args) for args in arg_tuples):
                outcomes.append((True, value))
        except Exception as exc:  # the whole call fails: every result not yet yielded is lost
            outcomes += [(False, exc)] * (len(arg_tuples) - len(outcomes))
        return outcomes

    def start_batch(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]) -> Finish:
        box: list[list[Outcome]] = []
        thread = threading.Thread(target=lambda: box.append(self._run(fn, arg_tuples)))
        thread.start()

        def finish() -> list[Outcome]:
            thread.join()
            return box[0]

        return finish

    def map_outcomes(
        self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]
    ) -> list[Outcome]:
        return self._run(fn, arg_tuples)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._run(fn, [args])[0]  # a finished (ok, value) pair

    def result(self, handle: Any) -> Any:
        ok, value = handle
        if not ok:
            raise value
        return value

    def close(self) -> None:
        pass


PEERS: dict[str, type[Peer]] = {
    peer.name: peer
    for peer in (LokyPeer, ProcessPoolPeer, PebblePeer, MultiprocessingPeer, JoblibPeer)
}


def warm_peer(peer: Peer) -> None:
    """Start every worker and run a few steps, so start-up is not timed."""
    for _ in range(2):
        peer.map_outcomes(work.noop, [(str(i),) for i in range(10 * peer.workers)])
    peer.map_outcomes(work.busy_loop, [(20_000,)] * (4 * peer.workers))


# -- procorch ------------------------------------------------------------------


def _procorch() -> Any:
    import procorch

    return procorch


def _specs(count: int) -> list[Any]:
    spec = _procorch().AgentStepSpec
    return [spec(str(i), "step", "", "") for i in range(count)]


def warm_procorch(workers: int) -> None:
    """Start the lanes and run a few steps on each."""
    procorch = _procorch()
    for _ in range(2):
        procorch.execute_steps_parallel(work.NoopExecutor(workers), _specs(10 * workers))


# Where a report trial (bench_peers.py --reports) writes procorch's run report.
REPORT_ENV = "PROCORCH_BENCH_REPORT"


def timed_procorch(executor: Any, specs: list[Any], events: Any = None) -> tuple[float, list[Any]]:
    """Seconds for one execute_steps_parallel call, and its outcomes.

    In a report trial, the call's events also go to a ``procorch.ReportSink``
    and its report is written where ``PROCORCH_BENCH_REPORT`` says (listening
    to events costs time: a report trial's figures are not the table's).
    """
    report_path = os.environ.get(REPORT_ENV)
    report = None
    if report_path:
        report = _procorch().ReportSink(forward=events)
        events = report
    start = time.perf_counter()
    outcomes = _procorch().execute_steps_parallel(executor, specs, events=events)
    seconds = time.perf_counter() - start
    if report is not None:
        report.write(report_path, title=f"procorch in bench_peers: {Path(report_path).stem}")
    return seconds, outcomes


def _timed_peer(
    peer: Peer, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]]
) -> tuple[float, list[Outcome]]:
    start = time.perf_counter()
    outcomes = peer.map_outcomes(fn, arg_tuples)
    return time.perf_counter() - start, outcomes


def _succeeded(outcomes: Sequence[Any]) -> int:
    return sum(1 for o in outcomes if (o[0] if isinstance(o, tuple) else o.success))


# -- the workloads ---------------------------------------------------------------


def dispatch(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """Wall time for ``steps`` no-op steps on a warm pool."""
    steps = p["steps"]
    if peer is None:
        specs = _specs(steps)
        seconds, outcomes = timed_procorch(work.NoopExecutor(2), specs)
    else:
        seconds, outcomes = _timed_peer(peer, work.noop, [(str(i),) for i in range(steps)])
    return {"seconds": seconds, "steps": steps, "succeeded": _succeeded(outcomes)}


def cpu(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """Speed-up of ``steps`` calibrated busy loops over running them serially here."""
    steps, loops = p["steps"], p["loops"]
    start = time.perf_counter()
    for _ in range(steps):
        work.busy_loop(loops)
    serial = time.perf_counter() - start
    if peer is None:
        seconds, outcomes = timed_procorch(work.BusyExecutor(loops), _specs(steps))
    else:
        seconds, outcomes = _timed_peer(peer, work.busy_loop, [(loops,)] * steps)
    return {
        "serial": serial,
        "seconds": seconds,
        "speedup": serial / seconds,
        "step_ms": serial / steps * 1e3,
        "succeeded": _succeeded(outcomes),
    }


def _broken_after(lost: list[int], every: int) -> int:
    """Which crash (1-based) broke the pool: the last one before the first lost innocent."""
    first_lost = min(lost)
    return max(1, sum(1 for i in range(first_lost) if work.is_crash_index(i, every)))


def crash(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``steps`` short steps, every ``every``-th of which segfaults: who is blamed, who is lost."""
    steps, every, seconds_each = p["steps"], p["every"], p["step_seconds"]
    if peer is None:
        executor = work.CrashyExecutor(every, seconds_each)
        seconds, raw = timed_procorch(executor, _specs(steps))
        results: list[tuple[bool, str]] = [
            (o.success, "ok" if o.success else (o.error.kind if o.error else "failed")) for o in raw
        ]
    else:
        args = [(i, every, seconds_each) for i in range(steps)]
        seconds, outcomes = _timed_peer(peer, work.sleep_or_crash, args)
        results = [(ok, "ok" if ok else type(value).__name__) for ok, value in outcomes]
    crash_steps = [i for i in range(steps) if work.is_crash_index(i, every)]
    lost = [i for i, (ok, _) in enumerate(results) if not ok and i not in crash_steps]
    innocent_errors = collections.Counter(results[i][1] for i in lost)
    crash_errors = collections.Counter(results[i][1] for i in crash_steps if not results[i][0])
    if peer is None:
        labelled = crash_errors.get("crash", 0)
    else:  # a crash counts only if its error is one no innocent step got
        labelled = sum(n for kind, n in crash_errors.items() if kind not in innocent_errors)
    return {
        "seconds": seconds,
        "crashes": len(crash_steps),
        "labelled": labelled,
        "innocents": steps - len(crash_steps),
        "lost": len(lost),
        "crash_errors": dict(crash_errors),
        "innocent_errors": dict(innocent_errors),
        "broken_after": _broken_after(lost, every) if lost else None,
    }


class _CrashWatch:
    """procorch events: seconds from each StepCrashed to the next StepStarted."""

    def __init__(self) -> None:
        self.crashed_at: float | None = None
        self.gaps: list[float] = []

    def __call__(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "StepCrashed":
            self.crashed_at = time.perf_counter()
        elif kind == "StepStarted" and self.crashed_at is not None:
            self.gaps.append(time.perf_counter() - self.crashed_at)
            self.crashed_at = None


def _recovery_procorch(paths: list[str]) -> tuple[list[float], dict[str, Any]]:
    spec = _procorch().AgentStepSpec
    specs = []
    for i, path in enumerate(paths):
        specs += [spec(f"c{i}", work.CRASH_AGENT, "", path), spec(f"s{i}", "stamp", "", "")]
    watch = _CrashWatch()
    _, outcomes = timed_procorch(work.RecoveryExecutor(1), specs, events=watch)
    kinds = collections.Counter(o.error.kind for o in outcomes[::2] if o.error)
    if kinds.get("crash") != len(paths):
        raise PoolBroken(f"crash steps were labelled {dict(kinds)}")
    stamps = [float(o.output) for o in outcomes[1::2]]
    return stamps, {"event_gap_ms": [gap * 1e3 for gap in watch.gaps]}


def _recovery_pipelined(peer: Peer, paths: list[str]) -> list[float]:
    """Submit crash, stamp, crash, stamp... at once; wait only on the stamps."""
    stamps = []
    for i, path in enumerate(paths):
        peer.submit(work.stamp_then_crash, path)
        stamps.append(peer.submit(work.start_stamp, f"s{i}"))
    return [peer.result(handle) for handle in stamps]


def _recovery_resubmit(peer: Peer, paths: list[str]) -> list[float]:
    """Wait for each crash to be reported, do what the pool needs, then submit the next step."""
    stamps = []
    for i, path in enumerate(paths):
        ok, _ = peer.outcome(peer.try_submit(work.stamp_then_crash, path))
        assert not ok, "a segfaulting step succeeded"
        peer.after_crash()
        ok, value = peer.outcome(peer.try_submit(work.start_stamp, f"s{i}"))
        if not ok:
            raise PoolBroken(f"{type(value).__name__} on every step after crash #{i + 1}")
        stamps.append(value)
    return stamps


def recovery(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """Gap from a crashing step's last timestamp to the next step's first, on one worker."""
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"crash-{i}") for i in range(p["crashes"])]
        if peer is None:
            stamps, extra = _recovery_procorch(paths)
        elif peer.survives_crashes:
            stamps = _recovery_pipelined(peer, paths)
        else:
            stamps = _recovery_resubmit(peer, paths)
        crashed_at = [float(Path(path).read_text()) for path in paths]
    gaps = [(after - before) * 1e3 for before, after in zip(crashed_at, stamps, strict=True)]
    mode = "pipelined" if peer is None or peer.survives_crashes else "resubmit"
    return {"gaps_ms": gaps, "mode": mode, **extra}


def _latency_summary(latencies: list[float], seconds: float) -> dict[str, Any]:
    latencies.sort()
    count = len(latencies)
    return {
        "events": count,
        "seconds": seconds,
        "per_second": count / seconds,
        "p50_ms": latencies[count // 2] * 1e3,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1e3,
        "max_ms": latencies[-1] * 1e3,
    }


def _events_procorch(steps: int, per_step: int) -> dict[str, Any]:
    from procorch import StepProgress

    latencies: list[float] = []
    clock = time.monotonic

    def on_event(event: Any) -> None:
        if type(event) is StepProgress:
            latencies.append(clock() - event.data)

    _procorch().execute_steps_parallel(work.EmitExecutor(100), _specs(4), events=on_event)
    latencies.clear()
    seconds, outcomes = timed_procorch(work.EmitExecutor(per_step), _specs(steps), on_event)
    return {**_latency_summary(latencies, seconds), "succeeded": _succeeded(outcomes)}


def _drain(peer: Peer, queue: Any, steps: int, per_step: int) -> tuple[float, list[float]]:
    """Submit the emitting steps, take every event off the queue, wait for the steps."""
    latencies: list[float] = []
    clock = time.monotonic
    get = queue.get
    start = time.perf_counter()
    finish = peer.start_batch(work.emit_to_queue, [(per_step,)] * steps)
    for _ in range(steps * per_step):
        latencies.append(clock() - get())
    finish()
    return time.perf_counter() - start, latencies


def events(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``steps`` steps emitting ``per_step`` timestamped events each: rate and latency."""
    steps, per_step = p["steps"], p["per_step"]
    if peer is None:
        return _events_procorch(steps, per_step)
    _drain(peer, p["queue"], 4, 100)
    seconds, latencies = _drain(peer, p["queue"], steps, per_step)
    return _latency_summary(latencies, seconds)


def _rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def memory(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """Growth of this (parent) process's RSS over ``steps`` no-op steps, results kept."""
    steps = p["steps"]
    before = _rss()
    if peer is None:
        seconds, results = timed_procorch(work.NoopExecutor(2), _specs(steps))
    else:
        seconds, results = _timed_peer(peer, work.noop, [(str(i),) for i in range(steps)])
    after = _rss()
    peak = max(after, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {
        "growth_mb": (after - before) / MIB,
        "peak_growth_mb": max(0, peak - before) / MIB,
        "before_mb": before / MIB,
        "seconds": seconds,
        "succeeded": _succeeded(results),
    }


# -- the hot path (issue 16): efficiency, joblib's dispatch, large payloads -----------


def efficiency(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``steps`` busy loops of ``step_ms``: seconds inside steps (measured where they ran) / wall.

    2.00 means both workers were always inside a step. The parent's CPU time
    is recorded too: at 1 ms steps it competes with the workers for the cores.
    """
    steps, loops = p["steps"], p["loops"]
    cpu_before = time.process_time()
    if peer is None:
        seconds, raw = timed_procorch(work.TimedBusyExecutor(loops), _specs(steps))
        inside = [float(o.output) for o in raw if o.success]
    else:
        seconds, outcomes = _timed_peer(peer, work.timed_busy_loop, [(loops,)] * steps)
        inside = [float(value) for ok, value in outcomes if ok]
    return {
        "seconds": seconds,
        "inside": sum(inside),
        "efficiency": sum(inside) / seconds,
        "step_ms": sum(inside) / max(1, len(inside)) * 1e3,
        "parent_cpu": time.process_time() - cpu_before,
        "succeeded": len(inside),
    }


def dispatch_cpu(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``dispatch``, with the calling process's CPU time per step (its threads included)."""
    cpu_before = time.process_time()
    figures = dispatch(pool, peer, p)
    figures["parent_cpu_us"] = (time.process_time() - cpu_before) / p["steps"] * 1e6
    return figures


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def outputs(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``count`` steps each returning ``mb`` MB of bytes: MB/s into the caller, its peak RSS."""
    count, size = p["count"], p["mb"] * 1_000_000
    before = _rss()
    if peer is None:
        seconds, raw = timed_procorch(work.BlobExecutor(size), _specs(count))
        sizes = [len(o.structured) for o in raw if o.success]
    else:
        seconds, outcomes = _timed_peer(peer, work.make_blob, [(size,)] * count)
        sizes = [len(value) for ok, value in outcomes if ok]
    peak = _peak_rss()
    return {
        "seconds": seconds,
        "mb_per_s": sum(sizes) / 1e6 / seconds,
        "peak_mb": peak / MIB,
        "peak_above_mb": max(0, peak - before) / MIB,
        "succeeded": sum(1 for n in sizes if n == size),
    }


def prompts(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """``count`` steps given a distinct ``mb`` MB prompt each: MB/s, the caller's peak RSS."""
    count, size = p["count"], p["mb"] * 1_000_000
    texts = [f"{i:08d}".ljust(size, "y") for i in range(count)]
    before = _rss()
    if peer is None:
        spec = _procorch().AgentStepSpec
        specs = [spec(str(i), "step", "", text) for i, text in enumerate(texts)]
        seconds, raw = timed_procorch(work.PromptExecutor(2), specs)
        lengths = [int(o.output) for o in raw if o.success]
    else:
        seconds, outcomes = _timed_peer(peer, work.prompt_length, [(text,) for text in texts])
        lengths = [int(value) for ok, value in outcomes if ok]
    peak = _peak_rss()
    return {
        "seconds": seconds,
        "mb_per_s": count * size / 1e6 / seconds,
        "peak_mb": peak / MIB,
        "peak_above_mb": max(0, peak - before) / MIB,
        "succeeded": sum(1 for n in lengths if n == size),
    }


HOT_PATH_WORKLOADS: dict[str, Callable[[str, Peer | None, dict[str, Any]], dict[str, Any]]] = {
    "eff10": efficiency,
    "eff1": efficiency,
    "dispatch_joblib": dispatch_cpu,
    "out10": outputs,
    "out100": outputs,
    "prompts": prompts,
}


WORKLOADS: dict[str, Callable[[str, Peer | None, dict[str, Any]], dict[str, Any]]] = {
    "dispatch": dispatch,
    "cpu": cpu,
    "crash": crash,
    "recovery": recovery,
    "events": events,
    "memory": memory,
    **HOT_PATH_WORKLOADS,
}


# -- cold start and lean workers ------------------------------------------------------
#
# These trials time what a short program pays: importing, a pool's first
# call, a whole process from start to exit, and what each worker costs in
# private memory. "import" and "coldstart" run fresh interpreters of their
# own (``runs`` each, interleaved with a bare interpreter), "hint32" times a
# pool's very first call in the trial's process, so none is warmed first.

_IMPORTS = {
    "procorch": "import procorch",
    "ProcessPoolExecutor": "from concurrent.futures import ProcessPoolExecutor",
    "pebble": "import pebble",
    "loky": "import loky",
    "joblib": "import joblib",
}
_PROCORCH_CORE = "from procorch import execute_steps_parallel"  # what a first call loads
_COLD_SCRIPT = str(Path(__file__).resolve().parent / "_cold_start.py")


def _top_level_imports(statement: str) -> dict[str, float]:
    """Module -> cumulative microseconds, for each top-level import ``-X importtime`` shows."""
    import subprocess
    import sys

    stderr = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if name.startswith(" ") and not name.startswith("  "):  # top level: one space
            found[name.strip()] = float(parts[1])
    return found


def _import_ms(statement: str) -> float:
    """Milliseconds ``statement`` spends importing, less what the interpreter imports anyway."""
    baseline = _top_level_imports("pass")
    found = _top_level_imports(statement)
    return sum(us for name, us in found.items() if name not in baseline) / 1e3


def import_time(pool: str, p: dict[str, Any]) -> dict[str, Any]:
    """``runs`` fresh interpreters import the pool; the median of ``-X importtime``'s figure."""
    import statistics

    ms = statistics.median(_import_ms(_IMPORTS[pool]) for _ in range(p["runs"]))
    result: dict[str, Any] = {"import_ms": ms}
    if pool == "procorch":
        core = statistics.median(_import_ms(_PROCORCH_CORE) for _ in range(p["runs"]))
        result["core_ms"] = core
    return result


def cold_start(pool: str, p: dict[str, Any]) -> dict[str, Any]:
    """Wall time of whole processes that import the pool, run 2 steps and exit (median of ``runs``).

    Each run is paired with a bare interpreter's (start-up and exit only), so
    the table can say what the interpreter itself costs on this machine now.
    """
    import statistics
    import subprocess
    import sys

    walls: dict[str, list[float]] = {pool: [], "python": []}
    for i in range(p["runs"]):
        for which in (pool, "python") if i % 2 == 0 else ("python", pool):
            start = time.perf_counter()
            subprocess.run([sys.executable, _COLD_SCRIPT, which], check=True)
            walls[which].append(time.perf_counter() - start)
    return {
        "wall_ms": statistics.median(walls[pool]) * 1e3,
        "python_ms": statistics.median(walls["python"]) * 1e3,
    }


def _uss_mib(pids: set[int]) -> list[float]:
    sizes = []
    for pid in pids:
        try:
            sizes.append(psutil.Process(pid).memory_full_info().uss / MIB)
        except psutil.Error:
            pass
    return sizes


def worker_uss(pool: str, peer: Peer | None, p: dict[str, Any]) -> dict[str, Any]:
    """Private memory (USS) of each worker after a warm call of ``steps`` short steps."""
    import statistics

    steps, seconds = p["steps"], p["step_seconds"]
    if peer is None:
        _, outcomes = timed_procorch(work.SleepPidExecutor(seconds), _specs(steps))
        pids = {int(o.output) for o in outcomes if o.success}
    else:
        _, results = _timed_peer(peer, work.sleep_pid, [(seconds,)] * steps)
        pids = {value for ok, value in results if ok}
    sizes = _uss_mib(pids)
    if not sizes:
        raise PoolBroken("no worker to measure")
    return {"uss_mib": statistics.median(sizes), "max_mib": max(sizes), "workers": len(sizes)}


def hint32(pool: str, p: dict[str, Any]) -> dict[str, Any]:
    """``steps`` sleeps on ``workers`` workers: the pool's first call (cold), then a second."""
    steps, workers, seconds = p["steps"], p["workers"], p["step_seconds"]
    ideal = -(-steps // workers) * seconds
    if pool == "procorch":
        executor = work.SleepPidExecutor(seconds, workers)
        cold, first = timed_procorch(executor, _specs(steps))
        warm, second = timed_procorch(executor, _specs(steps))
        lanes = len({o.output for o in first if o.success})
        ok = _succeeded(first) + _succeeded(second)
        _procorch().shutdown()
    else:
        peer = PEERS[pool]()
        start = time.perf_counter()
        peer.start(workers)
        results = peer.map_outcomes(work.sleep_pid, [(seconds,)] * steps)
        cold = time.perf_counter() - start
        warm, again = _timed_peer(peer, work.sleep_pid, [(seconds,)] * steps)
        lanes = len({value for ok_, value in results if ok_})
        ok = _succeeded(results) + _succeeded(again)
        peer.close()
    return {
        "cold_s": cold,
        "warm_s": warm,
        "ideal_s": ideal,
        "workers_used": lanes,
        "succeeded": ok,
        "steps": 2 * steps,
    }


COLD_WORKLOADS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "import": import_time,
    "coldstart": cold_start,
    "hint32": hint32,
}
WORKLOADS["uss"] = worker_uss


def _workers_for(workload: str) -> int:
    return 1 if workload == "recovery" else 2


def run_trial(workload: str, pool: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one trial in this process and return its result (figures or a status)."""
    if workload in COLD_WORKLOADS:  # times start-up itself: nothing is warmed first
        try:
            return {"status": "ok", **COLD_WORKLOADS[workload](pool, params)}
        except PoolBroken as exc:
            return {"status": "broken", "detail": str(exc)}
    workers = _workers_for(workload)
    peer = None if pool == "procorch" else PEERS[pool]()
    try:
        if peer is None:
            warm_procorch(workers)
        else:
            if workload == "events":
                params = {**params, "queue": peer.make_queue()}
                peer.start(workers, work.install_event_queue, (params["queue"],))
            else:
                peer.start(workers)
            warm_peer(peer)
        figures = WORKLOADS[workload](pool, peer, params)
        return {"status": "ok", **figures}
    except PoolBroken as exc:
        return {"status": "broken", "detail": str(exc)}
    finally:
        _close(peer)


def _close(peer: Peer | None) -> None:
    if peer is None:
        _procorch().shutdown()
    elif peer.pool is not None or isinstance(peer, JoblibPeer):
        peer.close()
