"""The command line: ``procorch run`` a batch of specs from a file or a stream, ``procorch demo``.

Data flow of ``procorch run EXECUTOR SPECS``::

    EXECUTOR --import--> executor      (--concurrency wraps it in _ConcurrencyOverride)
    checks: the executor and the guards (the engine's own), --dask's scheduler, the journal;
            a specs file is read whole, line by line, before any step starts
    SPECS --SpecReader thread, line by line--> Run --> the step lifecycle (worker processes)
    outcomes --> OrderedOutcomes --> FILE.<random>.part, renamed to FILE at the end
    events --> Tally (read by the Display's thread), the events file, the job log
    steps' standard output and error --> OutputRelay --> above the progress line
    summary --> standard error; exit status 0 / 1 / 2 / 130 / 143

- Nothing read from a file is unpickled: specs are decoded by msgspec straight
  into :class:`AgentStepSpec`, which rejects a line with its field at fault.
- Descriptors 1 and 2 point at the relay's pipe from before any user code
  runs (the executor's module, the workers started later), so what steps
  print never reaches standard output, whose JSON Lines go through a private
  descriptor, and never tears the progress line (see ``_cli_console``).
- Every failure to start is one line and exit status 2; once steps run, what
  finished is kept, whatever stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import IO, Any, NamedTuple, NoReturn

from ._call import Guards, prepare_call
from ._cli_console import Console, Display, OutputRelay, Tally, count, summary
from ._cli_input import BadLine, SpecReader, SpecSource, UnusableInput, decoded
from ._cli_output import EventLog, JobLog, OrderedOutcomes, OutcomeFile, UnwritableOutput
from ._cli_run import Run
from ._dask import DaskBackend, cluster_threads, ship_executor_module
from ._errors import ExecutorError, JournalError, WorkflowLockedError
from ._events import Event, EventSink
from ._executor import DEFAULT_MAX_PARALLEL_TASKS, AgentExecutor
from ._guards import CancelToken, RetryableKind, RetryPolicy
from ._journal import SqliteStore, WorkflowJournal, spec_digest
from ._model import AgentStepSpec, StepOutcome
from ._pool import shutdown
from ._report import ReportSink, write_report
from ._sandbox import Sandbox

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # some step failed
EXIT_USAGE = 2  # bad usage or bad input; no step started
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

_RETRYABLE: tuple[RetryableKind, ...] = ("exception", "crash", "timeout", "memory")
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# Steps taken in per unit of concurrency and not yet written out (as stream_steps_parallel).
_WINDOW_PER_SLOT = 256
_DASK_PROBE_SECONDS = 3.0

_MISSING = object()


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
  0    every step succeeded (or, with --dry-run, everything checked out)
  1    some step failed, or the run was halted (or the outcomes could not be written)
  2    bad usage or bad input; no step was started (on standard input: a bad line
       stops the run there, and the outcomes of the steps before it are written)
  130  interrupted (Ctrl-C): running steps were stopped, finished outcomes written
       (143 for SIGTERM)"""

_RUN_DESCRIPTION = """\
Run every spec of SPECS with EXECUTOR in worker processes and write one outcome
per spec as JSON Lines, in input order, each as soon as it and those before it
are final.

EXECUTOR is an import path, package.module:attribute, naming a class (created
with no arguments), a function returning an executor, or an executor instance;
it must have an execute_step(spec, events) method. The current directory is
searched first, as with python -m.

SPECS is a JSON Lines file (- for standard input), one spec per line:
  {"task_id": "a", "agent": "counter", "description": "count", "prompt": "one two"}
with optional "max_steps", "parent_session_id" and "output_schema". Blank lines
are ignored. A file is checked whole before any step starts: a line that is not
a spec, or repeats a task_id, stops the command there, naming the line and the
field at fault. Standard input that is a pipe is read as the steps run, each
spec starting as its line arrives (tail -f specs.jsonl | procorch run ...)."""

_RUN_EPILOG = f"""\
With -o FILE, outcomes go to FILE.<random>.part beside it, renamed to FILE when
the run ends, however it ends: an interrupted run keeps every outcome that was
final, and an earlier FILE is untouched by a run that fails to start.

A progress line shows on standard error: redrawn in place on a terminal, a
plain line every --progress-interval seconds otherwise. Whatever the steps
print goes to standard error, above the progress line, never to standard
output. The summary at the end counts the failures by kind (an outcome's
error.kind: exception, crash, timeout, memory...; unsuccessful when the
executor itself returned success false), and names the slowest steps and the
first failures.

{_EXIT_STATUS}

examples:
  procorch run mypkg.agents:Executor specs.jsonl -o outcomes.jsonl
  procorch run mypkg.agents:Executor - -j 8 --step-timeout 60 --memory-limit 2G < specs.jsonl
  procorch run mypkg.agents:make_executor specs.jsonl --attempts 3 --retry-on crash,timeout \\
      --events events.jsonl --joblog jobs.tsv --report run.html -o outcomes.jsonl
  procorch report events.jsonl -o run.html    # the same report, drawn again later
  tail -f specs.jsonl | procorch run mypkg.agents:Executor - --unordered -o outcomes.jsonl"""


class _Parser(argparse.ArgumentParser):
    """argparse, saying a usage error in one line (the usage itself only when nothing was given)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            super().error(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    """The ``procorch`` parser and its subcommands."""
    from . import __version__

    parser = _Parser(
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
    report = commands.add_parser(
        "report",
        help="draw the run report of an events file written by 'procorch run --events'",
        description="Write the run report (the page 'procorch run --report' writes) of "
        "the events in EVENTS, a JSON Lines file written by 'procorch run --events': a "
        "past run drawn again. The same events give the same page, byte for byte.",
    )
    report.add_argument("events_file", metavar="EVENTS", help="the events file (JSON Lines)")
    report.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        required=True,
        help="write the report (HTML) here",
    )
    report.add_argument(
        "--title", default="procorch run", help="the page's title (default: procorch run)"
    )
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
        "--unordered",
        action="store_true",
        help="write each outcome as soon as its step ends, instead of in input order",
    )
    files.add_argument(
        "--joblog",
        metavar="FILE",
        help="write one tab-separated line per step as it ends: index, task_id, agent, "
        "start (Unix time), duration, attempts, result (ok or the failure's kind), pid",
    )
    files.add_argument(
        "--report",
        metavar="FILE",
        help="write a run report here when the run ends: one self-contained HTML page with "
        "a timeline of every step attempt by worker, the concurrency over time, failures "
        "by kind, the slowest steps, the largest memory users and the totals (the same "
        "page as 'procorch report' draws from the --events file)",
    )
    files.add_argument(
        "--dry-run",
        action="store_true",
        help="check the specs, the executor and the options (and the journal and the "
        "Dask scheduler, if given), then exit without running any step",
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
        help="run at most N steps at once (default: the executor's concurrency_hint(); "
        "with --dask, the cluster's worker threads when the run starts)",
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
    guards.add_argument(
        "--timeout-grace",
        metavar="SECONDS",
        type=_seconds,
        help="at --step-timeout, raise procorch.StepTimeout in the step first and kill its "
        "worker only if it still runs this much later",
    )
    sandbox = run.add_argument_group(
        "sandbox (limits per step, all off by default; each breach fails its step with the "
        "limit's kind)"
    )
    sandbox.add_argument(
        "--cpu-seconds", metavar="SECONDS", type=_seconds, help="CPU time a step may use"
    )
    sandbox.add_argument(
        "--open-files", metavar="N", type=_at_least_one, help="files a step may have open at once"
    )
    sandbox.add_argument(
        "--max-processes",
        metavar="N",
        type=_at_least_one,
        help="processes a step may have running at once, itself excluded",
    )
    sandbox.add_argument(
        "--file-size",
        metavar="SIZE",
        type=_parse_size,
        help="how large any file a step writes may grow: 512M, 2G or bytes",
    )
    sandbox.add_argument(
        "--no-network",
        action="store_true",
        help="run each step with no network at all, loopback included (needs root or user "
        "namespaces; refused before any step starts where unavailable)",
    )
    sandbox.add_argument(
        "--scratch-dir",
        action="store_true",
        help="start each step in a fresh private directory (also its TMPDIR), removed after",
    )
    sandbox.add_argument(
        "--env-clear",
        action="store_true",
        help="give steps an empty environment (plus the --env variables)",
    )
    sandbox.add_argument(
        "--env",
        metavar="KEY=VALUE",
        action="append",
        type=_env_entry,
        default=[],
        help="set a variable in the steps' environment (repeatable; with --env-clear, "
        "the only ones they see)",
    )
    guards.add_argument(
        "--halt-on-failure",
        metavar="N",
        type=_at_least_one,
        help="stop the run after N failed steps: running steps are stopped and the rest "
        "never start, each failing as cancelled",
    )
    where = run.add_argument_group("where the steps run")
    where.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the steps on the Dask cluster whose scheduler is at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786) instead of local worker processes; needs the dask extra. "
        "The executor's module is sent to the workers with the executor, unless it is "
        "installed; the modules it imports must be installed there",
    )
    where.add_argument(
        "--dask-tls-ca-file",
        metavar="PATH",
        help="with a tls:// --dask ADDRESS: the CA certificate(s) to trust, in PEM format",
    )
    where.add_argument(
        "--dask-tls-cert",
        metavar="PATH",
        help="with a tls:// --dask ADDRESS: this client's certificate, in PEM format",
    )
    where.add_argument(
        "--dask-tls-key",
        metavar="PATH",
        help="with a tls:// --dask ADDRESS: this client's private key, in PEM format "
        "(if not in the --dask-tls-cert file)",
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
        help="the SQLite file holding the journal (created if absent, removed once no "
        "workflow in it has steps to resume; needs --workflow-id)",
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
    tls = [args.dask_tls_ca_file, args.dask_tls_cert, args.dask_tls_key]
    if any(tls) and (args.dask is None or not args.dask.startswith("tls://")):
        parser.error("the --dask-tls-* options need --dask with a tls:// address")
    if args.dask is not None and args.dask.startswith("tls://"):
        if not (args.dask_tls_ca_file and args.dask_tls_cert):
            parser.error(
                "--dask with a tls:// address needs --dask-tls-ca-file and --dask-tls-cert "
                "(and --dask-tls-key if the key is not in the certificate's file)"
            )
    if args.dask is not None:
        if args.memory_limit is not None:
            parser.error(
                "--memory-limit is not available with --dask: set the Dask workers' own "
                "memory limit instead"
            )
        sandboxed = _sandbox(args) is not None or args.timeout_grace is not None
        if sandboxed:
            parser.error(
                "the sandbox options and --timeout-grace are not available with --dask: "
                "they are enforced by procorch's local workers"
            )
        if args.capture_output:
            parser.error(
                "--capture-output is not available with --dask: the Dask workers' own logs "
                "keep what steps print"
            )
    if args.output == "-" and args.events == "-":
        parser.error("--output and --events cannot both be standard output")
    if args.joblog == "-":
        parser.error("--joblog needs a file (standard output carries the outcomes or events)")
    if args.report == "-":
        parser.error("--report needs a file (standard output carries the outcomes or events)")
    files = {
        "--output": args.output,
        "--events": args.events,
        "--joblog": args.joblog,
        "--report": args.report,
    }
    named = [(option, path) for option, path in files.items() if path not in (None, "-")]
    for number, (option, path) in enumerate(named):
        for other, other_path in named[number + 1 :]:
            if _same_file(path, other_path):
                parser.error(f"{option} and {other} name the same file ({path!r})")


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


# -- the run --------------------------------------------------------------------------


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


async def _identify(address: str, security: Any) -> None:
    import asyncio

    from distributed.core import rpc

    connection_args = security.get_connection_args("client") if security is not None else {}
    scheduler = rpc(  # type: ignore[no-untyped-call]
        address, timeout=_DASK_PROBE_SECONDS, connection_args=connection_args
    )
    try:
        # Connecting gives up after the probe's time; a server that is no Dask scheduler
        # never answers, and is given as long again.
        await asyncio.wait_for(scheduler.identity(), 2 * _DASK_PROBE_SECONDS)
    finally:
        await scheduler.close_rpc()  # type: ignore[no-untyped-call]


def _dask_security(args: argparse.Namespace) -> Any:
    """The ``distributed.Security`` the --dask-tls-* options ask for, or None (no TLS)."""
    if not args.dask_tls_ca_file:
        return None
    import distributed

    for path in (args.dask_tls_ca_file, args.dask_tls_cert, args.dask_tls_key):
        if path is not None and not os.path.isfile(path):
            raise _BadInput(f"cannot read the TLS file {path!r}: no such file")
    return distributed.Security(  # type: ignore[no-untyped-call]
        tls_ca_file=args.dask_tls_ca_file,
        tls_client_cert=args.dask_tls_cert,
        tls_client_key=args.dask_tls_key,
        require_encryption=True,
    )


def _dask_client(address: str, security: Any = None) -> Any:
    """A client of the scheduler at ``address``, or _BadInput within seconds if it does not answer.

    A probe asks the scheduler who it is before a Client is made: a Client
    that fails to connect waits out its timeout once more when it is
    collected, and says so on standard error.
    """
    try:
        import distributed
    except ImportError:
        raise _BadInput("--dask needs the dask extra: pip install 'procorch[dask]'") from None
    import asyncio  # only to probe a Dask scheduler: a plain run never needs it

    try:
        asyncio.run(_identify(address, security))
    except (TimeoutError, OSError, ValueError, TypeError) as exc:
        reason = str(exc) or f"no answer in {2 * _DASK_PROBE_SECONDS:g} s (is it a Dask scheduler?)"
        raise _BadInput(f"cannot reach the Dask scheduler at {address!r}: {reason}") from None
    try:
        return distributed.Client(
            address,
            timeout=f"{_DASK_PROBE_SECONDS * 2:g}s",
            set_as_default=False,
            security=security,
        )  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise _BadInput(f"cannot reach the Dask scheduler at {address!r}: {exc}") from None


def _guards(args: argparse.Namespace, cancel: CancelToken | None, client: Any) -> Guards:
    guards = Guards(
        step_timeout=args.step_timeout,
        call_timeout=args.call_timeout,
        memory_limit=args.memory_limit,
        retry=_retry_policy(args),
        capture_output=args.capture_output,
        cancel=cancel,
        sandbox=_sandbox(args),
        timeout_grace=args.timeout_grace,
    )
    if client is not None:
        guards["backend"] = DaskBackend(client)
    return guards


def _sandbox(args: argparse.Namespace) -> Sandbox | None:
    """The Sandbox the options ask for, or None when none of them is given."""
    env: dict[str, str] | None = None
    if args.env_clear or args.env:
        env = {} if args.env_clear else dict(os.environ)
        env.update(dict(args.env))
    fields: dict[str, Any] = {
        "cpu_seconds": args.cpu_seconds,
        "open_files": args.open_files,
        "processes": args.max_processes,
        "file_size": args.file_size,
        "env": env,
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    if args.no_network:
        fields["network"] = False
    if args.scratch_dir:
        fields["scratch_dir"] = True
    return Sandbox(**fields) if fields else None


def _env_entry(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (got {text!r})")
    return name, value


def _prepare(executor: Any, on_event: Callable[[Event], None], guards: Guards, path: str) -> Any:
    """The engine's checks of the executor and the guards, as _BadInput."""
    try:
        return prepare_call(executor, on_event, guards)
    except ExecutorError as exc:
        raise _BadInput(f"executor {path!r}: {exc}") from None
    except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: an unenforceable sandbox
        raise _BadInput(str(exc)) from None


def _open_journal(args: argparse.Namespace) -> WorkflowJournal:
    try:
        return SqliteStore(args.journal).open_workflow(args.workflow_id)
    except (WorkflowLockedError, JournalError) as exc:
        raise _BadInput(str(exc)) from None


class _Checked(NamedTuple):
    """What reading the whole input found: specs to run, journaled ones, bad lines skipped."""

    to_run: int
    reused: int
    skipped: int


def _check_input(
    source: SpecSource,
    skip_bad_lines: bool,
    done: dict[str, tuple[str, StepOutcome]],
    say: Callable[[str], None],
) -> _Checked:
    """Read every line before any step starts: a bad one is _BadInput (or skipped, and said)."""
    to_run = reused = skipped = 0
    try:
        for item in decoded(source.lines()):
            if isinstance(item, BadLine):
                where = f"{source.name}:{item.number}: {item.problem}"
                if not skip_bad_lines:
                    raise _BadInput(where)
                say(f"procorch: skipping {where}")
                skipped += 1
                continue
            stored = done.get(item.spec.task_id)
            if stored is not None and stored[0] == spec_digest(item.spec):
                reused += 1
            else:
                to_run += 1
    except UnusableInput as exc:
        raise _BadInput(str(exc)) from None
    return _Checked(to_run, reused, skipped)


def _open_log(
    path: str, what: str, stdout: IO[bytes] | None, stack: contextlib.ExitStack
) -> IO[bytes]:
    """A log file, truncated now (the run is about to start); ``-``: the claimed standard output.

    A file is closed with the stack; standard output by ``main``, which ignores a closed pipe.
    """
    if path == "-":
        assert stdout is not None
        return stdout
    try:
        return stack.enter_context(open(path, "wb"))
    except OSError as exc:
        raise _BadInput(f"cannot write {what} to {path!r}: {exc.strerror or exc}") from None


def _header(
    args: argparse.Namespace, checked: _Checked | None, concurrency: int, source: str
) -> str:
    if checked is None:
        return f"procorch: running the steps of {source} as they arrive, {concurrency} at a time"
    header = (
        f"procorch: running {count(checked.to_run, 'step')}, "
        f"{max(1, min(concurrency, checked.to_run))} at a time"
    )
    if checked.reused:
        header += f" ({checked.reused} already done, from the journal)"
    return header


def _dry_run(args: argparse.Namespace, checked: _Checked, concurrency: int, source: str) -> str:
    text = (
        f"procorch: dry run: {count(checked.to_run + checked.reused, 'spec')} of {source} "
        f"are valid and {args.executor} loads; they would run {concurrency} at a time"
    )
    if checked.reused:
        text += f" ({checked.reused} already done, from the journal)"
    return text + "; nothing was run"


def _run(args: argparse.Namespace, console: Console, stdout: IO[bytes] | None) -> int:
    """``procorch run``: check, then run while reading and writing; the exit status."""
    say = console.say
    listeners: list[Callable[[Event], None]] = []

    def on_event(event: Event) -> None:
        for listener in listeners:
            listener(event)

    with contextlib.ExitStack() as stack:
        try:
            source = SpecSource.open(args.specs)
        except UnusableInput as exc:
            raise _BadInput(str(exc)) from None
        stack.callback(source.close)
        executor = _load_executor(args.executor)
        client = None
        if args.dask is not None:
            ship_executor_module(args.executor.partition(":")[0], executor)
            client = _dask_client(args.dask, _dask_security(args))
            stack.callback(client.close)
        concurrency = (
            args.concurrency
            or (cluster_threads(client) if client is not None else None)
            or _concurrency(executor, args.executor)
        )
        if args.concurrency is not None or client is not None:
            executor = _ConcurrencyOverride(executor, concurrency)
        cancel = CancelToken() if args.halt_on_failure is not None else None
        call = _prepare(executor, on_event, _guards(args, cancel, client), args.executor)
        journal: WorkflowJournal | None = None
        done: dict[str, tuple[str, StepOutcome]] = {}
        if args.workflow_id is not None:
            journal = _open_journal(args)
            stack.callback(journal.close)
            done = journal.completed()
        checked = None
        if source.rereadable or args.dry_run:
            checked = _check_input(source, args.skip_bad_lines, done, say)
        if args.dry_run:
            assert checked is not None
            say(_dry_run(args, checked, concurrency, source.name))
            return EXIT_OK
        try:
            output = OutcomeFile.open(args.output, stdout)
        except UnwritableOutput as exc:
            raise _BadInput(str(exc)) from None
        committed = False

        def keep_outcomes() -> None:
            if not committed:
                output.discard()

        stack.callback(keep_outcomes)
        log = joblog = None
        if args.events is not None:
            log = EventLog(_open_log(args.events, "events", stdout, stack), args.events)
            listeners.append(log.write)
        if args.joblog is not None:
            joblog = JobLog(_open_log(args.joblog, "the job log", None, stack), args.joblog)
            listeners.append(joblog.event)
        if args.report is not None:
            report = ReportSink()
            listeners.append(report)
            stack.callback(_write_run_report, report, args.report, say)
        tally = Tally(None if checked is None else checked.to_run, 0)
        listeners.insert(0, tally.event)
        writer = OrderedOutcomes(output, ordered=not args.unordered)
        # A checked file repeats no task_id, but with --skip-bad-lines the run must skip
        # the same repeats the check did; a stream is looked at only with a journal.
        repeats = args.skip_bad_lines if checked is not None else journal is not None
        reader = SpecReader(source, duplicates=repeats)
        run = Run(
            call,
            reader,
            writer,
            tally,
            slots=concurrency if checked is None else max(1, min(concurrency, checked.to_run)),
            window=_WINDOW_PER_SLOT * concurrency,
            journal=journal,
            done=done,
            joblog=joblog,
            halt_after=args.halt_on_failure,
            cancel=cancel,
            bad_lines=(
                "skip" if checked is not None else "warn" if args.skip_bad_lines else "stop"
            ),
            say=say,
            source_name=source.name,
        )
        display = None if args.quiet else Display(tally, console, args.progress_interval)
        if not args.quiet:
            say(_header(args, checked, concurrency, source.name))
        try:
            with _sigterm_unwinds():
                reader.start()
                if display is not None:
                    display.start()
                run.run()
                if run.halted and checked is not None:
                    run.cancel_the_rest()
        except KeyboardInterrupt as exc:
            if display is not None:
                display.stop()
            _stop_workers()
            committed = _keep_what_finished(writer, output, say)
            return _interrupted(console, tally, writer, output, exc, args)
        except UnwritableOutput as exc:
            say(f"procorch: {exc}")
            return EXIT_FAILED
        except JournalError as exc:  # the journal failed under the run (a full disk, say)
            committed = _keep_what_finished(writer, output, say)
            say(f"procorch: {exc}; the run stopped, {count(writer.written, 'outcome')} written")
            return EXIT_FAILED
        finally:
            if display is not None:
                display.stop()
            _stop_workers()
        try:
            output.commit()
        except OSError as exc:
            say(f"procorch: cannot write outcomes to {args.output!r}: {exc.strerror or exc}")
            return EXIT_FAILED
        committed = True
        tally.reused = writer.written - tally.counts().finished
        finished = run.all_succeeded and run.stopped_by is None and not run.halted
        if journal is not None and finished:
            try:
                journal.finish()
            except JournalError as exc:
                say(f"procorch: warning: {exc}")
        for problem in (log.problem if log else None, joblog.problem if joblog else None):
            if problem is not None:
                say(f"procorch: warning: {problem}")
        notes = []
        if run.halted:
            notes.append(
                f"halted after {count(run.failures, 'failed step')} "
                f"(--halt-on-failure {args.halt_on_failure}): "
                f"{count(tally.kinds['cancelled'], 'step')} cancelled"
            )
            if checked is None:
                notes.append(f"{source.name} was not read past line {run.last_line}")
        if not args.quiet:
            for line in summary(tally, run.skipped + (checked.skipped if checked else 0), notes):
                say(line)
        if run.stopped_by is not None:
            say(
                f"procorch: {run.stopped_by} (the run stopped there; outcomes written: "
                f"{writer.written})"
            )
            return EXIT_USAGE
        return EXIT_OK if run.all_succeeded else EXIT_FAILED


def _write_run_report(report: ReportSink, path: str, say: Callable[[str], None]) -> None:
    """``--report``: written when the run ends, however it ends (a warning if it cannot be)."""
    try:
        report.write(path)
    except OSError as exc:
        say(f"procorch: warning: cannot write the report to {path!r}: {exc.strerror or exc}")


def _keep_what_finished(
    writer: OrderedOutcomes, output: OutcomeFile, say: Callable[[str], None]
) -> bool:
    """Write the final outcomes still waiting for an earlier one, and put the file in place."""
    try:
        writer.write_waiting()
        output.commit()
    except (UnwritableOutput, OSError) as exc:
        say(f"procorch: {exc}")
        return False
    return True


def _interrupted(
    console: Console,
    tally: Tally,
    writer: OrderedOutcomes,
    output: OutcomeFile,
    exc: KeyboardInterrupt,
    args: argparse.Namespace,
) -> int:
    """Say what an interruption left behind, and how to resume; the exit status."""
    counts = tally.counts()
    what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
    of = "" if counts.total is None else f" of {counts.total}"
    console.say(
        f"procorch: {what}: {counts.finished}{of} steps had finished and {counts.running} "
        f"running were stopped; {count(writer.written, 'outcome')} written to {output.where}"
    )
    if args.workflow_id is not None:
        console.say(
            f"procorch: the finished steps are journaled in {args.journal!r}; run the same "
            "command again to resume where it stopped"
        )
    return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED


def _report(args: argparse.Namespace) -> int:
    """``procorch report EVENTS -o FILE``."""
    try:
        write_report(args.output, args.events_file, title=args.title)
    except FileNotFoundError:
        print(f"procorch: no events file {args.events_file!r}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"procorch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"procorch: cannot write the report: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _demo() -> int:
    """``procorch demo``: the bundled batch."""
    from . import demo

    demo.main()
    return EXIT_OK


def _search_current_directory_first() -> None:
    """Put the current directory first on sys.path, as ``python -m`` does (workers inherit it)."""
    cwd = os.getcwd()
    if sys.path and sys.path[0] == cwd:
        return
    sys.path[:] = [cwd, *(entry for entry in sys.path if entry not in ("", cwd))]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``procorch`` command with ``argv`` (default: sys.argv[1:]); the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo()
    if args.command == "report":
        return _report(args)
    _check_combinations(args)
    _search_current_directory_first()
    console = Console(os.dup(2))
    try:
        stdout = os.fdopen(os.dup(1), "wb") if "-" in (args.output, args.events) else None
    except OSError as exc:
        console.say(f"procorch: standard output is not usable: {exc.strerror or exc}")
        return EXIT_USAGE
    relay = OutputRelay(console)
    try:
        return _run(args, console, stdout)
    except _BadInput as exc:
        console.say(f"procorch: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.say("procorch: interrupted")
        return EXIT_INTERRUPTED
    finally:
        relay.close()
        if stdout is not None:
            with contextlib.suppress(OSError):
                stdout.close()
        console.close()
