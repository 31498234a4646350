"""The journal: where a resumable run keeps what it has finished.

A store hands out one journal per workflow, leased to one process at a time.
The journal records each step that succeeded, at the moment it succeeded, so
a run interrupted by anything (the parent's crash, SIGKILL, power loss)
restarts with the finished steps' outcomes instead of running them again.

``SqliteStore`` is the embedded default: one SQLite file, WAL mode, one
committed row per finished step with ``synchronous=FULL`` (the row is on disk
before the next step is recorded). Anything with the same methods can stand
in for it (see ``JournalStore``).

Who may use a journal is decided by the kernel, not by rows in it. Beside
``JOURNAL`` sits ``JOURNAL.lock``, on which each run holds two locks::

    byte 0                      shared by every run using the journal,
                                exclusive only to remove the file
    byte 1 + hash(workflow_id)  exclusive to the run of that workflow

They are open file description locks (Linux's ``F_OFD_SETLK``): they belong
to one opening of the lock file, so another thread of the same process is
refused like another process, and the kernel drops them when their holder
exits, however it dies. A crashed run is resumable at once from any host or
container that sees the file, and a live one is refused at once. The lease
row a run writes (host, pid) only names the holder in that refusal. Where
there are no such locks, ``flock`` locks the whole file instead: one run per
journal file at a time.

The file is procorch's alone: a file that is not SQLite, or a SQLite
database of another application, is refused untouched (``JournalError``);
a new journal is stamped with procorch's ``application_id``. When the last
run using a journal closes it and no workflow in it has a finished step
left (every one of them succeeded, or none got that far), the file and its
lock file are removed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import sqlite3
import struct
import time
from pathlib import Path
from typing import Protocol

import msgspec
import psutil

from ._errors import JournalError, JournalSchemaError, WorkflowLockedError
from ._model import AgentStepSpec, StepOutcome

__all__ = ["JournalStore", "SqliteStore", "WorkflowJournal"]

SCHEMA_VERSION = 1
"""The journal layout this procorch writes; a newer one is never overwritten."""

APPLICATION_ID = 0x70726F63  # b"proc": SQLite's header field naming the file's owner
"""What ``PRAGMA application_id`` says in a procorch journal (0 in the oldest ones)."""

# How long a statement waits for another connection's SQLite lock. Runs of
# different workflows share the file and commit a row per step, each commit
# holding the write lock for about a millisecond; a lock held for seconds is
# another program (an open sqlite3 shell, say), and the run says so.
BUSY_TIMEOUT = 5.0

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
        """Every step succeeded: forget the workflow's progress."""

    def close(self) -> None:
        """Release the lease (the progress stays, for a later resume)."""


class JournalStore(Protocol):
    """Hands out workflow journals."""

    def open_workflow(self, workflow_id: str) -> WorkflowJournal:
        """Lease ``workflow_id``'s journal.

        Raises WorkflowLockedError if another live process holds it,
        JournalSchemaError if the journal was written by a newer procorch, and
        JournalError if the journal cannot be used at all.
        """


# -- the lock file --------------------------------------------------------------------

_OFD = hasattr(fcntl, "F_OFD_SETLK")
_JOURNAL_BYTE = 0


def _workflow_byte(workflow_id: str) -> int:
    """The byte of the lock file that stands for ``workflow_id`` (56 bits of its hash)."""
    return 1 + int.from_bytes(hashlib.sha256(workflow_id.encode()).digest()[:7], "big")


def _range_lock(fd: int, kind: int, start: int, wait: bool) -> bool:
    """Set an open file description lock on one byte; False if another holder has it."""
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0: OFD locks need it so),
    # with the C layout's padding ("0q" pads the end to the alignment of an off_t).
    request = struct.pack("@hhqqi0q", kind, os.SEEK_SET, start, 1, 0)
    try:
        fcntl.fcntl(fd, command, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _LockFile:
    """This run's hold on ``JOURNAL.lock``: the journal shared, maybe one workflow, maybe all."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.path = Path(f"{journal}.lock")
        self._fd = -1
        self._whole = False  # without OFD locks: whether this run holds the whole file

    def share(self) -> None:
        """Open the lock file and take the journal's shared lock (waiting out a removal)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise JournalError(
                    str(self.journal),
                    f"cannot be used: its lock file {str(self.path)!r} cannot be created "
                    f"({exc.strerror or exc})",
                ) from None
            try:
                if _OFD:
                    _range_lock(fd, fcntl.F_RDLCK, _JOURNAL_BYTE, wait=True)
                # The file may have been removed (journal and all) while we waited: then
                # the lock is on a file nobody else will open. Start again with a new one.
                opened, current = os.fstat(fd), os.stat(self.path)
                if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                    self._fd = fd
                    return
            except FileNotFoundError:
                pass
            except OSError as exc:
                os.close(fd)
                raise JournalError(
                    str(self.journal), f"cannot be locked ({exc.strerror or exc})"
                ) from None
            os.close(fd)

    def take_workflow(self, workflow_id: str) -> bool:
        """The exclusive lock of ``workflow_id``; False while another run holds it."""
        try:
            if _OFD:
                return _range_lock(self._fd, fcntl.F_WRLCK, _workflow_byte(workflow_id), False)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._whole = True
        except BlockingIOError:
            return False
        except OSError as exc:
            raise JournalError(
                str(self.journal), f"cannot be locked ({exc.strerror or exc})"
            ) from None
        return True

    def take_all(self) -> bool:
        """The journal to itself (no other run uses it), without waiting; False if not."""
        if not _OFD:
            return self._whole  # flock: a run that holds the file holds it whole
        try:
            return _range_lock(self._fd, fcntl.F_WRLCK, _JOURNAL_BYTE, wait=False)
        except OSError:
            return False

    def release(self) -> None:
        """Let go of every lock (closing the file is what releases them)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- the SQLite file ------------------------------------------------------------------


def _sqlite_error(path: Path, exc: sqlite3.Error) -> JournalError:
    """A SQLite error, in words that say the file is the journal and what is wrong with it."""
    text = str(exc)
    if "file is not a database" in text:
        return JournalError(
            str(path), "is not a procorch journal: it is not a SQLite database (left untouched)"
        )
    if "database is locked" in text or "database is busy" in text:
        return JournalError(
            str(path),
            f"is locked by another program: it held the file's SQLite lock for more than "
            f"{BUSY_TIMEOUT:g} s",
        )
    if "malformed" in text or "disk image" in text:
        return JournalError(str(path), f"is damaged: {text}")
    if "readonly" in text:
        return JournalError(str(path), f"cannot be written: {text}")
    if "unable to open" in text:
        return JournalError(str(path), f"cannot be opened: {text} (is its directory writable?)")
    return JournalError(str(path), f"cannot be used: {text}")


def _check_path(path: Path) -> None:
    """Refuse, with its reason, a journal path SQLite could only fail on obscurely."""
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise JournalError(str(path), f"cannot be created: its directory {str(directory)!r} {what}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a new journal
    except IsADirectoryError:
        raise JournalError(str(path), "cannot be opened: it is a directory") from None
    except OSError as exc:
        raise JournalError(
            str(path), f"cannot be opened for writing: {exc.strerror or exc}"
        ) from None
    os.close(fd)


def _schema_version(connection: sqlite3.Connection, path: Path) -> int | None:
    """The journal's schema version; None for a new file. Refuses a file that is not ours.

    Only reads: a file refused here is left exactly as it was.
    """
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    if application_id not in (0, APPLICATION_ID):
        raise JournalError(
            str(path),
            "is not a procorch journal: it is a SQLite database of another application "
            f"(application_id {application_id:#x}; left untouched)",
        )
    tables = sorted(
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    )
    if "procorch_schema" not in tables:
        if tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise JournalError(
                str(path),
                "is not a procorch journal: it is a SQLite database of another application "
                f"(tables: {shown}; left untouched)",
            )
        return None
    row = connection.execute("SELECT version FROM procorch_schema").fetchone()
    return None if row is None else int(row[0])


def _prepare(connection: sqlite3.Connection) -> None:
    """Make the file a procorch journal (once) and set this connection's durability."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute("CREATE TABLE IF NOT EXISTS procorch_schema (version INTEGER NOT NULL)")
        if connection.execute("SELECT version FROM procorch_schema").fetchone() is None:
            connection.execute("INSERT INTO procorch_schema VALUES (?)", (SCHEMA_VERSION,))
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


def _holder(connection: sqlite3.Connection, workflow_id: str) -> tuple[int | None, str | None]:
    """Who the lease row says runs ``workflow_id`` (None, None if it was not written yet)."""
    try:
        row = connection.execute(
            "SELECT pid, host FROM procorch_leases WHERE workflow_id = ?", (workflow_id,)
        ).fetchone()
    except sqlite3.Error:
        row = None
    return (None, None) if row is None else (int(row[0]), str(row[1]))


def _write_lease(connection: sqlite3.Connection, workflow_id: str) -> None:
    """Name this process as the workflow's runner (the kernel lock is what keeps others out)."""
    pid = os.getpid()
    connection.execute(
        "INSERT OR REPLACE INTO procorch_leases VALUES (?, ?, ?, ?, ?)",
        (workflow_id, socket.gethostname(), pid, psutil.Process(pid).create_time(), time.time()),
    )


class SqliteStore:
    """A journal store in one SQLite file (created on first use, removed once it holds nothing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def open_workflow(self, workflow_id: str) -> _SqliteJournal:
        _check_path(self.path)
        lock = _LockFile(self.path)
        lock.share()
        connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
            try:
                version = _schema_version(connection, self.path)
                if version is not None and version > SCHEMA_VERSION:
                    raise JournalSchemaError(str(self.path), version, SCHEMA_VERSION)
                if not lock.take_workflow(workflow_id):
                    raise WorkflowLockedError(workflow_id, *_holder(connection, workflow_id))
                _prepare(connection)
                _write_lease(connection, workflow_id)
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from None
        except BaseException:
            _close(connection, lock, self.path)
            raise
        return _SqliteJournal(connection, workflow_id, lock, self.path)


def _close(connection: sqlite3.Connection | None, lock: _LockFile, path: Path) -> None:
    """Close the connection and release the locks, removing the file if it holds nothing.

    The file goes only when no other run uses it (the journal lock is ours
    alone) and no workflow has a finished step in it; stale lease rows of
    crashed runs that finished nothing do not keep it. Beside a file that is
    kept because it is not a procorch journal, the lock file goes.
    """
    leftovers: list[Path] = []
    try:
        if connection is not None:
            if lock.take_all():
                leftovers = [lock.path]
                try:
                    row = connection.execute(
                        "SELECT EXISTS (SELECT 1 FROM procorch_steps)"
                    ).fetchone()
                    if row is not None and row[0] == 0:
                        leftovers = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), lock.path]
                except sqlite3.Error:
                    pass  # not a procorch journal, or unreadable now: the file stays
            connection.close()
        for leftover in leftovers:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    finally:
        lock.release()


class _SqliteJournal:
    def __init__(
        self, connection: sqlite3.Connection, workflow_id: str, lock: _LockFile, path: Path
    ) -> None:
        self._connection = connection
        self._lock = lock
        self._path = path
        self.workflow_id = workflow_id

    def completed(self) -> dict[str, tuple[str, StepOutcome]]:
        try:
            rows = self._connection.execute(
                "SELECT task_id, spec_digest, outcome FROM procorch_steps WHERE workflow_id = ?",
                (self.workflow_id,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise _sqlite_error(self._path, exc) from None
        return {task_id: (digest, _decode_outcome(data)) for task_id, digest, data in rows}

    def record(self, spec: AgentStepSpec, outcome: StepOutcome) -> None:
        try:
            self._connection.execute(
                "INSERT OR REPLACE INTO procorch_steps VALUES (?, ?, ?, ?, ?)",
                (
                    self.workflow_id,
                    spec.task_id,
                    spec_digest(spec),
                    _encode_json(outcome),
                    time.time(),
                ),
            )
        except sqlite3.Error as exc:
            raise _sqlite_error(self._path, exc) from None

    def finish(self) -> None:
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "DELETE FROM procorch_steps WHERE workflow_id = ?", (self.workflow_id,)
            )
            connection.execute(
                "DELETE FROM procorch_leases WHERE workflow_id = ?", (self.workflow_id,)
            )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise _sqlite_error(self._path, exc) from None

    def close(self) -> None:
        try:
            self._connection.execute(
                "DELETE FROM procorch_leases WHERE workflow_id = ? AND pid = ?",
                (self.workflow_id, os.getpid()),
            )
        except sqlite3.Error:
            pass  # the lease row only names the holder; the kernel lock is released below
        _close(self._connection, self._lock, self._path)
