"""The command line, driven as a subprocess: ``python -m procorch run ...`` and friends."""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
import psutil
import pytest
from helpers import gone

import procorch
from procorch import AgentStepSpec, Event, StepFinished, StepOutcome, StepStarted
from procorch._cli import _parse_size

pytestmark = pytest.mark.usefixtures("no_leaked_processes", "bounded_time")

TESTS = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    """The environment for a command: the tests directory importable, by its workers too."""
    paths = [str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "procorch", *args]


def _procorch(
    cwd: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m procorch ARGS`` in ``cwd`` to the end."""
    return subprocess.run(
        _command(*args),
        cwd=cwd,
        env=_env(**env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _spec_lines(steps: Iterable[tuple[str, str]]) -> str:
    """JSON Lines of specs, one per (task_id, agent)."""
    specs = [AgentStepSpec(task_id, agent, "d", f"prompt-{task_id}") for task_id, agent in steps]
    return "".join(msgspec.json.encode(spec).decode() + "\n" for spec in specs)


def _write_specs(path: Path, steps: Iterable[tuple[str, str]]) -> Path:
    path.write_text(_spec_lines(steps))
    return path


def _outcomes(text: str) -> list[StepOutcome]:
    return [msgspec.json.decode(line, type=StepOutcome) for line in text.splitlines()]


def _events(path: Path) -> list[Event]:
    return [msgspec.json.decode(line, type=Event) for line in path.read_text().splitlines()]


# -- good runs -------------------------------------------------------------------


def test_run_writes_outcomes_in_input_order(tmp_path: Path) -> None:
    """Every step succeeds: one outcome per spec, in the specs' order, and exit status 0."""
    task_ids = [f"t{n}" for n in range(8)]
    _write_specs(tmp_path / "specs.jsonl", [(task_id, "ok") for task_id in task_ids])
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl")
    assert result.returncode == 0, result.stderr
    outcomes = _outcomes(result.stdout)
    assert [outcome.task_id for outcome in outcomes] == task_ids
    assert all(outcome.success for outcome in outcomes)
    assert "procorch: 8 steps in" in result.stderr
    assert "8 succeeded, 0 failed" in result.stderr


def test_run_outcomes_and_events_decode_to_structs(tmp_path: Path) -> None:
    """The outcomes file and the events file decode line by line into procorch's Structs."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "raise"), ("c", "ok")])
    result = _procorch(
        tmp_path,
        "run",
        "helpers:FaultyExecutor",
        "specs.jsonl",
        "-o",
        "outcomes.jsonl",
        "--events",
        "events.jsonl",
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    outcomes = _outcomes((tmp_path / "outcomes.jsonl").read_text())
    assert [(o.task_id, o.success) for o in outcomes] == [("a", True), ("b", False), ("c", True)]
    assert outcomes[1].error is not None and outcomes[1].error.kind == "exception"
    events = _events(tmp_path / "events.jsonl")
    for task_id in "abc":
        mine = [event for event in events if event.task_id == task_id]
        assert isinstance(mine[0], StepStarted)
        assert isinstance(mine[-1], StepFinished)


def test_run_reads_specs_from_standard_input(tmp_path: Path) -> None:
    """SPECS given as - is read from standard input."""
    stdin = _spec_lines([("x", "ok"), ("y", "ok")])
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert [o.task_id for o in _outcomes(result.stdout)] == ["x", "y"]


@pytest.mark.parametrize("executor", ["cli_executors:make_executor", "cli_executors:INSTANCE"])
def test_run_takes_a_factory_or_an_instance(tmp_path: Path, executor: str) -> None:
    """EXECUTOR may name a function returning an executor, or an executor itself."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    result = _procorch(tmp_path, "run", executor, "specs.jsonl")
    assert result.returncode == 0, result.stderr
    assert [o.success for o in _outcomes(result.stdout)] == [True, True]


def test_run_crash_exits_1_and_the_summary_names_it(tmp_path: Path) -> None:
    """A segfaulting step fails alone; exit status 1; the summary names the step and cause."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("native", "segfault"), ("c", "ok")])
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl")
    assert result.returncode == 1
    assert [o.success for o in _outcomes(result.stdout)] == [True, False, True]
    assert "2 succeeded, 1 failed" in result.stderr
    assert "failures by kind: crash 1" in result.stderr
    assert re.search(r"native +crash +step 'native' \(agent 'segfault'\) crashed", result.stderr)
    assert "SIGSEGV" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_guards_come_from_the_options(tmp_path: Path) -> None:
    """Time limit, memory cap, retries and output capture all reach the engine."""
    state = tmp_path / "state"
    state.mkdir()
    steps = [
        ("fine", "ok"),
        ("hog", "hog"),
        ("stuck", "c_hang"),
        ("noisy", "print_then_raise"),
        ("crashy", "always_crash"),
    ]
    _write_specs(tmp_path / "specs.jsonl", steps)
    result = _procorch(
        tmp_path,
        *("run", "cli_executors:make_guard_executor", "specs.jsonl"),
        *("--step-timeout", "1", "--memory-limit", "256M"),
        *("--attempts", "2", "--retry-on", "crash", "--capture-output"),
        PROCORCH_TEST_STATE_DIR=str(state),
    )
    assert result.returncode == 1, result.stderr
    fine, hog, stuck, noisy, crashy = _outcomes(result.stdout)
    assert fine.success
    assert hog.error is not None and hog.error.kind == "memory"
    assert hog.error.limit == 256 * 2**20
    assert stuck.error is not None and stuck.error.kind == "timeout"
    assert stuck.error.attempts == 1  # a timeout is not among the kinds retried
    assert noisy.error is not None and noisy.error.kind == "exception"
    assert "python says hello" in (noisy.error.printed or "")
    assert crashy.error is not None and crashy.error.kind == "crash"
    assert crashy.error.attempts == 2


def test_run_concurrency_option_overrides_the_hint(tmp_path: Path) -> None:
    """-j 1 runs every step on one worker although the executor's hint is 2."""
    _write_specs(tmp_path / "specs.jsonl", [(f"t{n}", "ok") for n in range(6)])
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "-j", "1", "--events", "ev.jsonl"
    )
    assert result.returncode == 0, result.stderr
    assert "6 steps, 1 at a time" in result.stderr
    pids = {event.pid for event in _events(tmp_path / "ev.jsonl") if isinstance(event, StepStarted)}
    assert len(pids) == 1


def test_run_keeps_what_steps_print_out_of_standard_output(tmp_path: Path) -> None:
    """With outcomes on standard output, what steps print goes to standard error."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    result = _procorch(tmp_path, "run", "cli_executors:Printer", "specs.jsonl")
    assert result.returncode == 0, result.stderr
    assert [o.task_id for o in _outcomes(result.stdout)] == ["a", "b"]
    assert "print() from a" in result.stderr
    assert "fd 1 from b" in result.stderr


_LOCAL_EXECUTOR = """
from procorch import AgentExecutor, StepOutcome


class Local(AgentExecutor):
    def execute_step(self, spec, events):
        return StepOutcome(spec.task_id, "s", spec.agent, "local", True)
"""


def _script() -> str | None:
    """The installed ``procorch`` script next to this interpreter, if there is one."""
    return shutil.which("procorch", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("how", ["python -m procorch", "procorch script"])
def test_run_imports_executors_from_the_current_directory(tmp_path: Path, how: str) -> None:
    """An executor module next to the specs imports, in the command and in its workers."""
    script = _script()
    if how == "procorch script" and script is None:
        pytest.skip("the procorch script is not installed next to this interpreter")
    (tmp_path / "local_steps.py").write_text(_LOCAL_EXECUTOR)
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    command = [script] if how == "procorch script" and script else _command()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [*command, "run", "local_steps:Local", "specs.jsonl"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [o.output for o in _outcomes(result.stdout)] == ["local", "local"]


# -- bad input -------------------------------------------------------------------

GOOD = _spec_lines([("a", "ok"), ("b", "ok")])
BAD_INPUT = {
    "missing file": (
        None,
        ["helpers:FaultyExecutor", "missing.jsonl"],
        "procorch: cannot read specs file 'missing.jsonl': No such file or directory",
    ),
    "directory": (
        None,
        ["helpers:FaultyExecutor", "."],
        "procorch: cannot read specs file '.': Is a directory",
    ),
    "not json": (
        GOOD + "{not json\n",
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:3: JSON is malformed",
    ),
    "wrong type": (
        GOOD + '{"task_id": 3, "agent": "ok", "description": "d", "prompt": "p"}\n',
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:3: Expected `str`, got `int` - at `$.task_id`",
    ),
    "missing field": (
        '{"task_id": "a", "agent": "ok", "description": "d"}\n',
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:1: Object missing required field `prompt`",
    ),
    "duplicate task_id": (
        GOOD + "\n" + _spec_lines([("a", "ok")]),
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:4: task_id 'a' is already used on line 1",
    ),
    "bad output_schema": (
        GOOD.replace('"prompt-b"', '"prompt-b","output_schema":{"type":5}'),
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:2: output_schema",
    ),
    "no such module": (
        GOOD,
        ["nowhere.at_all:Executor", "specs.jsonl"],
        "procorch: executor 'nowhere.at_all:Executor': cannot import 'nowhere.at_all': "
        "ModuleNotFoundError: No module named 'nowhere'",
    ),
    "no such attribute": (
        GOOD,
        ["cli_executors:Missing", "specs.jsonl"],
        "procorch: executor 'cli_executors:Missing': 'cli_executors' has no attribute 'Missing'",
    ),
    "not an import path": (
        GOOD,
        ["cli_executors", "specs.jsonl"],
        "procorch: executor must be an import path like package.module:attribute",
    ),
    "no execute_step": (
        GOOD,
        ["cli_executors:NotAnExecutor", "specs.jsonl"],
        "has no execute_step(spec, events) method (got NotAnExecutor)",
    ),
    "constructor raises": (
        GOOD,
        ["cli_executors:BrokenInit", "specs.jsonl"],
        "BrokenInit() raised RuntimeError: no configuration found (at ",
    ),
    "unwritable output": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "-o", "no/such/dir/out.jsonl"],
        "procorch: cannot write outcomes to 'no/such/dir/out.jsonl': No such file or directory",
    ),
    "bad size": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "--memory-limit", "12Q"],
        "argument --memory-limit: must be a size like 512M, 2G or a number of bytes (got '12Q')",
    ),
    "bad retry kind": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "--attempts", "2", "--retry-on", "crash,oops"],
        "argument --retry-on: must name kinds among exception, crash, timeout, memory",
    ),
    "retry without attempts": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "--retry-on", "crash"],
        "procorch run: error: --retry-on and --retry-backoff need --attempts 2 or more",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_run_bad_input_exits_2_before_any_step(tmp_path: Path, case: str) -> None:
    """Bad input: exit status 2, one message naming the fault, no traceback, no step run."""
    specs_text, args, message = BAD_INPUT[case]
    if specs_text is not None:
        (tmp_path / "specs.jsonl").write_text(specs_text)
    result = _procorch(tmp_path, "run", *args, "--events", "events.jsonl")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    events = tmp_path / "events.jsonl"
    assert not events.exists() or events.read_text() == ""


def test_run_skip_bad_lines_warns_and_runs_the_rest(tmp_path: Path) -> None:
    """With --skip-bad-lines, each bad line is named in a warning and the others run."""
    text = GOOD + "[1, 2]\n" + _spec_lines([("a", "ok"), ("c", "ok")])
    (tmp_path / "specs.jsonl").write_text(text)
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert [o.task_id for o in _outcomes(result.stdout)] == ["a", "b", "c"]
    assert "procorch: skipping specs.jsonl:3: Expected `object`, got `array`" in result.stderr
    assert "procorch: skipping specs.jsonl:4: task_id 'a' is already used on line 1" in (
        result.stderr
    )
    assert "skipped 2 bad lines" in result.stderr


# -- display ---------------------------------------------------------------------

PROGRESS_LINE = re.compile(
    r"procorch: \[[\d.]+ m?s\] \d+/4 done: \d+ ok, \d+ failed, \d+ crashed; \d+ running"
)


def test_run_progress_is_plain_lines_off_a_terminal(tmp_path: Path) -> None:
    """Standard error not a terminal: periodic plain lines, no carriage return or escape."""
    _write_specs(
        tmp_path / "specs.jsonl", [("a", "ok"), ("slow", "hang"), ("c", "ok"), ("d", "ok")]
    )
    result = _procorch(
        tmp_path,
        *("run", "helpers:FaultyExecutor", "specs.jsonl"),
        *("--step-timeout", "0.8", "--progress-interval", "0.1"),
    )
    assert result.returncode == 1
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "procorch: running 4 steps, 2 at a time"
    assert any(PROGRESS_LINE.match(line) for line in lines), lines
    assert "failures by kind: timeout 1" in result.stderr


def _read_until_exit(fd: int, process: subprocess.Popen[bytes], within: float = 60) -> bytes:
    """Everything written to the pseudo-terminal ``fd`` until ``process`` exits."""
    chunks = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    return b"".join(chunks)


def test_run_progress_is_redrawn_on_a_terminal(tmp_path: Path) -> None:
    """Standard error a terminal: the progress line is redrawn in place, then erased."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("slow", "hang"), ("c", "ok")])
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        _command("run", "helpers:FaultyExecutor", "specs.jsonl", "--step-timeout", "0.5"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        shown = _read_until_exit(controller, process).decode()
    finally:
        os.close(controller)
    assert process.returncode == 1
    assert "\r\x1b[2K[" in shown
    assert re.search(r"\] \d/3  ok \d  failed \d  crashed \d  running \d", shown)
    assert "procorch: 3 steps in" in shown


def test_run_quiet_prints_nothing_when_all_goes_well(tmp_path: Path) -> None:
    """--quiet: no progress and no summary, only the outcomes."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--quiet")
    assert result.returncode == 0
    assert result.stderr == ""
    assert len(_outcomes(result.stdout)) == 2


# -- interruption --------------------------------------------------------------------


def _wait_for_a_start(events: Path, process: subprocess.Popen[str], within: float = 30) -> None:
    """Poll the events file until a step has started."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if events.exists() and '"event":"started"' in events.read_text():
            return
        assert process.poll() is None, "the command ended before any step started"
        time.sleep(0.02)
    raise AssertionError("no step started in time")


def test_run_ctrl_c_exits_130_and_stops_every_worker(tmp_path: Path) -> None:
    """SIGINT once a step runs: exit status 130, one line, no traceback, no process left."""
    _write_specs(tmp_path / "specs.jsonl", [("h1", "hang"), ("h2", "hang"), ("c", "ok")])
    process = subprocess.Popen(
        _command("run", "helpers:FaultyExecutor", "specs.jsonl", "--events", "events.jsonl"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_a_start(tmp_path / "events.jsonl", process)
        descendants = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    interrupted = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1
    assert interrupted[0].startswith("procorch: interrupted: ")
    assert stdout == ""
    assert descendants and gone(descendants)


# -- resumable runs -----------------------------------------------------------------


def _journaled(journal: Path) -> int:
    """How many steps the journal holds (0 while it or its tables do not exist)."""
    if not journal.exists():
        return 0
    with sqlite3.connect(journal) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM procorch_steps").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def test_run_resumes_after_sigkill_of_the_command(tmp_path: Path) -> None:
    """Killed with SIGKILL mid-run, the same command again runs only the steps left."""
    _write_specs(tmp_path / "specs.jsonl", [(f"t{i}", "ok") for i in range(6)])
    log = tmp_path / "runs.log"
    (tmp_path / "journaled_executor.py").write_text(
        "from helpers import JournaledExecutor\n"
        f"def make():\n    return JournaledExecutor({str(log)!r}, sleep=0.4, hint=1)\n"
    )
    args = (
        "run", "journaled_executor:make", "specs.jsonl", "-o", "outcomes.jsonl",
        "--workflow-id", "nightly", "--journal", "journal.db",
    )  # fmt: skip
    process = subprocess.Popen(
        _command(*args), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while _journaled(tmp_path / "journal.db") < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    with sqlite3.connect(tmp_path / "journal.db") as connection:
        done = {row[0] for row in connection.execute("SELECT task_id FROM procorch_steps")}
    result = _procorch(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    outcomes = _outcomes((tmp_path / "outcomes.jsonl").read_text())
    assert [o.task_id for o in outcomes] == [f"t{i}" for i in range(6)]
    assert all(o.success for o in outcomes)
    starts = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    assert all(starts.count(task_id) == 1 for task_id in done)
    assert _journaled(tmp_path / "journal.db") == 0  # removed after full success


def test_run_workflow_id_needs_a_journal(tmp_path: Path) -> None:
    """--workflow-id without --journal is bad usage."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok")])
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--workflow-id", "w"
    )
    assert result.returncode == 2
    assert "--workflow-id and --journal go together" in result.stderr


# -- help and the other commands ------------------------------------------------------

RUN_OPTIONS = [
    "--output",
    "--events",
    "--skip-bad-lines",
    "--concurrency",
    "--step-timeout",
    "--call-timeout",
    "--memory-limit",
    "--attempts",
    "--retry-on",
    "--retry-backoff",
    "--capture-output",
    "--workflow-id",
    "--journal",
    "--quiet",
    "--progress-interval",
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["run", "demo", "exit status", "--version"]),
        (["run"], ["EXECUTOR", "SPECS", "package.module:attribute", "exit status", *RUN_OPTIONS]),
        (["demo"], ["segfault", "time limit"]),
    ],
    ids=["procorch", "run", "demo"],
)
def test_help_describes_each_command(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    """--help, for the program and each command, exits 0 and names what it takes."""
    result = _procorch(tmp_path, *args, "--help")
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_console_script_is_the_same_command(tmp_path: Path) -> None:
    """The installed ``procorch`` script prints the same help as python -m procorch."""
    script = _script()
    if script is None:
        pytest.skip("the procorch script is not installed next to this interpreter")
    installed = subprocess.run(
        [script, "run", "--help"], capture_output=True, text=True, timeout=60
    )
    assert installed.returncode == 0
    assert installed.stdout == _procorch(tmp_path, "run", "--help").stdout


def test_no_command_is_bad_usage(tmp_path: Path) -> None:
    """procorch with no command: exit status 2 and the usage."""
    result = _procorch(tmp_path)
    assert result.returncode == 2
    assert "usage: procorch" in result.stderr


@pytest.mark.parametrize("module", [["-m", "procorch", "demo"], ["-m", "procorch.demo"]])
def test_demo_shows_success_failure_crash_and_timeout(
    tmp_path: Path, module: Sequence[str]
) -> None:
    """The demo, both ways it is run, shows each kind of end side by side."""
    result = subprocess.run(
        [sys.executable, *module], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for line in ["ok   summary", "FAIL strict   exception", "FAIL stuck    timeout"]:
        assert line in result.stdout
    assert "FAIL native   crash" in result.stdout


# -- option values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 2**20),
        ("512M", 512 * 2**20),
        ("512m", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 3 * 2**29),
        ("64k", 64 * 2**10),
    ],
)
def test_parse_size_reads_units_of_1024(text: str, size: int) -> None:
    """--memory-limit sizes: bytes, or K, M, G, T (with an optional B or iB) as powers of 1024."""
    assert _parse_size(text) == size


def test_version_matches_the_package(tmp_path: Path) -> None:
    """--version prints the package's version."""
    result = _procorch(tmp_path, "--version")
    assert result.stdout.strip() == f"procorch {procorch.__version__}"


@pytest.mark.parametrize("text", ["12Q", "0", "0.5", "-5M", "1i", "k", "inf", "1e3"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    """A size that is not a positive whole number of bytes or more, with a known unit, fails."""
    with pytest.raises(argparse.ArgumentTypeError, match="must be a size like 512M, 2G"):
        _parse_size(text)
