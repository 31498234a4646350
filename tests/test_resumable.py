"""Resumable runs: a journal that survives the parent's death, and its lease."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import FaultyExecutor, JournaledExecutor, gone, kill_tree, log_counts, spec

import procorch._journal
from procorch import (
    AgentStepSpec,
    JournalError,
    JournalSchemaError,
    SqliteStore,
    StepOutcome,
    StepStarted,
    WorkflowLockedError,
    execute_steps_parallel_resumable,
)
from procorch._journal import BUSY_TIMEOUT

pytestmark = pytest.mark.usefixtures("no_leaked_processes")

TESTS = Path(__file__).resolve().parent

_RUN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import JournaledExecutor, spec
import procorch

specs = [spec(f"t{{i}}") for i in range({steps})]
procorch.execute_steps_parallel_resumable(
    JournaledExecutor({log!r}, sleep={sleep}, hint={hint}), specs, {workflow!r}, {journal!r}
)
"""


def _journal_rows(journal: Path, workflow_id: str) -> set[str]:
    if not journal.exists():
        return set()
    with sqlite3.connect(journal) as connection:
        try:
            rows = connection.execute(
                "SELECT task_id FROM procorch_steps WHERE workflow_id = ?", (workflow_id,)
            ).fetchall()
        except sqlite3.OperationalError:  # the tables are not there yet
            return set()
    return {row[0] for row in rows}


def _start_run(
    tmp_path: Path, workflow: str, steps: int, sleep: float = 0.3, hint: int = 2
) -> tuple[subprocess.Popen[str], Path, Path]:
    log = tmp_path / f"{workflow}.log"
    journal = tmp_path / "journal.db"
    script = tmp_path / f"{workflow}.py"
    script.write_text(
        _RUN_SCRIPT.format(
            tests=str(TESTS),
            steps=steps,
            log=str(log),
            sleep=sleep,
            hint=hint,
            workflow=workflow,
            journal=str(journal),
        )
    )
    # Output goes to a file: helper processes of a killed run may hold a pipe open.
    with open(tmp_path / f"{workflow}.out", "w") as output:
        process = subprocess.Popen(
            [sys.executable, str(script)], stdout=output, stderr=subprocess.STDOUT, text=True
        )
    return process, log, journal


def _wait_for(condition, within: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _kill_when_journaled(
    process: subprocess.Popen[str], journal: Path, workflow: str, rows: int
) -> set[str]:
    """SIGKILL the run once ``rows`` steps are journaled; return what the journal holds."""
    _wait_for(lambda: len(_journal_rows(journal, workflow)) >= rows)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return _journal_rows(journal, workflow)


@pytest.mark.slow
def test_resume_after_sigkill_runs_each_step_to_success_once(tmp_path: Path) -> None:
    """Steps journaled before a SIGKILL never start again; every step ends up done once."""
    process, log, journal = _start_run(tmp_path, "wf", steps=8)
    completed = _kill_when_journaled(process, journal, "wf", rows=3)
    assert 3 <= len(completed) < 8
    out = execute_steps_parallel_resumable(
        JournaledExecutor(str(log)), [spec(f"t{i}") for i in range(8)], "wf", journal
    )
    assert [o.task_id for o in out] == [f"t{i}" for i in range(8)]
    assert all(o.success for o in out)
    starts = log_counts(str(log), "start")
    assert all(starts[task_id] == 1 for task_id in completed)  # never run again
    assert set(log_counts(str(log), "finish")) == {f"t{i}" for i in range(8)}
    assert not journal.exists()  # removed after full success


@pytest.mark.slow
def test_soak_fifteen_interrupted_workflows_all_resume(tmp_path: Path) -> None:
    """Fifteen runs, each killed with a step in flight, all resume to completion."""
    runs = {
        f"w{n}": _start_run(tmp_path, f"w{n}", steps=6, sleep=0.5, hint=1)[0] for n in range(15)
    }
    journal = tmp_path / "journal.db"
    completed: dict[str, set[str]] = {}
    deadline = time.monotonic() + 120
    while len(completed) < len(runs):
        assert time.monotonic() < deadline, f"only {sorted(completed)} were journaled in time"
        for workflow, process in runs.items():
            if workflow not in completed and _journal_rows(journal, workflow):
                process.send_signal(signal.SIGKILL)  # its next step is in flight
                process.wait(timeout=60)
                completed[workflow] = _journal_rows(journal, workflow)
            assert process.poll() is None or workflow in completed, (
                tmp_path / f"{workflow}.out"
            ).read_text()
        time.sleep(0.01)
    assert all(len(done) < 6 for done in completed.values())
    for n in range(15):
        workflow = f"w{n}"
        log = tmp_path / f"{workflow}.log"
        out = execute_steps_parallel_resumable(
            JournaledExecutor(str(log), sleep=0.01),
            [spec(f"t{i}") for i in range(4)],
            workflow,
            journal,
        )
        assert all(o.success for o in out), workflow
        starts = log_counts(str(log), "start")
        assert all(starts[task_id] == 1 for task_id in completed[workflow])
        assert not _journal_rows(journal, workflow)


def test_changed_spec_is_run_again(tmp_path: Path) -> None:
    """A stored outcome is reused only for the very same spec."""
    journal = tmp_path / "journal.db"
    log = tmp_path / "log"
    store = SqliteStore(journal)
    first = execute_steps_parallel_resumable(
        JournaledExecutor(str(log), sleep=0.0),
        [spec("a"), spec("b"), spec("c", "fail")],
        "wf",
        store,
    )
    assert [o.success for o in first] == [True, True, False]
    assert journal.exists()  # 'a' and 'b' are journaled for the resume
    changed = AgentStepSpec("a", "ok", "d", "a prompt edited since")
    second = execute_steps_parallel_resumable(
        JournaledExecutor(str(log), sleep=0.0), [changed, spec("b"), spec("c")], "wf", store
    )
    assert all(o.success for o in second)
    # 'a' changed (its digest differs) and 'c' failed: both run again; 'b' is reused.
    assert log_counts(str(log), "start") == {"a": 2, "b": 1, "c": 2}


def test_newer_journal_schema_fails_every_step_without_running(tmp_path: Path) -> None:
    """A journal from a newer procorch is left alone and nothing runs."""
    journal = tmp_path / "journal.db"
    with sqlite3.connect(journal) as connection:
        connection.execute("CREATE TABLE procorch_schema (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO procorch_schema VALUES (99)")
    log = tmp_path / "log"
    out = execute_steps_parallel_resumable(
        JournaledExecutor(str(log)), [spec("a"), spec("b")], "wf", journal
    )
    assert [o.error.kind for o in out] == ["journal", "journal"]  # type: ignore[union-attr]
    assert "workflow 'wf' cannot be resumed" in out[0].output
    assert "schema version 99, newer than the 1 this procorch reads" in out[0].output
    assert not log.exists()
    with sqlite3.connect(journal) as connection:
        assert connection.execute("SELECT version FROM procorch_schema").fetchone() == (99,)


@pytest.mark.slow
def test_second_resumer_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """Two processes never run one workflow: the second gets a clear error."""
    process, log, journal = _start_run(tmp_path, "wf", steps=6, sleep=0.5)
    _wait_for(lambda: "start" in (log.read_text() if log.exists() else ""))
    with pytest.raises(WorkflowLockedError, match=rf"already being run \(by pid {process.pid} on"):
        execute_steps_parallel_resumable(
            JournaledExecutor(str(log)), [spec(f"t{i}") for i in range(6)], "wf", journal
        )
    assert process.wait(timeout=60) == 0, (tmp_path / "wf.out").read_text()
    assert log_counts(str(log), "start") == {f"t{i}": 1 for i in range(6)}


@pytest.mark.slow
def test_second_resumer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    """Another thread of the same process cannot run a workflow already running."""
    journal = tmp_path / "journal.db"
    log = tmp_path / "log"
    specs = [spec("a"), spec("b")]
    first = threading.Thread(
        target=execute_steps_parallel_resumable,
        args=(JournaledExecutor(str(log), sleep=1.0), specs, "wf", journal),
    )
    first.start()
    _wait_for(lambda: bool(log_counts(str(log), "start")))
    with pytest.raises(WorkflowLockedError, match=rf"already being run \(by pid {os.getpid()} on"):
        execute_steps_parallel_resumable(JournaledExecutor(str(log)), specs, "wf", journal)
    first.join(timeout=60)
    assert log_counts(str(log), "start") == {"a": 1, "b": 1}


def test_workflow_id_must_be_a_string(tmp_path: Path) -> None:
    """An empty workflow id is refused."""
    with pytest.raises(ValueError, match="workflow_id must be a non-empty string"):
        execute_steps_parallel_resumable(
            JournaledExecutor(str(tmp_path / "log")), [spec("a")], "", tmp_path / "j.db"
        )


@pytest.mark.slow
def test_killed_parent_takes_its_workers_with_it(tmp_path: Path) -> None:
    """After the parent's SIGKILL, its workers die too instead of finishing for nobody."""
    process, log, journal = _start_run(tmp_path, "wf", steps=4, sleep=2.0)
    _wait_for(lambda: len(log_counts(str(log), "start")) >= 2)
    workers = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert gone(workers)
    assert not log_counts(str(log), "finish")
    assert os.path.exists(journal)


# -- the lock and the file ---------------------------------------------------------------


@pytest.mark.slow
def test_run_crashed_on_another_host_is_resumed_at_once(tmp_path: Path) -> None:
    """A lease row naming a SIGKILLed holder on another host (a container) stops nothing."""
    process, log, journal = _start_run(tmp_path, "wf", steps=6)
    completed = _kill_when_journaled(process, journal, "wf", rows=2)
    with sqlite3.connect(journal) as connection:  # as a run in another container leaves it
        connection.execute(
            "UPDATE procorch_leases SET host = 'crashed-host', pid = 4242 WHERE workflow_id = 'wf'"
        )
        assert connection.execute("SELECT COUNT(*) FROM procorch_leases").fetchone() == (1,)
    begin = time.monotonic()
    journal_of_wf = SqliteStore(journal).open_workflow("wf")
    opened_in = time.monotonic() - begin
    journal_of_wf.close()
    assert opened_in < 5  # at once: no lease to wait out (about 2 ms on a quiet machine)
    out = execute_steps_parallel_resumable(
        JournaledExecutor(str(log), sleep=0.01), [spec(f"t{i}") for i in range(6)], "wf", journal
    )
    assert all(o.success for o in out)
    assert all(log_counts(str(log), "start")[task_id] == 1 for task_id in completed)


def test_live_run_is_refused_at_once_naming_its_holder(tmp_path: Path) -> None:
    """While a run holds the workflow, another is refused without waiting, told who holds it."""
    process, log, journal = _start_run(tmp_path, "wf", steps=4, sleep=0.5, hint=1)
    try:
        _wait_for(lambda: "start" in (log.read_text() if log.exists() else ""))
        begin = time.monotonic()
        with pytest.raises(WorkflowLockedError) as caught:
            SqliteStore(journal).open_workflow("wf")
        assert time.monotonic() - begin < 5  # SQLite's busy timeout is not waited out
        assert caught.value.pid == process.pid
        assert caught.value.host == socket.gethostname()
        assert pickle.loads(pickle.dumps(caught.value)).pid == process.pid
        other = SqliteStore(journal).open_workflow("another")  # other workflows run alongside
        other.close()
    finally:
        process.kill()
        process.wait(timeout=60)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is no database\n" * 200)


def _other_application(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.execute("INSERT INTO users VALUES ('ada')")
    connection.close()


def _other_application_id(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA application_id = 1234")
    connection.close()


def _damaged(path: Path) -> None:
    """A procorch journal whose first page (the schema) was overwritten."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE procorch_schema (version INTEGER NOT NULL)")
        for number in range(20):
            connection.execute(f"CREATE TABLE filler{number} (x)")
    connection.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    path.write_bytes(bytes(data))


UNUSABLE = {
    "not sqlite": (_garbage, "is not a procorch journal: it is not a SQLite database"),
    "another application": (
        _other_application,
        "is not a procorch journal: it is a SQLite database of another application "
        "(tables: users; left untouched)",
    ),
    "another application id": (
        _other_application_id,
        "is a SQLite database of another application (application_id 0x4d2",
    ),
    "a directory": (lambda path: path.mkdir(), "cannot be opened: it is a directory"),
    "damaged": (_damaged, "is damaged: database disk image is malformed"),
}


@pytest.mark.parametrize("case", list(UNUSABLE), ids=list(UNUSABLE))
def test_unusable_journal_is_refused_untouched_naming_the_file(tmp_path: Path, case: str) -> None:
    """A file that is not a procorch journal raises JournalError naming it, and stays as it was."""
    make, reason = UNUSABLE[case]
    journal = tmp_path / "journal.db"
    make(journal)
    before = journal.read_bytes() if journal.is_file() else None
    with pytest.raises(JournalError) as caught:
        execute_steps_parallel_resumable(
            JournaledExecutor(str(tmp_path / "log")), [spec("a")], "wf", journal
        )
    assert str(caught.value).startswith(f"journal {str(journal)!r} ")
    assert reason in str(caught.value)
    assert caught.value.path == str(journal)
    assert pickle.loads(pickle.dumps(caught.value)).reason == caught.value.reason
    if before is not None:
        assert journal.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.db"]  # no lock file left
    assert not (tmp_path / "log").exists()


def test_journal_in_a_missing_directory_names_it(tmp_path: Path) -> None:
    """A journal whose directory does not exist: JournalError naming the file and the directory."""
    journal = tmp_path / "no" / "such" / "journal.db"
    with pytest.raises(JournalError, match=r"cannot be created: its directory .* does not exist"):
        SqliteStore(journal).open_workflow("wf")
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files and directories")
def test_read_only_journal_names_the_file(tmp_path: Path) -> None:
    """A journal that cannot be written: JournalError naming the file."""
    journal = tmp_path / "journal.db"
    SqliteStore(journal).open_workflow("wf").close()
    _other_workflow_keeps(journal)
    journal.chmod(0o444)
    with pytest.raises(JournalError, match="cannot be opened for writing: Permission denied"):
        SqliteStore(journal).open_workflow("wf")


def _other_workflow_keeps(journal: Path) -> None:
    """Leave a finished step of workflow 'other' in the journal, so that the file stays."""
    other = SqliteStore(journal).open_workflow("other")
    other.record(spec("kept"), StepOutcome("kept", "s", "ok", "", True))
    other.close()


def test_newer_schema_raises_journal_schema_error_from_the_store(tmp_path: Path) -> None:
    """The store itself refuses a newer journal with JournalSchemaError, a JournalError."""
    journal = tmp_path / "journal.db"
    with sqlite3.connect(journal) as connection:
        connection.execute("CREATE TABLE procorch_schema (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO procorch_schema VALUES (7)")
    connection.close()
    with pytest.raises(
        JournalSchemaError, match="has schema version 7, newer than the 1"
    ) as caught:
        SqliteStore(journal).open_workflow("wf")
    assert isinstance(caught.value, JournalError)
    assert str(caught.value).startswith(f"journal {str(journal)!r} has schema version 7")


_HOLD_SQLITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_sqlite_lock_held_by_another_program_is_named_within_seconds(tmp_path: Path) -> None:
    """Another program holding the file's SQLite lock: JournalError after the short busy timeout."""
    journal = tmp_path / "journal.db"
    _other_workflow_keeps(journal)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SQLITE_LOCK, str(journal)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        begin = time.monotonic()
        with pytest.raises(JournalError, match="is locked by another program: it held the file"):
            SqliteStore(journal).open_workflow("wf")
        waited = time.monotonic() - begin
        assert BUSY_TIMEOUT - 0.5 < waited < BUSY_TIMEOUT + 20
    finally:
        kill_tree(holder)


def test_journal_file_goes_once_every_workflow_in_it_is_done(tmp_path: Path) -> None:
    """The file stays while some workflow has finished steps to resume, then goes, lock file too."""
    journal = tmp_path / "journal.db"
    failing = [spec("a"), spec("b", "raise")]
    out = execute_steps_parallel_resumable(FaultyExecutor(), failing, "first", journal)
    assert [o.success for o in out] == [True, False]
    assert journal.exists()  # 'a' is journaled for the resume
    out = execute_steps_parallel_resumable(FaultyExecutor(), [spec("x")], "second", journal)
    assert out[0].success
    assert journal.exists()  # the first workflow is not done
    out = execute_steps_parallel_resumable(
        FaultyExecutor(), [spec("a"), spec("b")], "first", journal
    )
    assert all(o.success for o in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_journal_that_never_held_a_step_is_not_left_behind(tmp_path: Path) -> None:
    """A run whose every step failed leaves no file: there is nothing to resume from."""
    journal = tmp_path / "journal.db"
    out = execute_steps_parallel_resumable(FaultyExecutor(), [spec("b", "raise")], "wf", journal)
    assert not out[0].success
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_without_ofd_locks_one_run_holds_the_whole_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where flock stands in (no OFD locks), a second run of any workflow is refused, and
    closing the refused one removes nothing from under the first."""
    monkeypatch.setattr(procorch._journal, "_OFD", False)
    journal = tmp_path / "journal.db"
    first = SqliteStore(journal).open_workflow("wf")
    with pytest.raises(WorkflowLockedError):
        SqliteStore(journal).open_workflow("another")
    assert journal.exists() and (tmp_path / "journal.db.lock").exists()
    first.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing journaled: removed
    SqliteStore(journal).open_workflow("another").close()


def test_resumed_events_name_the_steps_input_position(tmp_path: Path) -> None:
    """A resumed run's events carry each step's position in the input, not a run count."""
    journal = tmp_path / "journal.db"
    log = str(tmp_path / "log")
    specs = [spec(f"t{i}") for i in range(6)]
    store = SqliteStore(journal)
    workflow = store.open_workflow("idx")
    for done in specs[:4]:
        workflow.record(done, StepOutcome(done.task_id, "s", done.agent, "from before", True))
    workflow.close()
    seen: list[object] = []
    out = execute_steps_parallel_resumable(
        JournaledExecutor(log, sleep=0.0), specs, "idx", journal, events=seen.append
    )
    assert [o.output for o in out[:4]] == ["from before"] * 4
    started = {(e.task_id, e.index) for e in seen if isinstance(e, StepStarted)}
    assert started == {("t4", 4), ("t5", 5)}
