"""The run report: built from real runs' events, and opened in a real headless browser."""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from helpers import UsageExecutor, run_to_end, spec

import procorch
from procorch import Event, ReportSink, RetryPolicy, StepFinished, StepStarted, StepUsage
from procorch._report import KINDS, read_events

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

TESTS = Path(__file__).resolve().parent
# ordinary, raising, crashing, timed out, retried (fails once, then succeeds), costly
BATCH = ["ok", "raise", "segfault", "hang", "flaky", "burn", "ok", "ok"]


def _batch(tmp_path: Path) -> tuple[list[Event], ReportSink]:
    """Run the batch with a report sink; the events it heard, in order."""
    events: list[Event] = []
    sink = ReportSink(forward=events.append)
    state = tmp_path / "state"
    state.mkdir()
    specs = [spec(f"{agent}-{n}", agent) for n, agent in enumerate(BATCH)]
    procorch.execute_steps_parallel(
        UsageExecutor(str(state), hint=2),
        specs,
        events=sink,
        step_timeout=2.0,
        retry=RetryPolicy(attempts=2, on=("exception",)),
    )
    return events, sink


def _write_events(path: Path, events: list[Event]) -> None:
    path.write_bytes(b"".join(msgspec.json.encode(e) + b"\n" for e in events))


def _data(page: bytes) -> dict[str, object]:
    found = re.search(rb'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert found is not None
    data: dict[str, object] = msgspec.json.decode(found.group(1))
    return data


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Event]]]:
    """One run of BATCH: its live report, its events file, and its events."""
    tmp_path = tmp_path_factory.mktemp("report")
    events, sink = _batch(tmp_path)
    sink.write(tmp_path / "live.html")
    _write_events(tmp_path / "events.jsonl", events)
    yield tmp_path, events
    procorch.shutdown()


def test_report_from_the_events_file_equals_the_live_one(batch: tuple[Path, list[Event]]) -> None:
    """The same events give the same bytes: live through ReportSink, or read from a file."""
    tmp_path, events = batch
    procorch.write_report(tmp_path / "again.html", tmp_path / "events.jsonl")
    procorch.write_report(tmp_path / "objects.html", events)
    live = (tmp_path / "live.html").read_bytes()
    assert (tmp_path / "again.html").read_bytes() == live
    assert (tmp_path / "objects.html").read_bytes() == live


def test_report_has_a_bar_per_attempt_and_the_tables(batch: tuple[Path, list[Event]]) -> None:
    """One bar per attempt with its outcome kind; the tables name the failures and totals."""
    tmp_path, events = batch
    page = (tmp_path / "live.html").read_bytes()
    data = _data(page)
    columns = data["a"]
    assert isinstance(columns, dict)
    started = [e for e in events if isinstance(e, StepStarted)]
    # the raising and the flaky steps ran twice (retried on exception)
    assert len(columns["task"]) == len(started) == len(BATCH) + 2
    kinds = [KINDS_ORDER[k] for k in columns["kind"]]
    by_task = dict(zip(columns["task"], kinds, strict=False))
    assert by_task["segfault-2"] == "crash" and by_task["hang-3"] == "timeout"
    assert by_task["raise-1"] == "exception" and by_task["ok-0"] == "ok"
    for task_id, expected in (("flaky-4", ["exception", "ok"]), ("raise-1", ["exception"] * 2)):
        assert [k for t, k in zip(columns["task"], kinds, strict=True) if t == task_id] == expected
    second = columns["task"].index("flaky-4", columns["task"].index("flaky-4") + 1)
    assert columns["prev"][second] == columns["task"].index("flaky-4")  # linked to the first
    marked = {t for t, m in zip(columns["task"], columns["mark"], strict=True) if m}
    assert marked == {"segfault-2", "hang-3"}
    assert data["hint"] == 2 and len(data["rows"]) >= 2  # type: ignore[arg-type]
    text = page.decode()
    for words in ("Failures by kind", "Slowest step attempts", "Largest memory users", "Totals"):
        assert words in text
    assert "parallel efficiency: CPU / (wall x concurrency)" in text
    assert "burn-5" in text.split("Largest memory users")[1]  # the 100 MiB step leads it


KINDS_ORDER = list(KINDS)


def test_report_is_self_contained(batch: tuple[Path, list[Event]]) -> None:
    """Nothing in the page is fetched: no URL, no external script, style or font."""
    text = (batch[0] / "live.html").read_text()
    assert not re.search(r"https?://|src=|href=|@import|url\(", text)


def test_report_of_a_task_id_that_closes_the_script(tmp_path: Path) -> None:
    """A task_id holding '</script>' stays data: the page has exactly its two scripts."""
    usage = StepUsage(wall=0.5, cpu_user=0.1, cpu_system=0.0, max_rss=1)
    events: list[Event] = [
        StepStarted(0, "</script><script>alert(1)</script>", 1, "a<b>", 7, 10.0, 1),
        StepFinished(0, "</script><script>alert(1)</script>", 1, True, 0.5, usage=usage),
    ]
    procorch.write_report(tmp_path / "r.html", events)
    page = (tmp_path / "r.html").read_text()
    assert page.count("<script") == 2
    assert _data(page.encode())["a"]["task"] == ["</script><script>alert(1)</script>"]  # type: ignore[index]


def test_read_events_names_the_line_that_is_not_an_event(tmp_path: Path) -> None:
    """A bad line is a ValueError naming the file and line; a cut last line is ignored."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "nope"}\n')
    with pytest.raises(ValueError, match=r"events.jsonl:1: not an event"):
        read_events(path)
    good = msgspec.json.encode(StepStarted(0, "a", 1, "x", 1, 1.0, 1)).decode()
    path.write_text(f"{good}\n{good[:20]}")
    assert len(read_events(path)) == 1


def _procorch(cwd: Path, *args: str) -> tuple[int, str, str]:
    done = run_to_end(
        [sys.executable, "-m", "procorch", *args],
        timeout=120,
        cwd=cwd,
        capture_output=True,
        env={"PYTHONPATH": str(TESTS)},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.slow
def test_cli_report_equals_the_report_drawn_again_from_its_events(tmp_path: Path) -> None:
    """`procorch run --events --report` then `procorch report`: the same page, byte for byte."""
    lines = [msgspec.json.encode(spec(f"t{n}", a)).decode() for n, a in enumerate(BATCH)]
    (tmp_path / "specs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "state").mkdir()
    code, _, err = _procorch(
        tmp_path,
        "run",
        "helpers:UsageExecutor",
        "specs.jsonl",
        *("--step-timeout", "2", "--events", "ev.jsonl", "--report", "live.html"),
        *("-o", "out.jsonl"),
    )
    assert code == 1, err  # some steps fail
    code, _, err = _procorch(tmp_path, "report", "ev.jsonl", "-o", "again.html")
    assert code == 0, err
    live = (tmp_path / "live.html").read_bytes()
    assert live == (tmp_path / "again.html").read_bytes()
    assert len(_data(live)["a"]["task"]) == len(BATCH)  # type: ignore[index]


def test_cli_help_lists_report(tmp_path: Path) -> None:
    """`procorch run --help` lists --report; `procorch report` refuses a missing file."""
    code, out, _ = _procorch(tmp_path, "run", "--help")
    assert code == 0 and "--report FILE" in out
    code, _, err = _procorch(tmp_path, "report", "missing.jsonl", "-o", "r.html")
    assert code == 2 and "no events file 'missing.jsonl'" in err


# -- in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium, installed where absent; the tests needing it skip if it cannot be."""
    from browser import install_chromium

    pytest.importorskip("websocket", reason="websocket-client (the test extra) is not installed")
    problem = install_chromium()
    if problem is not None:
        pytest.skip(f"no headless browser: {problem}")


def _blank(browser: object, png: bytes) -> dict[str, float]:
    """Decode the screenshot in the page itself: its distinct colours and non-white share."""
    data = base64.b64encode(png).decode()
    script = (
        "new Promise(done => { const img = new Image(); img.onload = () => {"
        " const c = document.createElement('canvas'); c.width = img.width;"
        " c.height = img.height; const x = c.getContext('2d'); x.drawImage(img, 0, 0);"
        " const p = x.getImageData(0, 0, c.width, c.height).data; const seen = new Set();"
        " let ink = 0; for (let i = 0; i < p.length; i += 4) {"
        " seen.add((p[i] << 16) | (p[i + 1] << 8) | p[i + 2]);"
        " if (p[i] + p[i + 1] + p[i + 2] < 720) ink++; }"
        " done({colours: seen.size, ink: ink / (p.length / 4)}); };"
        f" img.src = 'data:image/png;base64,{data}'; }})"
    )
    result = browser.call(  # type: ignore[attr-defined]
        "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
    )
    value: dict[str, float] = result["result"]["value"]
    return value


@pytest.mark.slow
def test_report_opens_in_a_headless_browser(
    chromium: None, batch: tuple[Path, list[Event]]
) -> None:
    """No console error; a bar per attempt; the crash's bar in the crash colour; not blank."""
    from browser import Browser

    tmp_path, events = batch
    attempts = sum(isinstance(e, StepStarted) for e in events)
    browser = Browser()
    try:
        browser.open(tmp_path / "live.html")
        report = browser.evaluate(
            "({attempts: procorchReport.attempts, drawn: procorchReport.drawn,"
            " aggregated: procorchReport.aggregated, marks: procorchReport.marks,"
            " links: procorchReport.links})"
        )
        assert report["attempts"] == attempts
        assert report["drawn"] + report["aggregated"] == attempts
        assert report["marks"] == 2 and report["links"] == 2
        crashed = browser.evaluate(
            "[...Array(procorchReport.attempts).keys()]"
            ".find(i => procorchReport.task(i) === 'segfault-2')"
        )
        browser.evaluate(f"procorchReport.zoomTo({crashed})")
        assert browser.evaluate(f"procorchReport.pixelOf({crashed})") == KINDS["crash"]
        box = browser.evaluate(f"procorchReport.barBox({crashed})")
        x, y = box["x"] + box["w"] / 2, box["y"] + box["h"] * 0.75
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        tip = browser.evaluate("document.getElementById('tip').textContent")
        assert "segfault-2" in tip and "SIGSEGV" in tip and "CPU: unknown" in tip, tip
        shown = browser.evaluate("getComputedStyle(document.getElementById('tip')).display")
        assert shown == "block"
        browser.evaluate("procorchReport.reset()")
        png = browser.screenshot(tmp_path / "report.png")
        seen = _blank(browser, png)
        assert seen["colours"] >= 10 and seen["ink"] > 0.02, seen
        assert browser.errors == []
    finally:
        browser.close()


@pytest.mark.slow
def test_report_of_100000_steps_opens_in_seconds(chromium: None, tmp_path: Path) -> None:
    """100,000 attempts on 8 lanes: the page loads and draws well inside a generous bound."""
    from browser import Browser

    events: list[Event] = []
    lanes, per_lane = 8, 12_500
    for lane in range(lanes):
        at = 100.0
        for n in range(per_lane):
            index = lane * per_lane + n
            wall = 0.001 + (n % 7) * 0.0005
            usage = StepUsage(wall=wall, cpu_user=wall / 2, cpu_system=0.0, max_rss=2**25)
            failed = n % 997 == 0
            events.append(StepStarted(index, f"t{index}", 1, "agent", 1000 + lane, at, lanes))
            events.append(
                StepFinished(
                    index,
                    f"t{index}",
                    1,
                    not failed,
                    wall,
                    "crash" if failed else None,
                    "boom" if failed else None,
                    usage,
                )
            )
            at += wall + 0.0001
    procorch.write_report(tmp_path / "big.html", events)
    browser = Browser()
    try:
        seconds = browser.open(tmp_path / "big.html")
        counts = browser.evaluate(
            "({attempts: procorchReport.attempts, drawn: procorchReport.drawn,"
            " aggregated: procorchReport.aggregated})"
        )
        assert counts["attempts"] == 100_000
        assert counts["drawn"] + counts["aggregated"] == 100_000
        assert counts["aggregated"] > 0  # bars thinner than a pixel were counted into pixels
        assert seconds < 30, f"the page took {seconds:.1f} s to load"  # a hang guard
        assert browser.errors == []
        print(f"100,000 attempts: loaded and drawn in {seconds:.2f} s")
    finally:
        browser.close()
