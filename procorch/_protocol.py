"""The frames a worker writes on its lane's channel, and their codec.

Every frame names the step it concerns: ``step`` (the dispatch's index of
the step) and ``attempt`` (the attempt number it runs as). For every step
the worker writes ``Started``, then any number of ``Progress``, then
``Done``; instead of starting a step it may write ``Retire`` (naming the step
it declines), when it has grown too large to keep. The parent matches every
frame against what it sent the lane; a frame it did not expect, or cannot
decode, is a protocol fault (the lane is stopped, the step it concerns fails
saying so), never a guess. A pipe carries one writer's frames in order, and
a worker that dies mid-write can only spoil its own lane's channel, which
dies with it.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any

import msgspec

from ._messages import safe_text
from ._model import StepOutcome
from ._usage import StepUsage


class Started(msgspec.Struct, tag="s", array_like=True):
    """The worker begins ``step``; ``at`` is its ``time.monotonic()`` at that instant.

    On Linux and macOS that clock is the same for every process of the
    machine, so the parent counts a time limit from where the step ran,
    whenever it reads this frame.
    """

    step: int
    attempt: int
    pid: int
    at: float


class Progress(msgspec.Struct, tag="p", array_like=True):
    step: int
    attempt: int
    data: Any


class Done(msgspec.Struct, tag="d", array_like=True):
    """The step is over; ``duration`` and ``usage`` are measured in the worker."""

    step: int
    attempt: int
    outcome: StepOutcome
    duration: float
    usage: StepUsage | None = None


class Retire(msgspec.Struct, tag="r", array_like=True):
    """The worker grew past the call's recycle threshold and declines ``step`` and the rest."""

    step: int
    attempt: int
    rss: int


Frame = Started | Progress | Done | Retire

encode = msgspec.msgpack.Encoder().encode
decode_frame = msgspec.msgpack.Decoder(Frame).decode


def progress_frame(step: int, attempt: int, data: Any) -> bytes:
    """An event sink's frame for ``data``, or a TypeError naming the trouble."""
    try:
        return encode(Progress(step, attempt, data))
    except Exception as exc:  # TypeError, OverflowError, UnicodeEncodeError, RecursionError...
        raise TypeError(
            f"event data must be encodable by msgspec: {type(exc).__name__}: {safe_text(exc)}"
        ) from None


# The other way, on a lane's control pipe: the (step, attempt) whose soft
# time limit ran out, followed by SOFT_STOP_SIGNAL to the worker. A real-time
# signal, so that a step's own SIGUSR1 handler does not take it.
SOFT_STOP = struct.Struct("<II")
SOFT_STOP_SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR1

# On the pipe, each frame is its length (4 bytes, little-endian) then its bytes.
_LENGTH = struct.Struct("<I")
_READ_SIZE = 1 << 16


def framed(payload: bytes) -> bytes:
    """The frame as it travels: its length, then its bytes."""
    return _LENGTH.pack(len(payload)) + payload


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` (whole frames) to ``fd``, blocking until all of it is in the pipe."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_frame(fd: int, payload: bytes) -> None:
    """Write one frame to ``fd`` (blocking until all of it is in the pipe)."""
    write_all(fd, framed(payload))


# A step that floods its sink outruns the parent; whatever the pipe buffers
# is how late its events arrive. Linux's default 64 KiB holds ~5,000 small
# events: p99 latency 12 ms with two flooding steps. 8 KiB bounds it at about
# 5 ms (p99), for ~20 % of peak event throughput (still ~370,000 a second),
# and dispatch is unaffected: frames are read in one gulp all the same.
_PIPE_BYTES = 8 * 1024
_F_SETPIPE_SZ = 1031  # Linux's fcntl command; elsewhere pipes keep their size


def _shrink_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError):
        pass


class FrameReader:
    """Reads whole frames from a pipe without ever blocking.

    The parent reads whatever the pipe holds in 64 KiB gulps (one system call
    for hundreds of small frames) and keeps a frame cut short by its
    writer's death in the buffer, where it is simply never completed.
    """

    __slots__ = ("_buffer", "_fd", "eof")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        _shrink_pipe(fd)
        self._fd = fd
        self._buffer = bytearray()
        self.eof = False  # every writer is gone

    def read(self) -> list[bytes]:
        """The complete frames available now, in order."""
        while not self.eof:
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
            if len(chunk) < _READ_SIZE:
                break
        frames = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]
        return frames
