"""The command line's run: specs in as they are read, outcomes out as they become final.

``procorch run`` drives the step lifecycle itself, as ``stream_steps_parallel``
does, but never waits on its input while steps run: a thread reads the specs
(``_cli_input.SpecReader``) and pokes the lifecycle awake when a line
arrives, so time limits, events and finished outcomes are handled while
standard input is silent::

    SpecReader thread --queue--> take_input --add--> lifecycle --on_outcome--> outcomes
          (pokes wake)              |                 (turns)      \\--> journal, tally, job log
                                    \\-- journaled specs: their stored outcome, at once

At most ``window`` steps are in the lifecycle or waiting for an earlier
outcome to be written, so memory does not grow with the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from . import _messages
from ._cli_console import Tally
from ._cli_input import BadLine, InputEnd, SpecLine, SpecReader
from ._cli_output import JobLog, OrderedOutcomes
from ._guards import CancelToken
from ._journal import WorkflowJournal, spec_digest
from ._model import AgentStepSpec, StepError, StepOutcome

__all__ = ["BadLines", "Run"]

BadLines = Literal["stop", "warn", "skip"]
"""What a bad line does: stop the run (a stream's), or is skipped with a warning, or silently
(a file's, already reported when it was checked)."""


class Run:
    """One ``procorch run``: what it read, what it wrote, and why it stopped early, if it did."""

    def __init__(
        self,
        call: Any,
        reader: SpecReader,
        writer: OrderedOutcomes,
        tally: Tally,
        *,
        slots: int,
        window: int,
        journal: WorkflowJournal | None,
        done: dict[str, tuple[str, StepOutcome]],
        joblog: JobLog | None,
        halt_after: int | None,
        cancel: CancelToken | None,
        bad_lines: BadLines,
        say: Callable[[str], None],
        source_name: str,
    ) -> None:
        self._call = call
        self._reader = reader
        self._writer = writer
        self._tally = tally
        self._slots = slots
        self._window = window
        self._journal = journal
        self._done = done
        self._joblog = joblog
        self._halt_after = halt_after
        self._cancel = cancel
        self._bad_lines = bad_lines
        self._say = say
        self._source_name = source_name
        self._where: dict[int, tuple[int, AgentStepSpec]] = {}  # index -> (position, spec)
        self._positions = 0
        self._input_done = False
        self.failures = 0  # failed outcomes, those cancelled by a halt aside
        self.all_succeeded = True
        self.halted = False
        self.skipped = 0
        self.last_line = 0  # the line of the last spec read
        self.stopped_by: str | None = None  # a bad line or a read error of a stream

    def run(self) -> None:
        """Take specs and turn the lifecycle until both are done; Ctrl-C stops the workers."""
        dispatch = self._call.dispatch(on_outcome=self._on_outcome, keep_outcomes=False)
        self._reader.wake = dispatch.wake
        opened = False
        try:
            while True:
                if not self._input_done and not dispatch.stopping:
                    self._take_input(dispatch, block=not dispatch.remaining)
                if dispatch.remaining:
                    if not opened:
                        dispatch.open(self._slots)
                        opened = True
                    dispatch.turn()
                elif self._input_done or dispatch.stopping:
                    break
        finally:
            self._reader.wake = lambda: None
            if opened:
                dispatch.close()

    def cancel_the_rest(self) -> None:
        """After a halt, give each spec not yet read its outcome: cancelled (or journaled)."""
        while not self._input_done:
            item = self._reader.get(block=True)
            if isinstance(item, InputEnd) or item is None:
                self._input_done = True
                return
            if isinstance(item, BadLine):
                continue
            self.last_line = item.number
            position = self._position()
            stored = self._stored(item.spec)
            if stored is not None:
                self._writer.put(position, stored)
                continue
            message = _messages.cancelled_before_start(item.spec, "the call was cancelled")
            error = StepError(kind="cancelled", message=message, attempts=0)
            outcome = StepOutcome.failed(item.spec.task_id, item.spec.agent, message, error)
            self.all_succeeded = False
            self._tally.outcome(outcome)
            self._writer.put(position, outcome)

    # -- input --------------------------------------------------------------------------

    def _position(self) -> int:
        position = self._positions
        self._positions += 1
        return position

    def _stored(self, spec: AgentStepSpec) -> StepOutcome | None:
        """The journaled outcome of this very spec, if the journal has one."""
        stored = self._done.get(spec.task_id)
        if stored is None or stored[0] != spec_digest(spec):
            return None
        return stored[1]

    def _take_input(self, dispatch: Any, block: bool) -> None:
        """Add the specs read so far, while there is room; wait for one only if ``block``."""
        while dispatch.remaining + self._writer.pending < self._window:
            item = self._reader.get(block)
            if item is None:
                return
            if isinstance(item, InputEnd):
                self._input_done = True
                if item.error is not None:
                    self.stopped_by = item.error
                return
            if isinstance(item, BadLine):
                where = f"{self._source_name}:{item.number}: {item.problem}"
                if self._bad_lines == "skip":  # a file's, counted when it was checked
                    continue
                if self._bad_lines == "warn":
                    self._say(f"procorch: skipping {where}")
                    self.skipped += 1
                    continue
                self._input_done = True
                self.stopped_by = where
                return
            self._add(dispatch, item)
            block = False

    def _add(self, dispatch: Any, item: SpecLine) -> None:
        self.last_line = item.number
        position = self._position()
        stored = self._stored(item.spec)
        if stored is not None:
            self._writer.put(position, stored)
            return
        index = dispatch.add(item.spec, item.data)
        self._where[index] = (position, item.spec)

    # -- outcomes -----------------------------------------------------------------------

    def _on_outcome(self, index: int, outcome: StepOutcome) -> None:
        position, spec = self._where.pop(index)
        if outcome.success:
            if self._journal is not None:
                self._journal.record(spec, outcome)
        else:
            self.all_succeeded = False
            kind = outcome.error.kind if outcome.error is not None else None
            if not (self.halted and kind == "cancelled"):
                self.failures += 1
        self._tally.outcome(outcome)
        if self._joblog is not None:
            self._joblog.outcome(index, spec, outcome)
        self._writer.put(position, outcome)
        if (
            self._halt_after is not None
            and self.failures >= self._halt_after
            and self._cancel is not None
            and not self.halted
        ):
            self.halted = True
            self._cancel.cancel()
