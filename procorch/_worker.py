"""The code that runs inside a worker process, and nothing else does.

A worker serves one lane. ``_init`` runs once when loky starts the process:
it keeps the lane's channel and points faulthandler at the lane's crash pipe,
so a fatal signal leaves a Python traceback the parent can read. ``run_step``
runs one step and reports it as frames on the channel (see ``_protocol``);
it never raises, whatever the executor does, so the only way a step fails
without an outcome frame is the death of the process.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
import msgspec

from ._model import AgentStepSpec, StepError, StepOutcome
from ._protocol import _Done, _encode, _Progress, _Started

_channel: Connection | None = None
_crash_channel: Connection | None = None
_executor_token: int | None = None
_executor: Any = None
_executor_error: BaseException | None = None
_decode_spec = msgspec.msgpack.Decoder(AgentStepSpec).decode
_decode_outcome = msgspec.msgpack.Decoder(StepOutcome).decode


def _init(channel: Connection, crash_channel: Connection) -> None:
    global _channel, _crash_channel
    _channel = channel
    _crash_channel = crash_channel  # kept referenced: its fd must stay open
    faulthandler.enable(file=crash_channel.fileno(), all_threads=False)


class _ChannelSink:
    """The event sink handed to the executor; closed once the step is over."""

    __slots__ = ("_lock", "_open")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True

    def emit(self, data: Any) -> None:
        try:
            frame = _encode(_Progress(data))
        except TypeError as exc:
            raise TypeError(f"event data must be encodable by msgspec: {exc}") from None
        with self._lock:
            if self._open:
                assert _channel is not None
                _channel.send_bytes(frame)

    def close_with(self, frame: bytes) -> None:
        """Send the step's last frame; later emits (from stray threads) are dropped."""
        with self._lock:
            self._open = False
            assert _channel is not None
            _channel.send_bytes(frame)


def _failure(
    spec: AgentStepSpec, kind: Any, message: str, exc: BaseException | None
) -> StepOutcome:
    error = StepError(
        kind=kind,
        message=message,
        exception_type=None if exc is None else type(exc).__qualname__,
        traceback=None if exc is None else "".join(traceback.format_exception(exc)),
        pid=os.getpid(),
    )
    return StepOutcome.failed(spec.task_id, spec.agent, message, error)


def _describe(spec: AgentStepSpec) -> str:
    return f"step {spec.task_id!r} (agent {spec.agent!r})"


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
    return result


def run_step(token: int, blob: bytes | None, spec_bytes: bytes) -> None:
    """Run one step and report it on the channel; never raises."""
    assert _channel is not None, "worker used before _init"
    _channel.send_bytes(_encode(_Started(os.getpid())))
    spec = _decode_spec(spec_bytes)
    sink = _ChannelSink()
    start = time.perf_counter()
    outcome = _run(spec, token, blob, sink)
    duration = time.perf_counter() - start
    try:
        _decode_outcome(_encode(outcome))  # the parent must be able to read it back
        frame = _encode(_Done(outcome, duration))
    except TypeError as exc:
        frame = _encode(
            _Done(
                _failure(
                    spec,
                    "serialization",
                    f"{_describe(spec)} returned an outcome that cannot be sent back: {exc}",
                    None,
                ),
                duration,
            )
        )
    except msgspec.ValidationError as exc:
        frame = _encode(
            _Done(
                _failure(
                    spec,
                    "invalid_result",
                    f"{_describe(spec)} returned a malformed StepOutcome: {exc}",
                    None,
                ),
                duration,
            )
        )
    sink.close_with(frame)
