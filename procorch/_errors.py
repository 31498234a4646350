"""Errors raised to the caller before any work starts."""

from __future__ import annotations

__all__ = [
    "ExecutorError",
    "InvalidSpecError",
    "JournalError",
    "JournalSchemaError",
    "StepTimeout",
    "WorkflowLockedError",
]


class StepTimeout(BaseException):
    """Raised inside a running step when its time limit runs out and the call has ``timeout_grace``.

    The step has ``timeout_grace`` seconds to unwind (``finally`` blocks and
    context managers run) before its worker is killed. Like
    ``KeyboardInterrupt`` it is not an ``Exception``, so a broad ``except
    Exception`` in the step does not swallow it. The step's outcome is
    ``timeout`` whatever the step does with it.
    """


class InvalidSpecError(ValueError):
    """A spec in the input breaks a rule; ``index`` is its position in the input."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"specs[{index}]: {reason}")
        self.index = index
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidSpecError], tuple[int, str]]:
        return type(self), (self.index, self.reason)


class ExecutorError(TypeError):
    """The executor object cannot be used: it lacks the seam, or cannot be pickled."""


class WorkflowLockedError(RuntimeError):
    """Another live process is running this workflow; two must never run its steps.

    ``pid`` and ``host`` name the holder, as its lease row says (None in the
    instant between its taking the lock and writing the row).
    """

    def __init__(self, workflow_id: str, pid: int | None, host: str | None) -> None:
        holder = "by another process" if pid is None else f"by pid {pid} on {host}"
        super().__init__(
            f"workflow {workflow_id!r} is already being run ({holder}); "
            "wait for that run to finish or stop it before resuming"
        )
        self.workflow_id = workflow_id
        self.pid = pid
        self.host = host

    def __reduce__(
        self,
    ) -> tuple[type[WorkflowLockedError], tuple[str, int | None, str | None]]:
        return type(self), (self.workflow_id, self.pid, self.host)


class JournalError(RuntimeError):
    """The journal file cannot be used; ``reason`` says what is wrong with it.

    ``str()`` names the file first: ``journal 'runs.db' is not a procorch journal: ...``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"journal {path!r} {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[JournalError], tuple[str, str]]:
        return type(self), (self.path, self.reason)


class JournalSchemaError(JournalError):
    """The journal was written by a newer procorch, whose layout this one cannot read."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            path,
            f"has schema version {found}, newer than the {supported} this procorch reads",
        )
        self.found = found
        self.supported = supported

    def __reduce__(self) -> tuple[type[JournalSchemaError], tuple[str, int, int]]:  # type: ignore[override]
        return type(self), (self.path, self.found, self.supported)
