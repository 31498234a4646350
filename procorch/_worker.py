"""The code that runs inside a worker process, and nothing else does.

A worker serves one lane. ``_init`` runs once when loky starts the process:
it makes the worker the leader of a new process group (so everything a step
starts can be killed with it), keeps the lane's channel, and points
faulthandler at the lane's crash pipe, so a fatal signal leaves a Python
traceback the parent can read. ``run_steps`` runs a chunk of steps one after
the other and reports each as frames on the channel, every frame naming its
step and attempt (see ``_protocol``). Whatever the executor does, and
whatever goes wrong turning its result, its exception or its printed output
into a report (a user ``__str__`` that raises, an int beyond 64 bits, a lone
surrogate, a list that contains itself), the step ends in a ``Done`` frame
with a labelled failure and the worker goes on with the next step; the only
way a started step ends without one is the death of the process, or a step
that broke the channel itself.
"""

from __future__ import annotations

import faulthandler
import inspect
import os
import signal
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import cloudpickle
import loky.process_executor
import msgspec

from . import _messages
from ._capture import read_tail
from ._containment import StepContainment
from ._context import PACKAGE_DIR, prepare_worker
from ._errors import StepTimeout
from ._inbox import Apart, InboxStream, open_stream
from ._messages import safe_text
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome
from ._procinfo import memory_over, rss, tree_pids
from ._protocol import (
    LARGE_FRAME,
    SOFT_STOP,
    SOFT_STOP_SIGNAL,
    Done,
    NextOut,
    RawOutcome,
    Retire,
    Started,
    encode,
    frame_parts,
    framed,
    progress_frame,
    write_all,
    write_frame,
    write_parts,
)
from ._sandbox import Sandbox, StepJail
from ._schema import structured_violation
from ._usage import StepUsage, UsageMeter

if TYPE_CHECKING:
    import asyncio

_channel: Connection | None = None
_crash_channel: Connection | None = None
_capture_fd: int | None = None  # the lane's capture file, once opened
_saved_std_fds: tuple[int, int] | None = None  # fds 1 and 2 from before capture
_capture_path: str = ""
_containment: StepContainment | None = None  # set by _init
_control: Connection | None = None  # the parent's soft time limits arrive here
_inbox: Connection | None = None  # large calls arrive here, beside their chunk (see _inbox)
_current: tuple[int, int] | None = None  # (step, attempt) while the executor runs it
_running: tuple[int, int] | None = None  # (step, attempt) of the step run_steps is on
_raised: BaseException | None = None  # what the current step raised, if anything
_retired = False  # this worker grew too large and takes no more steps
_loop: asyncio.AbstractEventLoop | None = None  # made on the first async step
_meter: UsageMeter | None = None  # made on the first step: its /proc files are this process's
_spec_decoder = msgspec.msgpack.Decoder(AgentStepSpec).decode
# The wire bytes of the step each thread runs: procorch's own runners
# (ProcessPool's calls, map's items) carry their pickled call there, as raw
# bytes beside the spec (see _payload). Per thread, for Dask's threaded workers.
_step_wire = threading.local()
_decode_outcome = msgspec.msgpack.Decoder(StepOutcome).decode


def _decode_spec(spec_bytes: bytes) -> AgentStepSpec:
    """The step's spec; its wire bytes stay with this thread for ``take_step_bytes``."""
    spec = _spec_decoder(spec_bytes)
    _step_wire.data = spec_bytes
    return spec


def take_step_bytes() -> bytes:
    """The wire bytes of the step this thread runs, once (then forgotten: they may be large)."""
    data: bytes = getattr(_step_wire, "data", b"")
    _step_wire.data = b""
    return data


def take_step_stream() -> InboxStream | None:
    """The inbox stream of the step this thread runs, if its call travels apart (once)."""
    stream: InboxStream | None = getattr(_step_wire, "stream", None)
    _step_wire.stream = None
    return stream


def _init(
    channel: Connection,
    crash_channel: Connection,
    capture_path: str,
    package_dir: str,
    cgroup_path: str | None,
    control: Connection,
    inbox: Connection | None = None,
) -> None:
    global _channel, _crash_channel, _capture_path, _containment, _control, _inbox
    if os.path.realpath(package_dir) != os.path.realpath(PACKAGE_DIR):
        # Another procorch than the caller's would speak another protocol.
        os.write(
            crash_channel.fileno(),
            f"procorch in this worker is {PACKAGE_DIR}, not the caller's {package_dir}\n".encode(),
        )
        os._exit(70)
    # loky recycles a worker whose memory grew by 300 MB (when psutil is
    # present); a respawned worker would find its lane's pipes gone, so
    # lanes opt out: procorch replaces workers itself (see the memory cap).
    loky.process_executor._MAX_MEMORY_LEAK_SIZE = 2**62
    os.setpgid(0, 0)
    prepare_worker()
    _channel = channel
    _crash_channel = crash_channel  # kept referenced: its fd must stay open
    _capture_path = capture_path
    faulthandler.enable(file=crash_channel.fileno(), all_threads=False)
    _containment = StepContainment(cgroup_path)
    _control = control
    _inbox = inbox
    os.set_blocking(control.fileno(), False)
    signal.signal(SOFT_STOP_SIGNAL, _on_soft_stop)


def _flush_std_streams() -> None:
    """Flush Python's stdout and stderr, whatever a step did to them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # closed, replaced by an object whose flush raises...
            pass


def _repair_std_streams() -> None:
    """Give the next step working ``sys.stdout``/``sys.stderr`` if a step closed or dropped them."""
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is None or stdout.closed:
        sys.stdout = _reopen(1, stdout)
    if stderr is None or stderr.closed:
        sys.stderr = _reopen(2, stderr)


def _reopen(fd: int, stream: Any) -> Any:
    try:
        return open(fd, "w", buffering=1, closefd=False)
    except OSError:
        return stream


def _capture(on: bool) -> None:
    """Point fds 1 and 2 at the lane's capture file, emptied, or back where they were."""
    global _capture_fd, _saved_std_fds
    _flush_std_streams()
    if on:
        if _capture_fd is None:
            _capture_fd = os.open(_capture_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if _saved_std_fds is None:
            _saved_std_fds = (os.dup(1), os.dup(2))
        # Every step: the one before may have closed or moved fds 1 and 2.
        os.dup2(_capture_fd, 1)
        os.dup2(_capture_fd, 2)
        os.ftruncate(_capture_fd, 0)
    elif _saved_std_fds is not None:
        os.dup2(_saved_std_fds[0], 1)
        os.dup2(_saved_std_fds[1], 2)
        for fd in _saved_std_fds:
            os.close(fd)
        _saved_std_fds = None


def _send(frame: bytes) -> None:
    assert _channel is not None, "worker used before _init"
    write_frame(_channel.fileno(), frame)


class _ChannelSink:
    """The event sink handed to the executor for one step; closed once the step is over."""

    __slots__ = ("_attempt", "_lock", "_open", "_step")

    def __init__(self, step: int, attempt: int) -> None:
        self._step = step
        self._attempt = attempt
        self._lock = threading.Lock()
        self._open = True

    def emit(self, data: Any) -> None:
        frame = progress_frame(self._step, self._attempt, data)
        with self._lock:
            if self._open:
                _send(frame)

    def close(self) -> None:
        """The step is over: later emits (from stray threads) are dropped."""
        with self._lock:
            self._open = False


def _failure(
    spec: AgentStepSpec, kind: ErrorKind, message: str, exc: BaseException | None
) -> StepOutcome:
    """A failed outcome that always encodes: every text in it is made safe."""
    tb = None
    if exc is not None:
        try:
            tb = safe_text("".join(traceback.format_exception(exc)))
        except BaseException as format_error:  # a pathological exception object
            tb = f"(the traceback could not be formatted: {type(format_error).__name__})"
    error = StepError(
        kind=kind,
        message=safe_text(message),
        exception_type=None if exc is None else safe_text(type(exc).__qualname__),
        traceback=tb,
        pid=os.getpid(),
    )
    return StepOutcome.failed(safe_text(spec.task_id), safe_text(spec.agent), error.message, error)


def _event_loop() -> asyncio.AbstractEventLoop:
    """The worker's own event loop, for executors whose execute_step is a coroutine."""
    global _loop
    if _loop is None or _loop.is_closed():
        import asyncio  # on the first async step: most executors never need it

        _loop = asyncio.new_event_loop()
    return _loop


class _Built:
    """One call's executor in a worker, or why it could not be rebuilt; ready once built."""

    __slots__ = ("error", "executor", "ready")

    def __init__(self) -> None:
        self.executor: Any = None
        self.error: BaseException | None = None
        self.ready = threading.Event()


class _ExecutorCache:
    """The executors of the calls this process serves, by call token.

    A lane's worker serves one call at a time; a Dask worker with several
    threads serves steps of several calls at once, on any of its threads. So
    each call's executor is kept under its own token (a random id per call:
    two callers cannot share one), unpickled once per process by the first
    thread that needs it while the others wait for it, and the last few are
    kept, least recently used first out. A larger ``size`` keeps more idle
    callers' executors in memory; a smaller one makes more than ``size``
    concurrent callers on one worker unpickle theirs again, now and then.

    The lanes' case, the same token step after step, takes no lock.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._built: OrderedDict[str, _Built] = OrderedDict()
        self._last: tuple[str, _Built] | None = None  # read without the lock

    def get(self, token: str, blob: bytes | None) -> _Built:
        last = self._last
        if last is not None and last[0] == token and last[1].ready.is_set():
            return last[1]
        with self._lock:
            built = self._built.get(token)
            mine = built is None
            if built is None:
                built = self._built[token] = _Built()
                while len(self._built) > self._size:
                    self._built.popitem(last=False)
            else:
                self._built.move_to_end(token)
        if mine:
            try:
                if blob is None:  # the parent believed this worker had it: a bug
                    raise RuntimeError("the executor was never sent to this worker")
                built.executor = cloudpickle.loads(blob)
            except BaseException as exc:
                built.error = exc
            finally:
                built.ready.set()
        else:
            built.ready.wait()
        self._last = (token, built)
        return built


# Enough for a few callers at once on one Dask worker; each kept executor
# holds its memory until pushed out.
_EXECUTORS_KEPT = 8
_executors = _ExecutorCache(_EXECUTORS_KEPT)


def _load_executor(token: str, blob: bytes | None) -> _Built:
    """The call's executor, unpickled on its first step in this process only.

    An executor that cannot be rebuilt fails every step of the call with the
    same error; it is kept as that error, never re-raised (a re-raised
    exception would grow its traceback with every step).
    """
    return _executors.get(token, blob)


def _run(spec: AgentStepSpec, token: str, blob: bytes | None, sink: Any) -> StepOutcome:
    built = _load_executor(token, blob)
    if built.error is not None:
        return _failure(
            spec,
            "serialization",
            _messages.executor_not_rebuilt(spec, built.error),
            built.error,
        )
    executor = built.executor
    global _current
    try:
        _current = _running
        result = executor.execute_step(spec, sink)
        if inspect.iscoroutine(result):
            result = _event_loop().run_until_complete(result)
        _current = None
    except BaseException as exc:
        _current = None
        global _raised
        _raised = exc
        try:
            str(exc)
        except BaseException as why:  # its own report cannot be made: say so, with both types
            return _failure(spec, "serialization", _messages.unprintable(spec, exc, why), exc)
        return _failure(spec, "exception", _messages.raised(spec, exc), exc)
    if not isinstance(result, StepOutcome):
        return _failure(
            spec,
            "invalid_result",
            _messages.not_an_outcome(spec, result),
            None,
        )
    if spec.output_schema is not None and result.success:
        problem = (
            "it has no structured output"
            if result.structured is None
            else structured_violation(spec.output_schema, result.structured)
        )
        if problem is not None:
            return _failure(
                spec,
                "invalid_result",
                _messages.structured_mismatch(spec, problem),
                None,
            )
    return result


class _DoneCheck(msgspec.Struct, tag="d", array_like=True):
    step: int
    attempt: int
    outcome: RawOutcome  # structured left raw: never decoded here
    duration: float


_check_done = msgspec.msgpack.Decoder(_DoneCheck).decode


def done_frame(
    spec: AgentStepSpec,
    step: int,
    attempt: int,
    outcome: StepOutcome,
    duration: float,
    usage: StepUsage | None = None,
) -> bytes:
    """The step's ``Done`` frame, encoded once; a failure naming the field at fault if the
    parent could not read the outcome back.

    The check decodes every field the parent validates but leaves ``structured``
    (``Any`` to the parent: any encodable value decodes) as a view into the
    frame, so a 100 MB result costs one encode, not an encode, a decode and a
    second encode. Never raises.
    """
    try:
        payload = encode(Done(step, attempt, outcome, duration, usage))
        _check_done(payload)
        return payload
    except msgspec.ValidationError:
        # Rare: say it exactly as the parent's decoder would of the outcome alone.
        try:
            _decode_outcome(encode(outcome))
            return payload  # the parent's own decoder is the judge
        except msgspec.ValidationError as exc:
            problem: StepOutcome = _failure(
                spec, "invalid_result", _messages.malformed_outcome(spec, exc), None
            )
        except BaseException as exc:
            problem = _unsendable(spec, outcome, exc)
    except BaseException as exc:  # TypeError, OverflowError, UnicodeEncodeError, RecursionError...
        problem = _unsendable(spec, outcome, exc)
    return encode(Done(step, attempt, problem, duration, usage))


# Where a large bytes result goes in its Done frame: the frame is encoded around
# this mark (msgpack bin 8 of 16 bytes), then written as pieces with the result
# in the middle, so the result is never copied into the frame.
_SPLICE_MARK = b"\xc4\x10procorch-splice\0"
_BIN32 = struct.Struct(">BI")  # msgpack bin 32: 0xc6, then the length, big-endian
_FRAME_LENGTH = struct.Struct("<I")


class ResultPieces:
    """A pickled result as the pieces its pickler wrote, never joined: ``size`` bytes in all.

    ``ProcessPool``'s runner returns one in place of ``bytes`` on a lane when
    the pickle is large (``_payload.pickled_result``): a large ``bytes``
    inside the result is one of the pieces, the caller's own object, so the
    result goes from the step's object to the pipe without a copy.
    ``done_parts`` writes the pieces in its frame; nothing else may see it.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list[Any], size: int) -> None:
        self.pieces = pieces
        self.size = size

    def joined(self) -> bytes:
        return b"".join(self.pieces)


def on_a_lane() -> bool:
    """Whether this process is a lane's worker (its Done frames are written by ``done_parts``)."""
    return _inbox is not None


def done_parts(
    spec: AgentStepSpec,
    step: int,
    attempt: int,
    outcome: StepOutcome,
    duration: float,
    usage: StepUsage | None = None,
) -> list[bytes]:
    """The step's ``Done`` frame as pieces to write in order (see ``done_frame``).

    A ``bytes`` result over ``LARGE_FRAME``, or a ``ResultPieces`` (a
    ProcessPool call's pickled result), is written as it is, between the
    pieces of the frame: the frame is encoded with a 16-byte mark in its
    place and written around it, one copy fewer than encoding it into the
    frame. Never raises.
    """
    structured = outcome.structured
    pieces = None
    if type(structured) is ResultPieces:
        pieces, length = structured.pieces, structured.size
    elif type(structured) is bytes:
        pieces, length = [structured], len(structured)
    if pieces is not None and LARGE_FRAME < length < 2**32 - 2**16:
        marked = msgspec.structs.replace(outcome, structured=_SPLICE_MARK[2:])
        head = done_frame(spec, step, attempt, marked, duration, usage)
        at = head.find(_SPLICE_MARK)
        if at >= 0 and head.find(_SPLICE_MARK, at + 1) < 0:  # else: replaced by a failure
            before = head[:at] + _BIN32.pack(0xC6, length)
            after = head[at + len(_SPLICE_MARK) :]
            size = len(before) + length + len(after)
            return [_FRAME_LENGTH.pack(size) + before, *pieces, after]
    if type(structured) is ResultPieces:
        outcome = msgspec.structs.replace(outcome, structured=structured.joined())
    return frame_parts(done_frame(spec, step, attempt, outcome, duration, usage))


def _unsendable(spec: AgentStepSpec, outcome: StepOutcome, exc: BaseException) -> StepOutcome:
    try:
        message = _messages.unsendable_outcome(spec, _unsendable_field(outcome), exc)
        return _failure(spec, "serialization", message, None)
    except BaseException as why:
        return _failure(spec, "serialization", _messages.unreportable(spec, why), why)


def _unsendable_field(outcome: StepOutcome) -> str | None:
    for field in outcome.__struct_fields__:
        try:
            encode(getattr(outcome, field))
        except Exception:
            return field
    return None


def run_step(
    spec: AgentStepSpec, token: str, blob: bytes | None, sink: Any
) -> tuple[StepOutcome, float]:
    """Run one step; its outcome and its duration (``done_frame`` checks it can be sent).

    Never raises: any failure, the executor's or one while turning its result
    into a report, is the step's labelled failure.
    """
    start = time.perf_counter()
    try:
        outcome = _run(spec, token, blob, sink)
    except BaseException as exc:  # e.g. a RecursionError while formatting a report
        outcome = _failure(
            spec,
            "serialization",
            _messages.unreportable(spec, exc),
            exc,
        )
    return outcome, time.perf_counter() - start


def run_steps(
    token: str,
    blob: bytes | None,
    chunk: Sequence[tuple[int, int, bytes | Apart]],
    capture: bool,
    retire_above: int | None,
    sandbox: Sandbox | None = None,
    measure: bool = True,
) -> None:
    """Run a chunk of (step, attempt, spec bytes) in order, reporting each on the channel.

    With ``sandbox``, each step runs inside its limits (see ``_sandbox``).
    With ``measure``, each step's ``Done`` carries its usage (see ``_usage``).

    With ``retire_above``, the worker checks its memory before each step and
    stops taking steps once it (with its children) holds more than that: it
    writes ``Retire`` and the parent replaces it, failing nothing. Raises only
    when the channel itself is broken (a step closed it, say): then nothing
    more can be reported and the parent stops the lane.
    """
    assert _channel is not None, "worker used before _init"
    fd = _channel.fileno()
    if not capture:
        _capture(False)
    # A step's Done travels with the next step's Started, in one frame (a
    # Next) and one write: the next step starts microseconds later, and a
    # write costs the worker about 2 us, a frame the parent about as much.
    # Nothing of a step runs before its Started is written, so no Done waits
    # on user code; the chunk's last Done goes out before the call returns.
    unsent: list[bytes] = []  # the Done of the step just run, in framed pieces to write
    pid = os.getpid()
    try:
        for step, attempt, spec_bytes in chunk:
            if not _start(fd, pid, step, attempt, retire_above, unsent):
                return
            if capture:
                _capture(True)
            _run_one(token, blob, step, attempt, spec_bytes, capture, sandbox, unsent, measure)
            blob = None  # unpickled with the first step; the rest reuse it
    finally:
        if unsent:
            write_parts(fd, unsent)
            unsent.clear()


def _start(
    fd: int, pid: int, step: int, attempt: int, retire_above: int | None, unsent: list[bytes]
) -> bool:
    """Write the last step's Done and this one's Started; or Retire, and False."""
    global _retired
    if retire_above is not None and not _retired:
        _retired = memory_over(tree_pids(pid), retire_above) is not None
    if _retired:
        unsent.append(framed(encode(Retire(step, attempt, rss(tree_pids(pid))))))
        write_parts(fd, unsent)
        unsent.clear()
        return False
    _repair_std_streams()
    if not unsent:
        write_all(fd, framed(encode(Started(step, attempt, pid, time.monotonic()))))
        return True
    if len(unsent) == 1:  # the common case, a small Done (one framed piece): one Next, one write
        done = msgspec.Raw(unsent.pop()[_FRAME_LENGTH.size :])
        write_all(fd, framed(encode(NextOut(done, step, attempt, pid, time.monotonic()))))
        return True
    # A large Done travels apart, in its pieces (never joined), then Started.
    unsent.append(framed(encode(Started(step, attempt, pid, time.monotonic()))))
    write_parts(fd, unsent)
    unsent.clear()
    return True


def _run_one(
    token: str,
    blob: bytes | None,
    step: int,
    attempt: int,
    spec_bytes: bytes | Apart,
    capture: bool,
    sandbox: Sandbox | None,
    unsent: list[bytes],
    measure: bool = True,
) -> None:
    global _raised, _running, _meter
    stream = None
    if type(spec_bytes) is Apart:  # its call comes on the inbox, after our Started
        stream = _step_wire.stream = open_stream(
            None if _inbox is None else _inbox.fileno(), step, attempt
        )
        spec_bytes = spec_bytes.spec
    spec = _decode_spec(spec_bytes)  # type: ignore[arg-type]
    sink = _ChannelSink(step, attempt)
    _running = (step, attempt)
    _raised = None
    meter = None
    if measure:
        meter = _meter = _meter or UsageMeter()
        meter.begin()
    if sandbox is None:
        outcome, duration = run_step(spec, token, blob, sink)
    else:
        outcome, duration = _run_jailed(spec, token, blob, sink, sandbox)
    _raised = None
    if stream is not None:
        _step_wire.stream = None
        stream.finish()  # what the step left unread: the next stream starts after it
    assert _containment is not None
    _containment.clean_up()  # nothing the step started outlives it
    # After the clean-up: the children it reaped count as the step's.
    usage = None if meter is None else meter.end(duration)
    if capture and outcome.error is not None:
        outcome = _with_printed(outcome)
    sink.close()
    unsent.extend(done_parts(spec, step, attempt, outcome, duration, usage))


def _on_soft_stop(signum: int, frame: Any) -> None:
    """The parent says a step's time limit ran out: raise StepTimeout in it, if it still runs."""
    assert _control is not None
    try:
        data = os.read(_control.fileno(), 4096)
    except (BlockingIOError, OSError):
        return
    whole = len(data) - len(data) % SOFT_STOP.size
    targets = {SOFT_STOP.unpack_from(data, offset) for offset in range(0, whole, SOFT_STOP.size)}
    if _current is not None and _current in targets:
        raise StepTimeout("the step's time limit ran out")


def _run_jailed(
    spec: AgentStepSpec, token: str, blob: bytes | None, sink: Any, sandbox: Sandbox
) -> tuple[StepOutcome, float]:
    """``run_step`` inside the sandbox; a step that ran into one of its limits fails naming it."""
    jail = StepJail(sandbox)
    try:
        jail.enter()
    except OSError as exc:
        jail.leave()
        message = _messages.sandbox_failed(spec, exc)
        return _failure(spec, "internal", message, exc), 0.0
    try:
        outcome, duration = run_step(spec, token, blob, sink)
    finally:
        jail.leave()
    breach = jail.breach(_raised) if outcome.error is not None else None
    if breach is not None:
        kind, words = breach
        message = _messages.sandbox_breach(spec, words, _raised)
        failure = _failure(spec, kind, message, _raised)  # type: ignore[arg-type]
        assert failure.error is not None
        error = msgspec.structs.replace(failure.error, limit=jail.limit_of(kind))
        outcome = msgspec.structs.replace(failure, error=error)
    return outcome, duration


def _with_printed(outcome: StepOutcome) -> StepOutcome:
    """The failed outcome with the end of what its step printed."""
    _flush_std_streams()
    assert outcome.error is not None
    error = msgspec.structs.replace(outcome.error, printed=read_tail(_capture_path))
    return msgspec.structs.replace(outcome, error=error)
