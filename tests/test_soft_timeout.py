"""The soft time limit: StepTimeout first, the worker killed only after the grace."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SoftTimeoutExecutor, spec

from procorch import execute_steps_parallel

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")


@pytest.mark.slow
def test_finally_block_runs_before_the_step_ends(tmp_path: Path) -> None:
    """At its limit the step gets StepTimeout; its finally block writes a marker; kind timeout."""
    out = execute_steps_parallel(
        SoftTimeoutExecutor(str(tmp_path)),
        [spec("c", "cleanup"), spec("q", "quick")],
        step_timeout=1,
        timeout_grace=20,
    )
    assert out[1].success
    assert out[0].error is not None and out[0].error.kind == "timeout"
    assert "StepTimeout was raised in it" in out[0].output
    assert "within its grace" in out[0].output
    assert (tmp_path / "c.cleaned").read_text() == "cleaned up"


@pytest.mark.slow
def test_step_that_ignores_it_is_killed_after_the_grace(tmp_path: Path) -> None:
    """A step still running when the grace runs out has its worker killed; kind timeout."""
    out = execute_steps_parallel(
        SoftTimeoutExecutor(str(tmp_path)), [spec("s", "stubborn")], step_timeout=1, timeout_grace=1
    )
    error = out[0].error
    assert error is not None and error.kind == "timeout"
    assert "still running 1 s later" in out[0].output
    assert "was killed" in out[0].output


@pytest.mark.slow
def test_step_that_swallows_it_still_times_out(tmp_path: Path) -> None:
    """Returning success after StepTimeout does not make the step a success."""
    out = execute_steps_parallel(
        SoftTimeoutExecutor(str(tmp_path)), [spec("w", "swallow")], step_timeout=1, timeout_grace=20
    )
    assert out[0].error is not None and out[0].error.kind == "timeout"
    assert "returned anyway" in out[0].output


@pytest.mark.slow
def test_without_grace_the_limit_kills_at_once(tmp_path: Path) -> None:
    """With no timeout_grace the finally block never runs: the worker is killed at the limit."""
    out = execute_steps_parallel(
        SoftTimeoutExecutor(str(tmp_path)), [spec("c", "cleanup")], step_timeout=1
    )
    assert out[0].error is not None and out[0].error.kind == "timeout"
    assert not (tmp_path / "c.cleaned").exists()


def test_timeout_grace_must_be_positive(tmp_path: Path) -> None:
    """A grace out of range is refused before any step starts."""
    with pytest.raises(ValueError, match=r"timeout_grace must be a number > 0 \(got 0\)"):
        execute_steps_parallel(
            SoftTimeoutExecutor(str(tmp_path)), [spec("q", "quick")], timeout_grace=0
        )
