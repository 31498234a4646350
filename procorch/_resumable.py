"""execute_steps_parallel_resumable: the barrier, journaled so that nothing finished is lost."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Unpack

from . import _messages
from ._call import (
    EventTarget,
    Guards,
    add_step,
    check_step_timeouts_name_specs,
    checked_specs,
    prepare_call,
)
from ._errors import JournalSchemaError
from ._executor import Executor
from ._journal import JournalStore, SqliteStore, spec_digest
from ._model import AgentStepSpec, StepError, StepOutcome

__all__ = ["execute_steps_parallel_resumable"]


def execute_steps_parallel_resumable(
    executor: Executor,
    specs: Iterable[AgentStepSpec],
    workflow_id: str,
    store: JournalStore | str | os.PathLike[str],
    events: EventTarget | None = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome]:
    """``execute_steps_parallel``, journaled under ``workflow_id`` in ``store``.

    Each step that succeeds is recorded the moment it succeeds. Run the same
    call again after an interruption of any kind and the recorded steps are
    not run again: their stored outcomes come back in their place, and only
    the rest run. A recorded outcome is reused only for an identical spec.
    When every step has succeeded, the workflow's progress is forgotten, and
    a SQLite file left holding no workflow's progress is removed.

    ``store`` is a :class:`JournalStore` or the path of a SQLite file. Two
    processes cannot run one workflow at once: the second gets
    :class:`WorkflowLockedError` at once, while a run that died (on any host
    or container) holds nothing. A journal written by a newer procorch is
    left untouched and every step fails with kind ``journal``, rather than
    running completed work again; a file that cannot serve as a journal (not
    a procorch journal, unreadable, in a missing directory) raises
    :class:`JournalError` naming it, before any step starts.
    """
    if not isinstance(workflow_id, str) or not workflow_id:
        raise ValueError(f"workflow_id must be a non-empty string (got {workflow_id!r})")
    call = prepare_call(executor, events, guards)
    checked, wire = checked_specs(specs)
    check_step_timeouts_name_specs(guards, checked)
    if not isinstance(store, (str, os.PathLike)) and not callable(
        getattr(store, "open_workflow", None)
    ):
        raise TypeError(f"store must be a JournalStore or a path (got {type(store).__name__})")
    journal_store = SqliteStore(store) if isinstance(store, (str, os.PathLike)) else store
    try:
        journal = journal_store.open_workflow(workflow_id)
    except JournalSchemaError as exc:
        return [_cannot_resume(spec, workflow_id, exc) for spec in checked]
    try:
        outcomes = _run(call, checked, wire, journal)
        if all(outcome.success for outcome in outcomes):
            journal.finish()
        return outcomes
    finally:
        journal.close()


def _run(
    call: Any, specs: list[AgentStepSpec], wire: list[bytes | None], journal: Any
) -> list[StepOutcome]:
    done = journal.completed()
    outcomes: list[StepOutcome | None] = [None] * len(specs)
    position: dict[int, int] = {}  # dispatch index -> input index

    def record(index: int, outcome: StepOutcome) -> None:
        where = position[index]
        outcomes[where] = outcome
        if outcome.success:
            journal.record(specs[where], outcome)

    dispatch = call.dispatch(on_outcome=record)  # kept: a raising consumer's exception carries them
    for where, (spec, data) in enumerate(zip(specs, wire, strict=True)):
        stored = done.get(spec.task_id)
        if stored is not None and stored[0] == spec_digest(spec):
            outcomes[where] = stored[1]
        else:
            position[add_step(dispatch, spec, data, where)] = where
    if position:
        dispatch.run(min(call.limit, len(position)))
    return [outcome for outcome in outcomes if outcome is not None]


def _cannot_resume(spec: AgentStepSpec, workflow_id: str, exc: JournalSchemaError) -> StepOutcome:
    message = _messages.cannot_resume(spec, workflow_id, exc)
    return StepOutcome.failed(
        spec.task_id, spec.agent, message, StepError(kind="journal", message=message, attempts=0)
    )
