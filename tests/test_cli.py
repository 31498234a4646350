"""The command line, driven as a subprocess: ``python -m procorch run ...`` and friends."""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import msgspec
import psutil
import pytest
from helpers import gone, kill_tree, run_to_end

import procorch
from procorch import AgentStepSpec, Event, StepFinished, StepOutcome, StepStarted
from procorch._cli import _parse_size
from procorch._cli_input import line_problem

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
    return run_to_end(
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


@pytest.mark.slow
def test_run_guards_come_from_the_options(tmp_path: Path) -> None:
    """Time limit, memory cap, retries and output capture all reach the engine."""
    state = tmp_path / "state"
    state.mkdir()
    retries = ("--attempts", "2", "--retry-on", "crash")
    # Two runs, so that each guard has steps of its own: a hog slowed down by a busy
    # machine would otherwise meet the time limit before the memory cap.
    steps = [
        ("fine", "ok"),
        ("hog", "hog"),
        ("noisy", "print_then_raise"),
        ("crashy", "always_crash"),
    ]
    _write_specs(tmp_path / "specs.jsonl", steps)
    result = _procorch(
        tmp_path,
        *("run", "cli_executors:make_guard_executor", "specs.jsonl"),
        *("--memory-limit", "256M", *retries, "--capture-output"),
        PROCORCH_TEST_STATE_DIR=str(state),
    )
    assert result.returncode == 1, result.stderr
    fine, hog, noisy, crashy = _outcomes(result.stdout)
    _write_specs(tmp_path / "stuck.jsonl", [("stuck", "c_hang")])
    result = _procorch(
        tmp_path,
        *("run", "cli_executors:make_guard_executor", "stuck.jsonl"),
        *("--step-timeout", "1", *retries),
        PROCORCH_TEST_STATE_DIR=str(state),
    )
    assert result.returncode == 1, result.stderr
    [stuck] = _outcomes(result.stdout)
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


@pytest.mark.parametrize("module", ["local_steps", "pytest"])
@pytest.mark.parametrize("how", ["python -m procorch", "procorch script"])
def test_run_imports_executors_from_the_current_directory(
    tmp_path: Path, how: str, module: str
) -> None:
    """A module next to the specs imports first, in the command and its workers, both ways.

    ``pytest.py`` there stands in for the installed pytest, as ``python -m`` would have it.
    """
    script = _script()
    if how == "procorch script" and script is None:
        pytest.skip("the procorch script is not installed next to this interpreter")
    (tmp_path / f"{module}.py").write_text(_LOCAL_EXECUTOR)
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    command = [script] if how == "procorch script" and script else _command()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_to_end(
        [*command, "run", f"{module}:Local", "specs.jsonl"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [o.output for o in _outcomes(result.stdout)] == ["local", "local"]


# -- bad input -------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port nobody listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    "invalid utf-8": (
        GOOD + '{"task_id": "c\udcff", "agent": "ok", "description": "d", "prompt": "p"}\n',
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:3: invalid UTF-8 at byte 15 of the line (0xff)",
    ),
    "truncated object": (
        GOOD + '{"task_id": "c", "agent": "ok", "description": "d", "prompt": "p"\n',
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:3: JSON is truncated: missing closing brace at the end of the line",
    ),
    "spec over several lines": (
        '{\n  "task_id": "a"\n}\n',
        ["helpers:FaultyExecutor", "specs.jsonl"],
        "procorch: specs.jsonl:1: JSON is truncated: missing closing brace at the end of the line "
        "(a spec must be on one line)",
    ),
    "dask with memory limit": (
        GOOD,
        [
            "helpers:FaultyExecutor",
            "specs.jsonl",
            "--dask",
            "tcp://127.0.0.1:1",
            "--memory-limit",
            "1G",
        ],
        "procorch run: error: --memory-limit is not available with --dask",
    ),
    "dask with capture": (
        GOOD,
        [
            "helpers:FaultyExecutor",
            "specs.jsonl",
            "--dask",
            "tcp://127.0.0.1:1",
            "--capture-output",
        ],
        "procorch run: error: --capture-output is not available with --dask: the Dask workers' "
        "own logs keep what steps print",
    ),
    "dask not an address": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "--dask", "not-an-address"],
        "procorch: cannot reach the Dask scheduler at 'not-an-address': missing port number",
    ),
    "dask nobody listening": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "--dask", f"tcp://127.0.0.1:{_free_port()}"],
        "procorch: cannot reach the Dask scheduler at 'tcp://127.0.0.1:",
    ),
    "joblog and output the same": (
        GOOD,
        ["helpers:FaultyExecutor", "specs.jsonl", "-o", "x.tsv", "--joblog", "x.tsv"],
        "procorch run: error: --output and --joblog name the same file ('x.tsv')",
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=[pytest.mark.slow] if "dask" in case else []) for case in BAD_INPUT],
    ids=list(BAD_INPUT),
)
def test_run_bad_input_exits_2_before_any_step(tmp_path: Path, case: str) -> None:
    """Bad input: exit status 2, one message naming the fault, no traceback, no step run."""
    specs_text, args, message = BAD_INPUT[case]
    if specs_text is not None:  # a lone surrogate stands for an invalid byte
        (tmp_path / "specs.jsonl").write_bytes(specs_text.encode("utf-8", "surrogateescape"))
    begin = time.monotonic()
    result = _procorch(tmp_path, "run", *args, "--events", "events.jsonl")
    assert time.monotonic() - begin < 30  # a scheduler that does not answer: seconds, not more
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # one line, no traceback or noise
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        kill_tree(process)
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
        kill_tree(process)
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


@pytest.mark.slow
def test_run_resumes_after_sigkill_of_the_command(tmp_path: Path) -> None:
    """Killed with SIGKILL mid-run (on 'another host'), the same command runs only what is left."""
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
    try:
        deadline = time.monotonic() + 60
        while _journaled(tmp_path / "journal.db") < 2:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        kill_tree(process)
    with sqlite3.connect(tmp_path / "journal.db") as connection:
        done = {row[0] for row in connection.execute("SELECT task_id FROM procorch_steps")}
        # As a run in a container that is gone leaves it: its lease names another host.
        connection.execute("UPDATE procorch_leases SET host = 'crashed-host', pid = 4242")
    connection.close()
    result = _procorch(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    outcomes = _outcomes((tmp_path / "outcomes.jsonl").read_text())
    assert [o.task_id for o in outcomes] == [f"t{i}" for i in range(6)]
    assert all(o.success for o in outcomes)
    starts = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    assert all(starts.count(task_id) == 1 for task_id in done)
    assert not (tmp_path / "journal.db").exists()  # removed after full success


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
    "--unordered",
    "--joblog",
    "--dry-run",
    "--halt-on-failure",
    "--dask",
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
    installed = run_to_end([script, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0
    assert installed.stdout == _procorch(tmp_path, "run", "--help").stdout


def test_no_command_is_bad_usage(tmp_path: Path) -> None:
    """procorch with no command: exit status 2 and the usage."""
    result = _procorch(tmp_path)
    assert result.returncode == 2
    assert "usage: procorch" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", [["-m", "procorch", "demo"], ["-m", "procorch.demo"]])
def test_demo_shows_success_failure_crash_and_timeout(
    tmp_path: Path, module: Sequence[str]
) -> None:
    """The demo, both ways it is run, shows each kind of end side by side."""
    result = run_to_end(
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


# -- outcomes as they become final -----------------------------------------------------


def _count_in(path: Path, text: str) -> int:
    return path.read_text().count(text) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_run_stopped_keeps_every_finished_outcome_in_input_order(
    tmp_path: Path, signum: int, status: int, word: str
) -> None:
    """SIGINT (or SIGTERM) after some steps finished: their outcomes are in -o, whole, in order."""
    task_ids = [f"t{n:02d}" for n in range(40)]
    _write_specs(tmp_path / "specs.jsonl", [(task_id, "ok") for task_id in task_ids])
    (tmp_path / "outcomes.jsonl").write_text("an earlier run's outcomes\n")
    process = subprocess.Popen(
        _command(
            *("run", "cli_executors:Sleeper", "specs.jsonl", "-o", "outcomes.jsonl"),
            *("--events", "events.jsonl"),
        ),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _count_in(tmp_path / "events.jsonl", '"event":"finished"') < 6:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        finished = _count_in(tmp_path / "events.jsonl", '"event":"finished"')
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        kill_tree(process)
    assert process.returncode == status, stderr
    assert stderr.count(word) == 1
    outcomes = _outcomes((tmp_path / "outcomes.jsonl").read_text())
    assert len(outcomes) >= finished
    positions = [task_ids.index(outcome.task_id) for outcome in outcomes]
    assert positions == sorted(positions)  # in input order, gaps where steps were stopped
    assert all(outcome.success for outcome in outcomes)
    assert f"{len(outcomes)} outcomes written to 'outcomes.jsonl'" in stderr
    assert "Traceback" not in stderr
    assert [p.name for p in tmp_path.glob("*.part")] == []


@pytest.mark.parametrize(
    "args",
    [
        ["helpers:FaultyExecutor", "bad.jsonl"],
        ["nowhere:Executor", "specs.jsonl"],
        ["helpers:FaultyExecutor", "specs.jsonl", "--workflow-id", "w", "--journal", "specs.jsonl"],
    ],
    ids=["bad specs", "bad executor", "bad journal"],
)
def test_run_that_fails_to_start_leaves_an_earlier_outcomes_file_untouched(
    tmp_path: Path, args: list[str]
) -> None:
    """A run that never starts (exit 2) does not truncate or replace an earlier -o FILE."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok")])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    earlier = "an earlier run's outcomes\n"
    (tmp_path / "outcomes.jsonl").write_text(earlier)
    result = _procorch(tmp_path, "run", *args, "-o", "outcomes.jsonl")
    assert result.returncode == 2, result.stderr
    assert (tmp_path / "outcomes.jsonl").read_text() == earlier
    assert [p.name for p in tmp_path.glob("*.part")] == []


def _read_line(stream: IO[str], process: subprocess.Popen[str], within: float = 60) -> str:
    """One line from ``stream`` (a pipe), failing if none comes in time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            return stream.readline()
        assert process.poll() is None, "the command ended early"
    raise AssertionError("no line in time")


def test_run_processes_standard_input_while_it_is_written(tmp_path: Path) -> None:
    """Specs piped in one by one: each outcome comes out before the next spec is written."""
    process = subprocess.Popen(
        _command("run", "helpers:FaultyExecutor", "-", "-q"),
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        for task_id in ["first", "second", "third"]:
            process.stdin.write(_spec_lines([(task_id, "ok")]))
            process.stdin.flush()
            line = _read_line(process.stdout, process)
            assert msgspec.json.decode(line, type=StepOutcome).task_id == task_id
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        kill_tree(process)


def test_run_stream_stops_at_a_bad_line_keeping_what_ran(tmp_path: Path) -> None:
    """On a pipe, a bad line stops the run there: exit 2, the outcomes before it written."""
    stdin = GOOD + "[1, 2]\n" + _spec_lines([("c", "ok")])
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "-", stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert [o.task_id for o in _outcomes(result.stdout)] == ["a", "b"]
    assert result.stderr.endswith(
        "procorch: <stdin>:3: Expected `object`, got `array` (the run stopped there; outcomes "
        "written: 2)\n"
    )


@pytest.mark.slow
def test_run_unordered_writes_each_outcome_when_it_ends(tmp_path: Path) -> None:
    """--unordered: a slow first step does not hold back the outcomes of the others."""
    _write_specs(tmp_path / "specs.jsonl", [("slow", "hang"), ("b", "ok"), ("c", "ok")])
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--unordered",
        "--step-timeout", "1",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert [o.task_id for o in _outcomes(result.stdout)] == ["b", "c", "slow"]


@pytest.mark.slow
def test_run_halt_on_failure_cancels_the_rest(tmp_path: Path) -> None:
    """--halt-on-failure 2: after the second failed step, every step left is cancelled."""
    steps = [("a", "ok"), ("b", "raise"), ("c", "raise")] + [(f"t{n}", "ok") for n in range(8)]
    _write_specs(tmp_path / "specs.jsonl", steps)
    result = _procorch(
        tmp_path, "run", "cli_executors:Sleeper", "specs.jsonl", "-j", "1",
        "--halt-on-failure", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    outcomes = _outcomes(result.stdout)
    assert [o.task_id for o in outcomes] == [task_id for task_id, _ in steps]
    kinds = ["ok" if o.success else o.error.kind for o in outcomes if o.error or o.success]
    assert kinds[:3] == ["ok", "exception", "exception"]
    assert kinds[3:] == ["cancelled"] * 8
    assert "halted after 2 failed steps (--halt-on-failure 2): 8 steps cancelled" in result.stderr


def test_run_dry_run_checks_everything_and_runs_nothing(tmp_path: Path) -> None:
    """--dry-run: the specs and the executor are checked, no step runs, no file is written."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    args = ["-o", "out.jsonl", "--events", "ev.jsonl", "--joblog", "jobs.tsv", "--dry-run"]
    result = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "procorch: dry run: 2 specs of specs.jsonl are valid and helpers:FaultyExecutor loads; "
        "they would run 2 at a time; nothing was run\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["specs.jsonl"]
    (tmp_path / "specs.jsonl").write_text(GOOD + "{oops\n")
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "-", "--dry-run", stdin=GOOD + "x\n"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("procorch: <stdin>:3: JSON is malformed")


@pytest.mark.slow
def test_run_joblog_has_one_line_per_step(tmp_path: Path) -> None:
    """--joblog: a header, then per step its start, duration, attempts, result and worker pid."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "raise"), ("c\tx", "segfault")])
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--joblog", "jobs.tsv",
        "--events", "ev.jsonl",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    header, *lines = (tmp_path / "jobs.tsv").read_text().splitlines()
    assert header.split("\t") == [
        "index", "task_id", "agent", "start", "duration", "attempts", "result", "pid",
    ]  # fmt: skip
    rows = {row[1]: row for row in (line.split("\t") for line in lines)}
    assert sorted(rows) == ["a", "b", "c\\tx"]
    pids = {e.task_id: e.pid for e in _events(tmp_path / "ev.jsonl") if isinstance(e, StepStarted)}
    for task_id, result_kind in [("a", "ok"), ("b", "exception"), ("c\\tx", "crash")]:
        _, _, _, start, duration, attempts, kind, pid = rows[task_id]
        assert kind == result_kind
        assert abs(float(start) - time.time()) < 120 and float(duration) >= 0
        assert attempts == "1"
        assert int(pid) == pids[task_id.replace("\\t", "\t")]


@pytest.mark.slow
def test_run_resumed_says_how_many_steps_were_done(tmp_path: Path) -> None:
    """A resumed run counts the journaled steps apart and its progress over the steps that run."""
    journal = ["--workflow-id", "w", "--journal", "journal.db", "--progress-interval", "0.05"]
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "raise"), ("c", "ok")])
    first = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", *journal)
    assert first.returncode == 1, first.stderr
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok"), ("c", "ok")])
    second = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", *journal)
    assert second.returncode == 0, second.stderr
    lines = second.stderr.splitlines()
    assert lines[0] == "procorch: running 1 step, 1 at a time (2 already done, from the journal)"
    progress = [line for line in lines if line.startswith("procorch: [")]
    assert all(" 0/1 done" in line or " 1/1 done" in line for line in progress)
    assert "procorch: 1 step in" in second.stderr
    assert "  2 steps already done, from the journal" in second.stderr
    assert [o.task_id for o in _outcomes(second.stdout)] == ["a", "b", "c"]
    assert not (tmp_path / "journal.db").exists()


def test_run_step_output_never_reaches_standard_output(tmp_path: Path) -> None:
    """With -o FILE, what steps print still goes to standard error, not standard output."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    result = _procorch(tmp_path, "run", "cli_executors:Printer", "specs.jsonl", "-o", "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "print() from a" in result.stderr and "fd 1 from b" in result.stderr


def test_run_step_output_is_printed_above_the_live_line(tmp_path: Path) -> None:
    """On a terminal, each line a step prints is written on a cleared line, never after the bar."""
    _write_specs(tmp_path / "specs.jsonl", [(f"t{n}", "ok") for n in range(6)])
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        _command("run", "cli_executors:Printer", "specs.jsonl", "-o", "out.jsonl", "-j", "1"),
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
        kill_tree(process)
    assert process.returncode == 0
    printed = [m.start() for m in re.finditer(r"(print\(\)|fd 1) from t\d", shown)]
    assert len(printed) == 12
    for start in printed:
        before = shown[:start]
        assert before.endswith(("\n", "\x1b[2K")), repr(before[-80:])
    assert "\r\x1b[2K[" in shown  # the live line was drawn


# -- the journal from the command line -------------------------------------------------------


@pytest.mark.slow
def test_run_refuses_a_workflow_a_live_run_holds_at_once(tmp_path: Path) -> None:
    """A second run of a workflow that is running: exit 2 at once, naming the holder."""
    _write_specs(tmp_path / "specs.jsonl", [("h", "hang"), ("b", "ok")])
    journal = ["--workflow-id", "w", "--journal", "journal.db"]
    first = subprocess.Popen(
        _command("run", "helpers:FaultyExecutor", "specs.jsonl", *journal, "--events", "ev.jsonl"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _count_in(tmp_path / "ev.jsonl", '"event":"started"') < 1:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.02)
        begin = time.monotonic()
        second = _procorch(tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", *journal)
        assert time.monotonic() - begin < 30  # no lock waited out: the time to start Python
    finally:
        kill_tree(first)
    assert second.returncode == 2
    assert second.stderr == (
        f"procorch: workflow 'w' is already being run (by pid {first.pid} on "
        f"{socket.gethostname()}); wait for that run to finish or stop it before resuming\n"
    )


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER)")
    connection.close()


def _newer(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE procorch_schema (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO procorch_schema VALUES (99)")
    connection.close()


UNUSABLE_JOURNALS = {
    "not sqlite": (
        lambda path: path.write_text("hello\n" * 100),
        "is not a procorch journal: it is not a SQLite database (left untouched)",
    ),
    "another application": (
        _foreign,
        "is not a procorch journal: it is a SQLite database of another application "
        "(tables: invoices; left untouched)",
    ),
    "newer schema": (_newer, "has schema version 99, newer than the 1 this procorch reads"),
    "missing directory": (None, "cannot be created: its directory 'gone' does not exist"),
}


@pytest.mark.parametrize("case", list(UNUSABLE_JOURNALS), ids=list(UNUSABLE_JOURNALS))
def test_run_unusable_journal_exits_2_naming_the_file(tmp_path: Path, case: str) -> None:
    """A journal that cannot be used: exit 2, one line naming the file and its fault."""
    make, reason = UNUSABLE_JOURNALS[case]
    journal = "gone/journal.db" if make is None else "journal.db"
    if make is not None:
        make(tmp_path / journal)
    before = (tmp_path / journal).read_bytes() if make is not None else None
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok")])
    result = _procorch(
        tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "--workflow-id", "w",
        "--journal", journal,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"procorch: journal {journal!r} {reason}\n"
    if before is not None:
        assert (tmp_path / journal).read_bytes() == before


@pytest.mark.slow
def test_run_memory_stays_flat_over_a_long_stream(tmp_path: Path) -> None:
    """40,000 specs through a pipe: the command's memory after the first 4,000 barely grows."""
    process = subprocess.Popen(
        _command("run", "helpers:QuickExecutor", "-", "-q", "-o", "out.jsonl"),
        cwd=tmp_path,
        env=_env(),
        stdin=subprocess.PIPE,
    )
    command = psutil.Process(process.pid)
    line = '{"task_id": "t%d", "agent": "ok", "description": "d", "prompt": "p"}\n'
    sizes = []
    try:
        assert process.stdin is not None
        for start in range(0, 40_000, 2_000):
            process.stdin.write("".join(line % n for n in range(start, start + 2_000)).encode())
            process.stdin.flush()
            sizes.append(command.memory_info().rss)
        process.stdin.close()
        assert process.wait(timeout=120) == 0
    finally:
        kill_tree(process)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40_000
    growth = max(sizes[2:]) - sizes[2]
    # 0.7 MiB here; keeping each task_id (the repeat check, which a stream skips) made it 4.9.
    assert growth < 3 * 2**20, f"grew {growth / 2**20:.1f} MiB"


def test_run_writes_to_a_fifo_without_replacing_it(tmp_path: Path) -> None:
    """-o naming a FIFO (or a device) writes to it directly: it is never renamed over."""
    fifo = tmp_path / "outcomes.fifo"
    os.mkfifo(fifo)
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok"), ("b", "ok")])
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        result = _procorch(
            tmp_path, "run", "helpers:FaultyExecutor", "specs.jsonl", "-o", str(fifo)
        )
    finally:
        if reader.is_alive():  # the command never opened it: let the reader go
            with open(fifo, "wb"):
                pass
        reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert [o.task_id for o in _outcomes(received[0].decode())] == ["a", "b"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outcomes.fifo", "specs.jsonl"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"task_id": "a", "agent": "x"', "missing closing brace at the end of the line"),
        (b'{"output_schema": {"enum": [1', "missing closing bracket at the end of the line"),
        (b'{"task_id": "a", "agent": "x\\"}', "the line ends inside a string"),
        (b'{"task_id": "\xc3\x28"}', "invalid UTF-8 at byte 14 of the line (0xc3)"),
        (b'\xff{"task_id": "a"}', "invalid UTF-8 at byte 1 of the line (0xff)"),
        (GOOD.splitlines()[0].encode() + b" x", "JSON is malformed: trailing characters"),
    ],
)
def test_line_problem_names_what_is_wrong(line: bytes, problem: str) -> None:
    """A bad line's problem says what was left open, or where the bad byte is."""
    found, said = line_problem(line)
    assert found is None
    assert problem in said


def test_run_sandbox_options_reach_the_engine(tmp_path: Path) -> None:
    """--open-files, --scratch-dir and --env-clear/--env each act on the steps they limit."""
    _write_specs(
        tmp_path / "specs.jsonl", [("leaky", "open_many"), ("where", "scratch"), ("e", "env")]
    )
    result = _procorch(
        tmp_path,
        *("run", "cli_executors:make_sandbox_executor", "specs.jsonl"),
        *("--open-files", "50", "--scratch-dir", "--env-clear", "--env", "PROCORCH_SECRET=given"),
        PROCORCH_SECRET="from-the-caller",
    )
    assert result.returncode == 1, result.stderr
    leaky, where, env = _outcomes(result.stdout)
    assert leaky.error is not None and leaky.error.kind == "open_files"
    assert where.success and "procorch-step-" in where.structured["cwd"]
    assert env.structured == {"secret": "given"}


def test_run_sandbox_options_refused_with_dask(tmp_path: Path) -> None:
    """A sandbox option with --dask is exit status 2, in one line, before anything runs."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok")])
    result = _procorch(
        tmp_path,
        *("run", "cli_executors:make_sandbox_executor", "specs.jsonl"),
        *("--no-network", "--dask", "tcp://127.0.0.1:1"),
    )
    assert result.returncode == 2
    assert "not available with --dask" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_env_option_needs_key_and_value(tmp_path: Path) -> None:
    """--env without '=' is a usage error naming the entry."""
    _write_specs(tmp_path / "specs.jsonl", [("a", "ok")])
    result = _procorch(
        tmp_path, *("run", "cli_executors:make_sandbox_executor", "specs.jsonl", "--env", "NOPE")
    )
    assert result.returncode == 2
    assert "must be KEY=VALUE (got 'NOPE')" in result.stderr
