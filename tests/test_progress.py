"""progress(): a bar on standard error from a call's events, with tqdm's conventions."""

from __future__ import annotations

import io
import re

import pytest
from helpers import square

import procorch

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


class _Terminal(io.StringIO):
    """A text file that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_writes_plain_lines_when_not_a_terminal() -> None:
    """Off a terminal every drawn state is its own line; the last says 6/6 with a rate."""
    out = io.StringIO()
    results = procorch.map(square, range(6), events=procorch.progress(6, file=out, min_interval=0))
    assert all(r.success for r in results)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert re.fullmatch(r"procorch: 100% 6/6 \[\d\d:\d\d<00:00, [\d.]+ steps/s\]", lines[-1])


def test_progress_redraws_one_line_on_a_terminal_and_counts_failures() -> None:
    """On a terminal the line is redrawn in place, and failed steps are counted."""
    out = _Terminal()
    bar = procorch.progress(file=out, min_interval=0)
    procorch.map(lambda x: 1 // x, [0, 1, 2], events=bar)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and "\r" in text
    assert "procorch: 3 [" in text and "1 failed" in text


def test_progress_throttles_its_lines() -> None:
    """With a long min_interval, only the first state and the final line are written."""
    out = io.StringIO()
    procorch.map(square, range(8), events=procorch.progress(8, file=out, min_interval=3600))
    assert len(out.getvalue().splitlines()) == 2
