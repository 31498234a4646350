"""The command line: ``procorch run`` a batch of specs from a file, ``procorch demo``.

Data flow of ``procorch run EXECUTOR SPECS``::

    EXECUTOR --import--> executor        (--concurrency wraps it in _ConcurrencyOverride)
    SPECS ----msgspec, line by line--> specs   (a bad line: exit 2 before any step starts,
                                                or a warning with --skip-bad-lines)
    execute_steps_parallel(executor, specs, events=on_event, guards from the options)
        on_event --> _Tally (counts, durations) <-- read by _Display's own thread
                 \\-> the events file, one JSON line per event, flushed at once
    outcomes --> the output, one JSON line per spec, in input order
    summary --> standard error; exit status 0 / 1 / 2 / 130

- Nothing read from a file is unpickled: specs are decoded by msgspec straight
  into :class:`AgentStepSpec`, which rejects a line with its field at fault.
- The event callback runs in the dispatcher's thread between steps, so it only
  counts and writes one line; the display draws from a thread of its own.
- When outcomes or events go to standard output, the command keeps that
  descriptor for itself and points descriptor 1 at standard error before any
  user code runs, so what the executor's module or its steps print cannot
  corrupt the JSON Lines.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import IO, Any, NamedTuple

import msgspec

from ._call import Guards
from ._dask import DaskBackend
from ._errors import ExecutorError, InvalidSpecError, JournalError, WorkflowLockedError
from ._events import Event, EventSink, StepCrashed, StepFinished, StepRerun, StepStarted
from ._executor import DEFAULT_MAX_PARALLEL_TASKS, AgentExecutor
from ._guards import RetryableKind, RetryPolicy
from ._model import AgentStepSpec, StepOutcome
from ._parallel import execute_steps_parallel
from ._pool import shutdown
from ._resumable import execute_steps_parallel_resumable

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # some step failed
EXIT_USAGE = 2  # bad usage or bad input; no step started
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

_RETRYABLE: tuple[RetryableKind, ...] = ("exception", "crash", "timeout", "memory")
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_LIVE_INTERVAL = 0.1  # seconds between redraws of the terminal line
_SLOWEST_SHOWN = 3
_FAILURES_SHOWN = 5
_CAUSE_WIDTH = 200  # characters of a failure's message shown in the summary

_MISSING = object()

_encode_json = msgspec.json.Encoder().encode
_encode_json_lines = msgspec.json.Encoder().encode_lines
_decode_spec = msgspec.json.Decoder(AgentStepSpec).decode
_encode_msgpack = msgspec.msgpack.Encoder().encode


class _BadInput(Exception):
    """Input the command cannot use; its message is the line to print (exit status 2)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM arrived; it unwinds like Ctrl-C, which stops the workers on its way."""


class _ConcurrencyOverride(AgentExecutor):
    """The user's executor, run with the concurrency given on the command line.

    It lives at module level so worker processes import it by reference; the
    user's executor travels inside it, pickled as procorch pickles any executor.
    """

    def __init__(self, inner: Any, concurrency: int) -> None:
        self.inner = inner
        self.concurrency = concurrency

    def concurrency_hint(self) -> int:
        return self.concurrency

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        outcome: StepOutcome = self.inner.execute_step(spec, events)
        return outcome


# -- option values ----------------------------------------------------------------


def _number(text: str) -> float:
    """``text`` as a float; NaN, which fails every range check, if it is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB`` or ``1048576`` (units are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    size = 0.0
    if match is not None:
        size = float(match["number"]) * _SIZE_UNITS[(match["unit"] or "").lower()]
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size like 512M, 2G or a number of bytes (got {text!r})"
        )
    return int(size)


def _seconds(text: str) -> float:
    """A number of seconds > 0."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (got {text!r})")
    return value


def _seconds_or_zero(text: str) -> float:
    """A number of seconds >= 0."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (got {text!r})")
    return value


def _at_least_one(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


def _failure_kinds(text: str) -> frozenset[RetryableKind]:
    """Comma-separated failure kinds a retry may follow."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    wrong = [kind for kind in kinds if kind not in _RETRYABLE]
    if wrong or not kinds:
        raise argparse.ArgumentTypeError(
            f"must name kinds among {', '.join(_RETRYABLE)} (got {text!r})"
        )
    return frozenset(kind for kind in _RETRYABLE if kind in kinds)


# -- the parser ---------------------------------------------------------------------

_DESCRIPTION = """\
Run steps in worker processes and survive whatever they do: a step that raises,
segfaults, calls os._exit, hangs or eats memory fails alone, with its task_id
and what happened, and every other step runs."""

_EXIT_STATUS = """\
exit status:
  0    every step succeeded
  1    some step failed (or the outcomes could not be written)
  2    bad usage or bad input; no step was started
  130  interrupted (Ctrl-C); the running steps were stopped (143 for SIGTERM)"""

_RUN_DESCRIPTION = """\
Run every spec of SPECS with EXECUTOR in worker processes and write one outcome
per spec, in input order, as JSON Lines.

EXECUTOR is an import path, package.module:attribute, naming a class (created
with no arguments), a function returning an executor, or an executor instance;
it must have an execute_step(spec, events) method. The current directory is
searched first, as with python -m.

SPECS is a JSON Lines file (- for standard input), one spec per line:
  {"task_id": "a", "agent": "counter", "description": "count", "prompt": "one two"}
with optional "max_steps", "parent_session_id" and "output_schema". Blank lines
are ignored. A line that is not a spec, or repeats a task_id, stops the command
before any step starts, naming the line and the field at fault."""

_RUN_EPILOG = f"""\
A progress line shows on standard error: redrawn in place on a terminal, a
plain line every --progress-interval seconds otherwise. The summary at the end
counts the failures by kind (an outcome's error.kind: exception, crash,
timeout, memory...; unsuccessful when the executor itself returned success
false), and names the slowest steps and the first failures.
When outcomes or events go to standard output, whatever the steps print goes
to standard error instead, so standard output carries only JSON.

{_EXIT_STATUS}

examples:
  procorch run mypkg.agents:Executor specs.jsonl -o outcomes.jsonl
  procorch run mypkg.agents:Executor - -j 8 --step-timeout 60 --memory-limit 2G < specs.jsonl
  procorch run mypkg.agents:make_executor specs.jsonl --attempts 3 --retry-on crash,timeout \\
      --events events.jsonl -o outcomes.jsonl"""


def _build_parser() -> argparse.ArgumentParser:
    """The ``procorch`` parser and its subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="procorch",
        description=_DESCRIPTION,
        epilog=f"{_EXIT_STATUS}\n\nRun 'procorch COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"procorch {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    run = commands.add_parser(
        "run",
        help="run a batch of specs from a JSON Lines file",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run)
    run.set_defaults(command_parser=run)  # usage errors found later print run's usage
    commands.add_parser(
        "demo",
        help="run the bundled demo batch: success, failure, crash and timeout side by side",
        description="Run a small batch (procorch/demo.py) in worker processes: steps "
        "that succeed, raise, segfault and call os._exit, and one that hangs until its "
        "1 s time limit kills it. Prints their events, then their outcomes in input "
        "order. Takes a second or two.",
    )
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The options of ``procorch run``, in groups."""
    run.add_argument("executor", metavar="EXECUTOR", help="import path package.module:attribute")
    run.add_argument("specs", metavar="SPECS", help="JSON Lines file of specs, or - for stdin")
    files = run.add_argument_group("input and output")
    files.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default="-",
        help="write the outcomes here, one JSON line per spec (default: standard output)",
    )
    files.add_argument(
        "--events",
        metavar="FILE",
        help="write the events here as they happen, one JSON line each (- for standard output)",
    )
    files.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="warn about each bad line of SPECS and run the others, instead of stopping",
    )
    guards = run.add_argument_group("guards (all off by default)")
    guards.add_argument(
        "-j",
        "--concurrency",
        metavar="N",
        type=_at_least_one,
        help="run at most N steps at once (default: the executor's concurrency_hint())",
    )
    guards.add_argument(
        "--step-timeout",
        metavar="SECONDS",
        type=_seconds,
        help="fail a step (kind timeout) that runs longer, killing its worker",
    )
    guards.add_argument(
        "--call-timeout",
        metavar="SECONDS",
        type=_seconds,
        help="stop the whole run after this long: running steps fail as timeout, "
        "queued ones as cancelled",
    )
    guards.add_argument(
        "--memory-limit",
        metavar="SIZE",
        type=_parse_size,
        help="fail a step (kind memory) whose worker and its children use more resident "
        "memory: 512M, 2G (powers of 1024) or bytes",
    )
    guards.add_argument(
        "--attempts",
        metavar="N",
        type=_at_least_one,
        default=1,
        help="start a failing step up to N times in all (default: 1, no retry)",
    )
    guards.add_argument(
        "--retry-on",
        metavar="KINDS",
        type=_failure_kinds,
        help="retry only these failure kinds, comma-separated among exception, crash, "
        "timeout, memory (default: all four)",
    )
    guards.add_argument(
        "--retry-backoff",
        metavar="SECONDS",
        type=_seconds_or_zero,
        help="wait this long before the first retry, doubling each time (default: 0)",
    )
    guards.add_argument(
        "--capture-output",
        action="store_true",
        help="keep what each step prints; a failed outcome's error.printed holds the last 4 KiB",
    )
    where = run.add_argument_group("where the steps run")
    where.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the steps on the Dask cluster whose scheduler is at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786) instead of local worker processes; needs the dask extra",
    )
    resume = run.add_argument_group(
        "resumable runs",
        "journal each finished step, so that running the same command again after an "
        "interruption (Ctrl-C, a crash, SIGKILL) runs only the steps left",
    )
    resume.add_argument(
        "--workflow-id",
        metavar="ID",
        help="the name this run's progress is journaled under (needs --journal)",
    )
    resume.add_argument(
        "--journal",
        metavar="PATH",
        help="the SQLite file holding the journal (created if absent; needs --workflow-id)",
    )
    display = run.add_argument_group("display")
    display.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="show no progress and no summary on standard error; only errors",
    )
    display.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=_seconds,
        default=10.0,
        help="when standard error is not a terminal, print a progress line this often "
        "(default: 10)",
    )


def _check_combinations(args: argparse.Namespace) -> None:
    """Reject options that make no sense together (argparse exits with status 2)."""
    parser: argparse.ArgumentParser = args.command_parser
    if (args.workflow_id is None) != (args.journal is None):
        parser.error("--workflow-id and --journal go together")
    if args.attempts == 1 and (args.retry_on is not None or args.retry_backoff is not None):
        parser.error("--retry-on and --retry-backoff need --attempts 2 or more")
    if args.output == "-" and args.events == "-":
        parser.error("--output and --events cannot both be standard output")
    if (
        args.events not in (None, "-")
        and args.output != "-"
        and _same_file(args.output, args.events)
    ):
        parser.error(f"--output and --events name the same file ({args.output!r})")


def _same_file(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _retry_policy(args: argparse.Namespace) -> RetryPolicy | None:
    """The retry policy the options ask for; None when --attempts is 1."""
    if args.attempts == 1:
        return None
    return RetryPolicy(
        attempts=args.attempts,
        on=args.retry_on if args.retry_on is not None else frozenset(_RETRYABLE),
        backoff=args.retry_backoff or 0.0,
    )


# -- input ----------------------------------------------------------------------


def _brief(exc: BaseException) -> str:
    """An exception in one line, with the place in user code it came from."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if f.filename != __file__ and "importlib" not in f.filename]
    if user and not isinstance(exc, SyntaxError):  # a SyntaxError names its place itself
        text += f" (at {user[-1].filename}:{user[-1].lineno})"
    return text


def _load_executor(path: str) -> Any:
    """The executor named by ``path`` (module:attribute), created if it is a class or factory."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise _BadInput(
            f"executor must be an import path like package.module:attribute (got {path!r})"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise _BadInput(
            f"executor {path!r}: cannot import {module_name!r}: {_brief(exc)}"
        ) from None
    for part in attribute.split("."):
        found = getattr(target, part, _MISSING)
        if found is _MISSING:
            owner = getattr(target, "__name__", module_name)
            raise _BadInput(f"executor {path!r}: {owner!r} has no attribute {part!r}")
        target = found
    executor = _instantiate(target, path)
    if not callable(getattr(executor, "execute_step", None)):
        raise _BadInput(
            f"executor {path!r} has no execute_step(spec, events) method "
            f"(got {type(executor).__name__})"
        )
    return executor


def _instantiate(target: Any, path: str) -> Any:
    """A class or factory called with no arguments; anything else as it is."""
    if not isinstance(target, type) and (
        not callable(target) or callable(getattr(target, "execute_step", None))
    ):
        return target
    try:
        return target()
    except Exception as exc:
        name = getattr(target, "__name__", type(target).__name__)
        raise _BadInput(f"executor {path!r}: {name}() raised {_brief(exc)}") from None


def _concurrency(executor: Any, path: str) -> int:
    """How many steps the executor asks to run at once."""
    hint = getattr(executor, "concurrency_hint", None)
    if hint is None:
        return DEFAULT_MAX_PARALLEL_TASKS
    try:
        value = hint()
    except Exception as exc:
        raise _BadInput(f"executor {path!r}: concurrency_hint() raised {_brief(exc)}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadInput(f"executor {path!r}: concurrency_hint() must return an int (got {value!r})")
    return max(1, value)


def _read_source(source: str) -> bytes:
    """The bytes of the specs file, or of standard input for ``-``."""
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        with open(source, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _BadInput(f"cannot read specs file {source!r}: {exc.strerror or exc}") from None


def _numbered_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of ``data`` with their numbers, counting from 1."""
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if line.strip():
            yield number, line


def _spec_problem(line: bytes) -> tuple[AgentStepSpec | None, str]:
    """The spec on ``line``, or what is wrong with it."""
    try:
        spec = _decode_spec(line)
        _encode_msgpack(spec)  # it must travel to the workers, too
    except msgspec.DecodeError as exc:
        return None, str(exc)
    except (TypeError, OverflowError) as exc:
        return None, f"cannot be sent to a worker: {exc}"
    return spec, ""


class _Specs(NamedTuple):
    """The specs read from SPECS, the line each came from, and how many lines were skipped."""

    specs: list[AgentStepSpec]
    lines: list[int]
    skipped: int


def _source_name(source: str) -> str:
    """How messages name the specs: the path as given, or ``<stdin>``."""
    return "<stdin>" if source == "-" else source


def _read_specs(source: str, skip_bad_lines: bool) -> _Specs:
    """Every spec of ``source``, in order; a bad line raises, or is skipped with a warning."""
    specs: list[AgentStepSpec] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    skipped = 0
    for number, line in _numbered_lines(_read_source(source)):
        spec, problem = _spec_problem(line)
        if spec is not None:
            earlier = first_line.setdefault(spec.task_id, number)
            if earlier == number:
                specs.append(spec)
                lines.append(number)
                continue
            problem = f"task_id {spec.task_id!r} is already used on line {earlier}"
        where = f"{_source_name(source)}:{number}"
        if not skip_bad_lines:
            raise _BadInput(f"{where}: {problem}")
        _say(f"procorch: skipping {where}: {problem}")
        skipped += 1
    return _Specs(specs, lines, skipped)


# -- output --------------------------------------------------------------------------


def _say(line: str) -> None:
    """Write one line to standard error."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # standard error is closed: nothing more to do
        pass


def _claim_stdout() -> IO[bytes]:
    """Standard output, for this command's JSON Lines only; descriptor 1 becomes stderr.

    Whatever else writes to descriptor 1 from now on (the executor's module,
    worker processes, which inherit it) lands on standard error instead.
    """
    sys.stdout.flush()
    try:
        private = os.dup(1)
        os.dup2(2, 1)
    except OSError as exc:
        raise _BadInput(f"standard output is not usable: {exc.strerror or exc}") from None
    return os.fdopen(private, "wb")


def _open_sink(path: str, what: str, stdout: IO[bytes] | None) -> IO[bytes]:
    """A file to write ``what`` to, truncated now; ``-`` is the claimed standard output."""
    if path == "-":
        assert stdout is not None
        return stdout
    try:
        return open(path, "wb")
    except OSError as exc:
        raise _BadInput(f"cannot write {what} to {path!r}: {exc.strerror or exc}") from None


class _EventLog:
    """Writes each event as one JSON line and flushes it, so a reader can follow along.

    A write that fails (a full disk) stops the log rather than the run; the
    command warns about it at the end.
    """

    def __init__(self, sink: IO[bytes], path: str) -> None:
        self._sink = sink
        self._path = path
        self.problem: str | None = None

    def write(self, event: Event) -> None:
        if self.problem is not None:
            return
        try:
            self._sink.write(_encode_json(event) + b"\n")
            self._sink.flush()
        except OSError as exc:
            self.problem = f"stopped writing events to {self._path!r}: {exc.strerror or exc}"


# -- progress ----------------------------------------------------------------------


class _Counts(NamedTuple):
    """The state of a run at one instant; ``failed`` leaves crashes out."""

    total: int
    succeeded: int
    failed: int
    crashed: int
    running: int
    elapsed: float

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.crashed

    @property
    def rate(self) -> float | None:
        """Steps finished per second so far."""
        return self.finished / self.elapsed if self.finished and self.elapsed > 0 else None

    @property
    def left(self) -> float | None:
        """Seconds until the last step finishes, at the rate so far."""
        rate = self.rate
        return None if rate is None else (self.total - self.finished) / rate


class _Tally:
    """What the display and the summary know of a run, kept up from its events.

    ``record`` is the event callback's part: a few counters under a lock, so
    the display thread reads them consistently.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._crashed: set[int] = set()  # steps whose current attempt crashed
        self._counts = collections.Counter[str]()
        self.durations: dict[str, float] = {}  # task_id -> its last attempt's duration

    def record(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, StepStarted):
                self._running.add(event.index)
            elif isinstance(event, StepCrashed):
                self._crashed.add(event.index)
            elif isinstance(event, StepRerun):
                self._running.discard(event.index)
                self._crashed.discard(event.index)
            elif isinstance(event, StepFinished):
                self._running.discard(event.index)
                self.durations[event.task_id] = event.duration
                if event.success:
                    self._counts["succeeded"] += 1
                elif event.index in self._crashed:
                    self._counts["crashed"] += 1
                else:
                    self._counts["failed"] += 1

    def counts(self) -> _Counts:
        with self._lock:
            return _Counts(
                self.total,
                self._counts["succeeded"],
                self._counts["failed"],
                self._counts["crashed"],
                len(self._running),
                time.monotonic() - self.started,
            )


def _count(number: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _duration(seconds: float) -> str:
    """``12 ms``, ``3.14 s``, ``12.5 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _progress_text(counts: _Counts) -> str:
    """``7/10 done: 5 ok, 1 failed, 1 crashed; 2 running; 3.1 steps/s; about 1.0 s left``."""
    text = (
        f"{counts.finished}/{counts.total} done: {counts.succeeded} ok, {counts.failed} failed, "
        f"{counts.crashed} crashed; {counts.running} running"
    )
    rate = counts.rate
    if rate is not None:
        text += f"; {rate:.1f} steps/s" if rate >= 1 else f"; {rate * 60:.1f} steps/min"
    left = counts.left
    if left is not None and counts.finished < counts.total:
        text += f"; about {_duration(left)} left"
    return text


def _live_text(counts: _Counts, width: int = 20) -> str:
    """``[########------------] 4/10  ok 3  failed 1  crashed 0  running 2  2.1/s  ~3.0 s left``."""
    filled = width * counts.finished // max(counts.total, 1)
    text = (
        f"[{'#' * filled}{'-' * (width - filled)}] {counts.finished}/{counts.total}  "
        f"ok {counts.succeeded}  failed {counts.failed}  crashed {counts.crashed}  "
        f"running {counts.running}"
    )
    rate = counts.rate
    if rate is not None:
        text += f"  {rate:.1f}/s" if rate >= 1 else f"  {rate * 60:.1f}/min"
    left = counts.left
    if left is not None and counts.finished < counts.total:
        text += f"  ~{_duration(left)} left"
    return text


class _Display:
    """The tally on standard error while the steps run, drawn from a thread of its own.

    It starts with the first event, so a run that fails its checks shows no
    progress. Then, on a terminal, one line redrawn in place ten times a
    second; anywhere else (a file, a pipe, a CI log), a ``header`` line and a
    plain line every ``interval`` seconds.
    """

    def __init__(self, tally: _Tally, stream: IO[str], interval: float, header: str) -> None:
        self._tally = tally
        self._stream = stream
        self._header = header
        self._live = _is_terminal(stream)
        self._interval = _LIVE_INTERVAL if self._live else interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = False

    def start(self) -> None:
        self.started = True
        self._write(self._header + "\n")
        self._thread = threading.Thread(target=self._loop, name="procorch-display", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop drawing; on a terminal, erase the line."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        if self._live:
            self._write("\r\x1b[2K")

    def _loop(self) -> None:
        if self._live:
            self._draw()
        while not self._stopping.wait(self._interval):
            self._draw()

    def _draw(self) -> None:
        counts = self._tally.counts()
        if self._live:
            self._write("\r\x1b[2K" + _live_text(counts)[: _columns(self._stream) - 1])
        else:
            self._write(f"procorch: [{_duration(counts.elapsed)}] {_progress_text(counts)}\n")

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (OSError, ValueError):
        return False


def _columns(stream: IO[str]) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns if columns > 0 else 80  # a pseudo-terminal may report 0


# -- the summary ---------------------------------------------------------------------


def _failure_kind(outcome: StepOutcome) -> str:
    """The failure's kind, or ``unsuccessful`` when the executor returned success false."""
    return outcome.error.kind if outcome.error is not None else "unsuccessful"


def _cause(outcome: StepOutcome) -> str:
    """The first line of a failed outcome's message, cut to a readable length."""
    lines = outcome.output.strip().splitlines()
    first = lines[0] if lines else "(no message)"
    return first if len(first) <= _CAUSE_WIDTH else first[: _CAUSE_WIDTH - 3] + "..."


def _summary(outcomes: Sequence[StepOutcome], tally: _Tally, skipped: int) -> list[str]:
    """The lines printed at the end: counts, failures by kind, slowest steps, first failures."""
    failed = [outcome for outcome in outcomes if not outcome.success]
    elapsed = _duration(time.monotonic() - tally.started)
    lines = [
        f"procorch: {_count(len(outcomes), 'step')} in {elapsed}: "
        f"{len(outcomes) - len(failed)} succeeded, {len(failed)} failed"
    ]
    if skipped:
        lines.append(f"  skipped {_count(skipped, 'bad line')} of the specs")
    if failed:
        kinds = collections.Counter(_failure_kind(outcome) for outcome in failed)
        lines.append(
            "  failures by kind: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
        )
    slowest = sorted(tally.durations.items(), key=lambda item: -item[1])[:_SLOWEST_SHOWN]
    if slowest:
        lines.append(
            "  slowest: " + ", ".join(f"{task_id} {_duration(sec)}" for task_id, sec in slowest)
        )
    if failed:
        lines.append("  first failures:")
        width = max(len(outcome.task_id) for outcome in failed[:_FAILURES_SHOWN])
        for outcome in failed[:_FAILURES_SHOWN]:
            kind = _failure_kind(outcome)
            lines.append(f"    {outcome.task_id:<{width}}  {kind:<12} {_cause(outcome)}")
        if len(failed) > _FAILURES_SHOWN:
            lines.append(f"    and {len(failed) - _FAILURES_SHOWN} more: see the outcomes")
    return lines


# -- the commands --------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While running, SIGTERM raises _Terminated, so the workers are stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers() -> None:
    """Stop procorch's warm workers now, deaf to a second Ctrl-C meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        shutdown()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(tally: _Tally, exc: KeyboardInterrupt, args: argparse.Namespace) -> int:
    """Say what an interruption left behind, and how to resume; the exit status."""
    counts = tally.counts()
    what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
    _say(
        f"procorch: {what}: {counts.finished} of {counts.total} steps had finished and "
        f"{counts.running} running were stopped; no outcomes were written"
    )
    if args.workflow_id is not None:
        _say(
            f"procorch: the finished steps are journaled in {args.journal!r}; run the same "
            "command again to resume where it stopped"
        )
    return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED


def _execute(
    executor: Any,
    specs: _Specs,
    on_event: Callable[[Event], None],
    args: argparse.Namespace,
) -> list[StepOutcome]:
    """execute_steps_parallel with the options' guards; its input errors become _BadInput."""
    guards = Guards(
        step_timeout=args.step_timeout,
        call_timeout=args.call_timeout,
        memory_limit=args.memory_limit,
        retry=_retry_policy(args),
        capture_output=args.capture_output,
    )
    if args.dask is not None:
        try:
            guards["backend"] = DaskBackend(args.dask)
        except ImportError as exc:
            raise _BadInput(str(exc)) from None
    try:
        if args.workflow_id is not None:
            return execute_steps_parallel_resumable(
                executor, specs.specs, args.workflow_id, args.journal, on_event, **guards
            )
        return execute_steps_parallel(executor, specs.specs, on_event, **guards)
    except (WorkflowLockedError, JournalError, ConnectionError) as exc:
        raise _BadInput(str(exc)) from None
    except InvalidSpecError as exc:
        raise _BadInput(
            f"{_source_name(args.specs)}:{specs.lines[exc.index]}: {exc.reason}"
        ) from None
    except ExecutorError as exc:
        raise _BadInput(f"executor {args.executor!r}: {exc}") from None


def _watched(
    executor: Any,
    specs: _Specs,
    args: argparse.Namespace,
    tally: _Tally,
    log: _EventLog | None,
    concurrency: int,
) -> list[StepOutcome]:
    """Run the steps with every event tallied (and logged) and, unless quiet, displayed."""
    display = None
    if not args.quiet:
        count = len(specs.specs)
        header = f"procorch: running {_count(count, 'step')}, {min(concurrency, count)} at a time"
        display = _Display(tally, sys.stderr, args.progress_interval, header)

    def on_event(event: Event) -> None:
        tally.record(event)
        if log is not None:
            log.write(event)
        if display is not None and not display.started:
            display.start()

    try:
        with _sigterm_unwinds():
            return _execute(executor, specs, on_event, args)
    finally:
        if display is not None:
            display.stop()


def _write_outcomes(output: IO[bytes], outcomes: list[StepOutcome], path: str) -> bool:
    """Write the outcomes as JSON Lines; False (with a message) if that failed."""
    try:
        output.write(_encode_json_lines(outcomes))
        output.flush()
    except OSError as exc:
        _say(f"procorch: cannot write outcomes to {path!r}: {exc.strerror or exc}")
        return False
    return True


def _run(args: argparse.Namespace) -> int:
    """``procorch run``: read, check, run, write, summarise; the exit status."""
    stdout = _claim_stdout() if "-" in (args.output, args.events) else None
    specs = _read_specs(args.specs, args.skip_bad_lines)
    executor = _load_executor(args.executor)
    concurrency = args.concurrency or _concurrency(executor, args.executor)
    if args.concurrency is not None:
        executor = _ConcurrencyOverride(executor, args.concurrency)
    with contextlib.ExitStack() as files:
        output = files.enter_context(_open_sink(args.output, "outcomes", stdout))
        log = None
        if args.events is not None:
            sink = files.enter_context(_open_sink(args.events, "events", stdout))
            log = _EventLog(sink, args.events)
        tally = _Tally(len(specs.specs))
        try:
            outcomes = _watched(executor, specs, args, tally, log, concurrency)
        except KeyboardInterrupt as exc:
            return _interrupted(tally, exc, args)
        finally:
            _stop_workers()
        if log is not None and log.problem is not None:
            _say(f"procorch: warning: {log.problem}")
        if not _write_outcomes(output, outcomes, args.output):
            return EXIT_FAILED
    if not args.quiet:
        for line in _summary(outcomes, tally, specs.skipped):
            _say(line)
    return EXIT_OK if all(outcome.success for outcome in outcomes) else EXIT_FAILED


def _demo() -> int:
    """``procorch demo``: the bundled batch."""
    from . import demo

    demo.main()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``procorch`` command with ``argv`` (default: sys.argv[1:]); the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo()
        _check_combinations(args)
        cwd = os.getcwd()
        if cwd not in sys.path:  # executors next to the specs import, in the workers too;
            sys.path.append(cwd)  # last, so that nothing installed is shadowed by it
        return _run(args)
    except _BadInput as exc:
        _say(f"procorch: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("procorch: interrupted")
        return EXIT_INTERRUPTED
