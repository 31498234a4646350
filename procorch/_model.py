"""The data model: what a step is, and what came of it.

Both records mirror the seed's JSON exactly: the same field names in the same
order, and the optional fields left out when unset, so payloads written by the
seed decode here and seed-shaped records encode to the seed's bytes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = ["AgentStepSpec", "ErrorKind", "StepError", "StepOutcome"]

ErrorKind = Literal[
    "exception",
    "crash",
    "timeout",
    "memory",
    "cancelled",
    "journal",
    "invalid_result",
    "serialization",
    "internal",
    "cpu_time",
    "open_files",
    "processes",
    "file_size",
    "network",
]
"""Why a step failed; see :class:`StepError`."""


class AgentStepSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """One unit of work handed to an executor.

    ``task_id`` is the caller's name for the step and labels everything that
    comes back from it: its outcome, its events and its errors. The three
    optional fields are left out of the JSON when unset.
    """

    task_id: str
    agent: str
    description: str
    prompt: str
    max_steps: Annotated[int, msgspec.Meta(ge=0)] | None = None
    parent_session_id: str | None = None
    output_schema: dict[str, Any] | None = None

    def with_max_steps(self, max_steps: int) -> AgentStepSpec:
        """Return a copy of this spec with ``max_steps`` set."""
        return msgspec.structs.replace(self, max_steps=max_steps)

    def with_parent_session_id(self, parent_session_id: str) -> AgentStepSpec:
        """Return a copy of this spec with ``parent_session_id`` set."""
        return msgspec.structs.replace(self, parent_session_id=parent_session_id)

    def with_output_schema(self, output_schema: dict[str, Any]) -> AgentStepSpec:
        """Return a copy of this spec with ``output_schema`` set."""
        return msgspec.structs.replace(self, output_schema=output_schema)


class StepError(msgspec.Struct, frozen=True, omit_defaults=True):
    """The facts behind a failed outcome, for programs rather than people.

    ``kind`` says what went wrong:

    - ``exception``: the executor raised (any BaseException, SystemExit and
      KeyboardInterrupt included); ``exception_type``, ``message`` and
      ``traceback`` describe it.
    - ``crash``: the worker process died while running the step (a fatal
      signal, ``os._exit``, a SIGKILL from outside); ``exit_code``, ``signal``
      and ``pid`` say how, and ``traceback`` holds faulthandler's dump where
      the process could write one.
    - ``timeout``: the step ran past its time limit, or the call's, and its
      worker was killed; ``limit`` is the limit in seconds.
    - ``memory``: the step's worker (with its child processes) went over the
      memory cap and was killed; ``memory`` is what it reached and ``limit``
      the cap, both in bytes.
    - ``cancelled``: the call was cancelled (or ran out of time) before the
      step could finish; a step that had started was stopped.
    - ``journal``: a resumable run could not use its journal (written by a
      newer procorch), so the step was not run.
    - ``invalid_result``: the executor returned something other than a
      :class:`StepOutcome`.
    - ``serialization``: the executor could not be rebuilt in the worker, or
      its outcome could not be sent back.
    - ``internal``: procorch itself lost track of the step (a bug: report it),
      or could not follow its worker's report (a step that wrote to or closed
      procorch's own file descriptors).
    - ``cpu_time``, ``open_files``, ``processes``, ``file_size``, ``network``:
      the step went over that limit of its :class:`Sandbox`; ``limit`` holds it.

    ``attempts`` counts how many times the step was started. ``printed`` holds
    the last few kilobytes the step wrote to its standard output and error,
    when the call captured them.
    """

    kind: ErrorKind
    message: str
    exception_type: str | None = None
    traceback: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    pid: int | None = None
    limit: float | None = None
    memory: int | None = None
    printed: str | None = None
    attempts: int = 1


class StepOutcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """What came of one step.

    A failure is an outcome with ``success=False``, never an exception, so a
    batch goes on when one of its steps fails. ``output`` is the text for
    people; a failure that procorch observed (rather than one the executor
    reported) also carries ``error``, an optional field the seed does not
    have and therefore never writes.
    """

    task_id: str
    session_id: str
    agent: str
    output: str
    success: bool
    structured: Any = None
    error: StepError | None = None

    @classmethod
    def failed(
        cls,
        task_id: str,
        agent: str,
        message: str,
        error: StepError | None = None,
    ) -> StepOutcome:
        """A failed outcome for ``task_id``, in session ``task-run-{task_id}``."""
        return cls(
            task_id=task_id,
            session_id=f"task-run-{task_id}",
            agent=agent,
            output=message,
            success=False,
            error=error,
        )


def _describe(spec: AgentStepSpec) -> str:
    """How every message names a step: "step 'a' (agent 'b')"."""
    return f"step {spec.task_id!r} (agent {spec.agent!r})"
