"""The journal: where a resumable run keeps what it has finished.

A store hands out one journal per workflow, leased to one process at a time.
The journal records each step that succeeded, at the moment it succeeded, so
a run interrupted by anything (the parent's crash, SIGKILL, power loss)
restarts with the finished steps' outcomes instead of running them again.

``SqliteStore`` is the embedded default: one file, WAL mode, one committed row
per finished step with ``synchronous=FULL`` (the row is on disk before the
next step is recorded), and a lease row per running workflow. Anything with
the same two methods can stand in for it (see ``JournalStore``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Protocol

import msgspec
import psutil

from ._errors import JournalSchemaError, WorkflowLockedError
from ._model import AgentStepSpec, StepOutcome

__all__ = ["JournalStore", "SqliteStore", "WorkflowJournal"]

SCHEMA_VERSION = 1
"""The journal layout this procorch writes; a newer one is never overwritten."""

_encode_json = msgspec.json.Encoder(order="deterministic").encode
_decode_outcome = msgspec.json.Decoder(StepOutcome).decode


def spec_digest(spec: AgentStepSpec) -> str:
    """A fingerprint of a spec: a stored outcome is reused only for the same spec."""
    return hashlib.sha256(_encode_json(spec)).hexdigest()


class WorkflowJournal(Protocol):
    """One workflow's progress, leased to this process until ``close``."""

    def completed(self) -> dict[str, tuple[str, StepOutcome]]:
        """task_id -> (spec digest, outcome) of every step recorded so far."""

    def record(self, spec: AgentStepSpec, outcome: StepOutcome) -> None:
        """Durably record that ``spec`` succeeded with ``outcome``."""

    def finish(self) -> None:
        """Every step succeeded: remove the workflow's journal."""

    def close(self) -> None:
        """Release the lease (the journal stays, for a later resume)."""


class JournalStore(Protocol):
    """Hands out workflow journals."""

    def open_workflow(self, workflow_id: str) -> WorkflowJournal:
        """Lease ``workflow_id``'s journal.

        Raises WorkflowLockedError if another live process holds it, and
        JournalSchemaError if the journal was written by a newer procorch.
        """


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started, or None if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None


class SqliteStore:
    """A journal store in one SQLite file (created on first use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def open_workflow(self, workflow_id: str) -> _SqliteJournal:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            _check_schema(connection, self.path)
            _take_lease(connection, workflow_id)
        except BaseException:
            connection.close()
            raise
        return _SqliteJournal(connection, workflow_id)


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS procorch_schema (version INTEGER NOT NULL)")
        row = connection.execute("SELECT version FROM procorch_schema").fetchone()
        if row is None:
            connection.execute("INSERT INTO procorch_schema VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise JournalSchemaError(str(path), row[0], SCHEMA_VERSION)
        connection.execute(
            "CREATE TABLE IF NOT EXISTS procorch_steps ("
            " workflow_id TEXT NOT NULL, task_id TEXT NOT NULL, spec_digest TEXT NOT NULL,"
            " outcome BLOB NOT NULL, finished REAL NOT NULL,"
            " PRIMARY KEY (workflow_id, task_id))"
        )
        connection.execute(
            "CREATE TABLE IF NOT EXISTS procorch_leases ("
            " workflow_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
            " pid_started REAL NOT NULL, acquired REAL NOT NULL)"
        )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _take_lease(connection: sqlite3.Connection, workflow_id: str) -> None:
    """Lease the workflow to this process, unless a live process holds it."""
    host, pid = socket.gethostname(), os.getpid()
    started = _process_started(pid) or 0.0
    connection.execute("BEGIN IMMEDIATE")
    try:
        row = connection.execute(
            "SELECT host, pid, pid_started FROM procorch_leases WHERE workflow_id = ?",
            (workflow_id,),
        ).fetchone()
        if row is not None:
            holder_host, holder_pid, holder_started = row
            # A lease from another host cannot be checked: it stands. One from
            # this process (another thread) stands too.
            alive = holder_host != host or _process_started(holder_pid) == holder_started
            if alive:
                raise WorkflowLockedError(workflow_id, holder_pid, holder_host)
        connection.execute(
            "INSERT OR REPLACE INTO procorch_leases VALUES (?, ?, ?, ?, ?)",
            (workflow_id, host, pid, started, time.time()),
        )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class _SqliteJournal:
    def __init__(self, connection: sqlite3.Connection, workflow_id: str) -> None:
        self._connection = connection
        self.workflow_id = workflow_id

    def completed(self) -> dict[str, tuple[str, StepOutcome]]:
        rows = self._connection.execute(
            "SELECT task_id, spec_digest, outcome FROM procorch_steps WHERE workflow_id = ?",
            (self.workflow_id,),
        )
        return {task_id: (digest, _decode_outcome(data)) for task_id, digest, data in rows}

    def record(self, spec: AgentStepSpec, outcome: StepOutcome) -> None:
        self._connection.execute(
            "INSERT OR REPLACE INTO procorch_steps VALUES (?, ?, ?, ?, ?)",
            (self.workflow_id, spec.task_id, spec_digest(spec), _encode_json(outcome), time.time()),
        )

    def finish(self) -> None:
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("DELETE FROM procorch_steps WHERE workflow_id = ?", (self.workflow_id,))
        connection.execute("DELETE FROM procorch_leases WHERE workflow_id = ?", (self.workflow_id,))
        connection.execute("COMMIT")

    def close(self) -> None:
        try:
            self._connection.execute(
                "DELETE FROM procorch_leases WHERE workflow_id = ? AND pid = ?",
                (self.workflow_id, os.getpid()),
            )
        finally:
            self._connection.close()
