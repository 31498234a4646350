"""The code that runs inside a worker process, and nothing else does.

A worker serves one lane. ``_init`` runs once when loky starts the process:
it makes the worker the leader of a new process group (so everything a step
starts can be killed with it), keeps the lane's channel, and points
faulthandler at the lane's crash pipe, so a fatal signal leaves a Python
traceback the parent can read. ``run_steps`` runs a chunk of steps one after
the other and reports each as frames on the channel (see ``_protocol``); it
never raises, whatever the executor does, so the only way a started step ends
without an outcome frame is the death of the process.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
import loky.process_executor
import msgspec

from ._context import PACKAGE_DIR, prepare_worker
from ._model import AgentStepSpec, ErrorKind, StepError, StepOutcome, _describe
from ._protocol import (
    _Done,
    _encode,
    _progress_frame,
    _read_tail,
    _Retire,
    _Started,
    _tree_rss,
    _write_frame,
)
from ._schema import structured_violation

_channel: Connection | None = None
_crash_channel: Connection | None = None
_capture_fd: int | None = None  # the lane's capture file, once opened
_saved_std_fds: tuple[int, int] | None = None  # fds 1 and 2 from before capture
_capture_path: str = ""
_executor_token: int | None = None
_executor: Any = None
_executor_error: BaseException | None = None
_retired = False  # this worker grew too large and takes no more steps
_loop: asyncio.AbstractEventLoop | None = None  # made on the first async step
_decode_spec = msgspec.msgpack.Decoder(AgentStepSpec).decode
_decode_outcome = msgspec.msgpack.Decoder(StepOutcome).decode


def _init(
    channel: Connection, crash_channel: Connection, capture_path: str, package_dir: str
) -> None:
    global _channel, _crash_channel, _capture_path
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


def _capture(on: bool) -> None:
    """Point fds 1 and 2 at the lane's capture file, emptied, or back where they were."""
    global _capture_fd, _saved_std_fds
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    if on:
        if _capture_fd is None:
            _capture_fd = os.open(_capture_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if _saved_std_fds is None:
            _saved_std_fds = (os.dup(1), os.dup(2))
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
    _write_frame(_channel.fileno(), frame)


class _ChannelSink:
    """The event sink handed to the executor; closed once the step is over."""

    __slots__ = ("_lock", "_open")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True

    def emit(self, data: Any) -> None:
        frame = _progress_frame(data)
        with self._lock:
            if self._open:
                _send(frame)

    def close_with(self, frame: bytes) -> None:
        """Send the step's last frame; later emits (from stray threads) are dropped."""
        with self._lock:
            self._open = False
            _send(frame)


def _failure(
    spec: AgentStepSpec, kind: ErrorKind, message: str, exc: BaseException | None
) -> StepOutcome:
    error = StepError(
        kind=kind,
        message=message,
        exception_type=None if exc is None else type(exc).__qualname__,
        traceback=None if exc is None else "".join(traceback.format_exception(exc)),
        pid=os.getpid(),
    )
    return StepOutcome.failed(spec.task_id, spec.agent, message, error)


def _event_loop() -> asyncio.AbstractEventLoop:
    """The worker's own event loop, for executors whose execute_step is a coroutine."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


def _load_executor(token: int, blob: bytes | None) -> Any:
    """The call's executor, unpickled on the first step of each call only."""
    global _executor_token, _executor, _executor_error
    if token != _executor_token:
        _executor, _executor_error, _executor_token = None, None, token
        try:
            if blob is None:  # the parent believed this worker had it: a bug
                raise RuntimeError("the executor was never sent to this worker")
            _executor = cloudpickle.loads(blob)
        except BaseException as exc:
            _executor_error = exc
    if _executor_error is not None:
        raise _executor_error
    return _executor


def _run(spec: AgentStepSpec, token: int, blob: bytes | None, sink: _ChannelSink) -> StepOutcome:
    try:
        executor = _load_executor(token, blob)
    except BaseException as exc:
        return _failure(
            spec,
            "serialization",
            f"{_describe(spec)} did not run: its executor could not be rebuilt in "
            f"the worker process: {type(exc).__name__}: {exc}",
            exc,
        )
    try:
        result = executor.execute_step(spec, sink)
        if inspect.iscoroutine(result):
            result = _event_loop().run_until_complete(result)
    except BaseException as exc:
        return _failure(
            spec, "exception", f"{_describe(spec)} raised {type(exc).__name__}: {exc}", exc
        )
    if not isinstance(result, StepOutcome):
        return _failure(
            spec,
            "invalid_result",
            f"{_describe(spec)} returned {type(result).__name__}, not a StepOutcome",
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
                f"{_describe(spec)} returned structured output that does not match its "
                f"output_schema: {problem}",
                None,
            )
    return result


def _done_frame(spec: AgentStepSpec, outcome: StepOutcome, duration: float) -> bytes:
    """The step's outcome as a frame the parent can read, or a failure saying why not."""
    try:
        _decode_outcome(_encode(outcome))
        return _encode(_Done(outcome, duration))
    except TypeError as exc:
        kind: ErrorKind = "serialization"
        message = f"{_describe(spec)} returned an outcome that cannot be sent back: {exc}"
    except msgspec.ValidationError as exc:
        kind = "invalid_result"
        message = f"{_describe(spec)} returned a malformed StepOutcome: {exc}"
    return _encode(_Done(_failure(spec, kind, message, None), duration))


def run_steps(
    token: int,
    blob: bytes | None,
    chunk: list[bytes],
    capture: bool,
    retire_above: int | None,
) -> None:
    """Run a chunk of steps in order, reporting each on the channel; never raises.

    With ``retire_above``, the worker checks its memory before each step and
    stops taking steps once it (with its children) holds more than that: it
    writes ``_Retire`` and the parent replaces it, failing nothing.
    """
    global _retired
    assert _channel is not None, "worker used before _init"
    if not capture:
        _capture(False)
    for spec_bytes in chunk:
        if retire_above is not None and not _retired:
            _retired = _tree_rss(os.getpid()) > retire_above
        if _retired:
            _send(_encode(_Retire(_tree_rss(os.getpid()))))
            return
        if capture:
            _capture(True)
        _send(_encode(_Started(os.getpid())))
        spec = _decode_spec(spec_bytes)
        sink = _ChannelSink()
        start = time.perf_counter()
        outcome = _run(spec, token, blob, sink)
        duration = time.perf_counter() - start
        blob = None  # unpickled with the first step; the rest reuse it
        if capture and outcome.error is not None:
            outcome = _with_printed(outcome)
        sink.close_with(_done_frame(spec, outcome, duration))


def _with_printed(outcome: StepOutcome) -> StepOutcome:
    """The failed outcome with the end of what its step printed."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    assert outcome.error is not None
    error = msgspec.structs.replace(outcome.error, printed=_read_tail(_capture_path))
    return msgspec.structs.replace(outcome, error=error)
