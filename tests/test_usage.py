"""StepUsage: what each step attempt cost, measured in the worker (real worker processes)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from helpers import GuardExecutor, UsageExecutor, spec

import procorch
from procorch import (
    Event,
    RetryPolicy,
    StepFinished,
    StepRerun,
    StepStarted,
    StepUsage,
)
from procorch._usage import UsageMeter

MiB = 2**20
MEASURED = {
    "cpu_user",
    "cpu_system",
    "max_rss",
    "children_cpu_user",
    "children_cpu_system",
    "children_max_rss",
}

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


def _run(executor: object, agents: list[str], **guards: object) -> list[Event]:
    events: list[Event] = []
    specs = [spec(f"s{n}-{agent}", agent) for n, agent in enumerate(agents)]
    procorch.execute_steps_parallel(executor, specs, events=events.append, **guards)  # type: ignore[arg-type]
    return events


def _usage(events: list[Event], task_id: str) -> StepUsage:
    (finished,) = [e for e in events if isinstance(e, StepFinished) and e.task_id == task_id]
    assert finished.usage is not None
    return finished.usage


def test_usage_of_a_step_burning_cpu_and_holding_memory() -> None:
    """0.3 s of CPU and 100 MiB held: the step's usage says so; the next step's peak is its own."""
    events = _run(UsageExecutor(hint=1), ["ok", "burn", "ok"])
    burn, after, before = (_usage(events, t) for t in ("s1-burn", "s2-ok", "s0-ok"))
    assert burn.missing == ()
    assert burn.cpu_user is not None and burn.cpu_system is not None
    assert 0.25 <= burn.cpu_user + burn.cpu_system <= 3.0, burn
    assert burn.wall >= 0.25, burn
    assert burn.max_rss_from == "step_peak"
    assert burn.max_rss is not None and before.max_rss is not None and after.max_rss is not None
    # The peak is the worker's resident memory: its baseline plus the 100 MiB.
    assert burn.max_rss >= before.max_rss + 90 * MiB, (burn, before)
    assert burn.max_rss <= before.max_rss + 300 * MiB, (burn, before)
    # The mark was reset between steps: the next step does not inherit the 100 MiB.
    assert after.max_rss < burn.max_rss - 80 * MiB, (after, burn)
    assert after.cpu is not None and after.cpu < 0.25, after
    assert burn.children_cpu_user == 0.0 and burn.children_max_rss == 0


def test_usage_counts_a_steps_subprocesses_as_its_children() -> None:
    """A subprocess's 0.3 s of CPU and 60 MiB are the step's children's, not the step's own."""
    events = _run(UsageExecutor(hint=1), ["child_burn"])
    usage = _usage(events, "s0-child_burn")
    assert usage.children_cpu_user is not None and usage.children_cpu_system is not None
    assert 0.25 <= usage.children_cpu_user + usage.children_cpu_system <= 3.0, usage
    assert usage.cpu_user is not None and usage.cpu_user < 0.25, usage
    assert usage.children_max_rss is not None and usage.children_max_rss >= 60 * MiB, usage
    assert usage.cpu is not None and usage.cpu >= 0.25


def test_usage_peak_is_the_steps_own_after_a_thread_left_its_mark() -> None:
    """An exited thread's 150 MiB mark (which no reset lowers) does not stick to later steps."""
    events = _run(UsageExecutor(hint=1), ["thread_hog", "ok", "ok"])
    hog, after = _usage(events, "s0-thread_hog"), _usage(events, "s2-ok")
    assert hog.max_rss is not None and after.max_rss is not None
    assert hog.max_rss >= 140 * MiB, hog
    assert after.max_rss_from == "step_peak"
    assert after.max_rss < hog.max_rss - 100 * MiB, (after, hog)


def test_usage_of_a_crashed_step_is_its_wall_time_and_names_the_rest_missing() -> None:
    """A segfault: the parent knows the wall time; every measured field is missing, and None."""
    events = _run(UsageExecutor(), ["segfault", "ok"])
    usage = _usage(events, "s0-segfault")
    assert set(usage.missing) == MEASURED
    assert all(getattr(usage, name) is None for name in MEASURED)
    assert 0 < usage.wall < 60
    assert _usage(events, "s1-ok").missing == ()


@pytest.mark.slow
def test_usage_of_a_timed_out_step_runs_to_the_verdict() -> None:
    """A step killed at its 1 s limit: its wall time is at least the limit."""
    events = _run(UsageExecutor(), ["hang"], step_timeout=1.0)
    usage = _usage(events, "s0-hang")
    assert 1.0 <= usage.wall < 60, usage
    assert set(usage.missing) == MEASURED


def test_usage_of_a_memory_killed_step_is_the_guards_reading(tmp_path: Path) -> None:
    """The memory cap's kill: max_rss is what the guard read, and it says so."""
    events = _run(GuardExecutor(str(tmp_path)), ["hog"], memory_limit=300 * MiB)
    (finished,) = [e for e in events if isinstance(e, StepFinished)]
    assert finished.error_kind == "memory"
    usage = finished.usage
    assert usage is not None and usage.max_rss is not None
    assert usage.max_rss > 300 * MiB and usage.max_rss_from == "guard_reading"
    assert set(usage.missing) == MEASURED - {"max_rss"}


def test_events_say_when_a_step_started_and_what_each_attempt_cost(tmp_path: Path) -> None:
    """StepStarted has its start instant and the concurrency; a retry's StepRerun its usage."""
    executor = UsageExecutor(str(tmp_path), hint=2)
    events = _run(executor, ["flaky", "ok"], retry=RetryPolicy(attempts=2))
    started = [e for e in events if isinstance(e, StepStarted)]
    assert len(started) == 3
    assert all(e.concurrency == 2 and e.at is not None and e.at > 0 for e in started)
    (rerun,) = [e for e in events if isinstance(e, StepRerun)]
    assert rerun.error_kind == "exception" and rerun.attempt == 2
    assert rerun.usage is not None and rerun.usage.missing == ()
    finished = {e.task_id: e for e in events if isinstance(e, StepFinished)}
    assert finished["s0-flaky"].success and finished["s0-flaky"].error_kind is None
    first, second = [e for e in started if e.task_id == "s0-flaky"]
    assert first.at is not None and second.at is not None
    assert second.at >= first.at + rerun.usage.wall - 1e-3


def test_usage_travels_in_the_events_json() -> None:
    """An event's usage survives a JSON round trip, field for field."""
    events = _run(UsageExecutor(hint=1), ["ok", "segfault"])
    for event in events:
        again = msgspec.json.decode(msgspec.json.encode(event), type=Event)
        assert again == event
    finished = [e for e in events if isinstance(e, StepFinished)]
    assert {e.error_kind for e in finished} == {None, "crash"}
    crashed = next(e for e in finished if e.error_kind == "crash")
    assert crashed.reason is not None and "SIGSEGV" in crashed.reason


def test_meter_reads_the_processs_own_peak_when_a_stale_mark_is_in_the_way() -> None:
    """A kernel mark above the RSS at the reset (a stale one) sends the meter to VmHWM."""
    meter = UsageMeter()
    meter.begin()
    meter._rss0 = -(2**40)  # as if the mark read at the reset were far above the RSS
    block = b"x" * (64 * MiB)
    usage = meter.end(0.0)
    del block
    status = Path("/proc/self/status").read_text()
    hwm = int(status.split("VmHWM:")[1].split("kB")[0]) * 1024
    assert usage.max_rss_from == "step_peak"
    assert usage.max_rss is not None and abs(usage.max_rss - hwm) <= 4 * MiB
