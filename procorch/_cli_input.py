"""The command line's input: specs read line by line from a file or a stream.

A specs file is read twice: once to check every line before any step starts
(and to count them, for the progress display), then as the run takes them.
Standard input that is a pipe or a terminal is read once, as the run goes,
by a thread of its own, so ``tail -f specs | procorch run X -`` runs each
spec as its line arrives, and memory stays flat whatever the length: the
reader hands over at most ``_QUEUE_SIZE`` lines ahead of the run. Looking for a
repeated task_id keeps every task_id seen (about 130 bytes a spec): a file is
looked at whole before the run, a stream only with a journal, where a repeat
would mix two steps' progress.

Nothing read is ever unpickled: a line is decoded by msgspec straight into
an :class:`AgentStepSpec`, then checked as any entry point checks a spec.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import msgspec

from ._call import check_spec
from ._errors import InvalidSpecError
from ._model import AgentStepSpec

__all__ = ["BadLine", "InputEnd", "SpecLine", "SpecReader", "SpecSource", "line_problem"]

_CHUNK = 65536
_QUEUE_SIZE = 1024  # lines decoded ahead of the run, at most
_BOM = b"\xef\xbb\xbf"

_decode_spec = msgspec.json.Decoder(AgentStepSpec).decode


class SpecLine(NamedTuple):
    """A valid spec, the line it came from, and its wire bytes."""

    number: int
    spec: AgentStepSpec
    data: bytes | None


class BadLine(NamedTuple):
    """A line that is no usable spec, and why."""

    number: int
    problem: str


class InputEnd(NamedTuple):
    """No more lines: the end of the input, or ``error`` if reading it failed."""

    error: str | None = None


Item = SpecLine | BadLine | InputEnd


class UnusableInput(Exception):
    """The specs cannot be read at all; the message is the line to print."""


# -- one line -------------------------------------------------------------------------


def _truncation(line: bytes) -> str:
    """What a JSON line that ends too early left open."""
    closers: list[str] = []
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            closers.append("brace" if byte == 0x7B else "bracket")
        elif byte in (0x7D, 0x5D) and closers:
            closers.pop()
    if in_string:
        return "JSON is truncated: the line ends inside a string (missing closing quote)"
    if closers:
        return (
            f"JSON is truncated: missing closing {closers[-1]} at the end of the line "
            "(a spec must be on one line)"
        )
    return "JSON is truncated"


def line_problem(line: bytes) -> tuple[SpecLine | None, str]:
    """The spec on ``line`` with its wire bytes (number 0), or what is wrong with the line."""
    try:
        spec = _decode_spec(line)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return None, (
                f"invalid UTF-8 at byte {bad.start + 1} of the line (0x{line[bad.start]:02x})"
            )
        text = str(exc)
        if text.startswith("Input data was truncated"):
            return None, _truncation(line)
        return None, text
    try:
        data = check_spec(0, spec)  # it must travel to the workers, with a valid schema
    except InvalidSpecError as exc:
        return None, exc.reason
    return SpecLine(0, spec, data), ""


class Duplicates:
    """Remembers each task_id's first line, to name both lines of a repeat."""

    def __init__(self) -> None:
        self._first: dict[str, int] = {}

    def problem(self, number: int, task_id: str) -> str:
        earlier = self._first.setdefault(task_id, number)
        return "" if earlier == number else f"task_id {task_id!r} is already used on line {earlier}"


def decoded(
    lines: Iterator[tuple[int, bytes]], duplicates: bool = True
) -> Iterator[SpecLine | BadLine]:
    """Each numbered line as a SpecLine or a BadLine (a repeated task_id too, if ``duplicates``)."""
    seen = Duplicates() if duplicates else None
    for number, line in lines:
        found, problem = line_problem(line)
        if found is not None:
            problem = "" if seen is None else seen.problem(number, found.spec.task_id)
            if not problem:
                yield found._replace(number=number)
                continue
        yield BadLine(number, problem)


# -- the source -----------------------------------------------------------------------


class SpecSource:
    """Where the specs come from: a file or standard input, read with ``os.read``.

    ``rereadable`` is true for a regular file (named, or redirected to standard
    input): it is checked whole first, then read again from where it started.
    """

    def __init__(self, name: str, fd: int, owned: bool) -> None:
        self.name = name
        self._fd = fd
        self._owned = owned
        info = os.fstat(fd)
        self.rereadable = stat.S_ISREG(info.st_mode)
        self._start = os.lseek(fd, 0, os.SEEK_CUR) if self.rereadable else 0
        self._end: int | None = None  # where the check stopped: the run reads no further

    @classmethod
    def open(cls, path: str) -> SpecSource:
        """The source named on the command line (``-`` for standard input)."""
        if path == "-":
            try:
                return cls("<stdin>", os.dup(0), owned=True)
            except OSError as exc:
                raise UnusableInput(
                    f"cannot read specs from standard input: {exc.strerror or exc}"
                ) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UnusableInput(f"cannot read specs file {path!r}: {exc.strerror or exc}") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnusableInput(f"cannot read specs file {path!r}: Is a directory")
        return cls(path, fd, owned=True)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """The non-blank lines from the start, numbered from 1 (a rereadable file: again)."""
        if self.rereadable:
            os.lseek(self._fd, self._start, os.SEEK_SET)
        limit = self._end
        position = self._start
        number = 0
        pending = b""
        first = True
        while True:
            size = _CHUNK if limit is None else min(_CHUNK, limit - position)
            try:
                chunk = os.read(self._fd, size) if size > 0 else b""
            except OSError as exc:
                raise UnusableInput(
                    f"cannot read specs from {self.name}: {exc.strerror or exc}"
                ) from None
            position += len(chunk)
            if first and chunk:
                first = False
                chunk = chunk.removeprefix(_BOM)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                number += 1
                if line.strip():
                    yield number, line.removesuffix(b"\r")
        if self.rereadable and self._end is None:
            self._end = position
        if pending.strip():
            yield number + 1, pending.removesuffix(b"\r")

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpecReader:
    """A thread decoding a source's lines into a bounded queue, poking ``wake`` after each.

    ``duplicates``: look for repeated task_ids, which takes memory growing with
    the input (a file checked whole needs no second look).
    """

    def __init__(self, source: SpecSource, duplicates: bool) -> None:
        self._source = source
        self._duplicates = duplicates
        self._queue: queue.Queue[Item] = queue.Queue(_QUEUE_SIZE)
        self.wake: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._read, name="procorch-specs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in decoded(self._source.lines(), self._duplicates):
                self._queue.put(item)
                self.wake()
            end = InputEnd()
        except UnusableInput as exc:
            end = InputEnd(str(exc))
        except BaseException as exc:  # the run must hear of it rather than wait forever
            end = InputEnd(f"cannot read specs from {self._source.name}: {exc!r}")
        self._queue.put(end)
        self.wake()

    def get(self, block: bool) -> Item | None:
        """The next item; None if there is none yet and ``block`` is false."""
        try:
            return self._queue.get(block)
        except queue.Empty:
            return None
