"""The frames a worker writes on its lane's channel, and their codec.

Every frame names the step it concerns: ``step`` (the dispatch's index of
the step) and ``attempt`` (the attempt number it runs as). For every step
the worker writes ``Started``, then any number of ``Progress``, then
``Done``; instead of starting a step it may write ``Retire`` (naming the step
it declines), when it has grown too large to keep. Between two steps of a
chunk, the first one's ``Done`` and the next one's ``Started`` travel as one
``Next`` frame (the ``Done`` inside names its own step and attempt), read
exactly as the two frames it replaces: one encode, one write and one decode
where there were two. The parent matches every
frame against what it sent the lane; a frame it did not expect, or cannot
decode, is a protocol fault (the lane is stopped, the step it concerns fails
saying so), never a guess. A pipe carries one writer's frames in order, and
a worker that dies mid-write can only spoil its own lane's channel, which
dies with it.

Frames are never tracked by the garbage collector (``gc=False``): they hold
no cycles (a decoded value is a tree), and two of them per step would
otherwise feed the collections that a call of many quick steps pays for.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any

import msgspec

from ._messages import safe_text
from ._model import StepError, StepOutcome
from ._usage import StepUsage


class Started(msgspec.Struct, tag="s", array_like=True, gc=False):
    """The worker begins ``step``; ``at`` is its ``time.monotonic()`` at that instant.

    On Linux and macOS that clock is the same for every process of the
    machine, so the parent counts a time limit from where the step ran,
    whenever it reads this frame.
    """

    step: int
    attempt: int
    pid: int
    at: float


class Progress(msgspec.Struct, tag="p", array_like=True, gc=False):
    step: int
    attempt: int
    data: Any


class Done(msgspec.Struct, tag="d", array_like=True, gc=False):
    """The step is over; ``duration`` and ``usage`` are measured in the worker."""

    step: int
    attempt: int
    outcome: StepOutcome
    duration: float
    usage: StepUsage | None = None


class Retire(msgspec.Struct, tag="r", array_like=True, gc=False):
    """The worker grew past the call's recycle threshold and declines ``step`` and the rest."""

    step: int
    attempt: int
    rss: int


class Next(msgspec.Struct, tag="n", array_like=True, gc=False):
    """Step ``done.step`` is over and ``step`` begins: its ``Done`` and the next ``Started``.

    The worker's one frame between two steps of a chunk: a ``Done`` (naming
    its own step and attempt) and the fields of the next step's ``Started``.
    The parent reads it exactly as the two frames it replaces, in that order.
    """

    done: Done
    step: int
    attempt: int
    pid: int
    at: float


class NextOut(msgspec.Struct, tag="n", array_like=True, gc=False):
    """``Next`` as the worker writes it: the ``Done`` already encoded (and checked)."""

    done: msgspec.Raw
    step: int
    attempt: int
    pid: int
    at: float


Frame = Started | Progress | Done | Retire | Next

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
# A frame larger than this travels apart: the worker writes its header and
# its payload without joining them, and the parent reads it straight into
# one buffer of its final size, with the pipe grown while it is in flight.
LARGE_FRAME = _READ_SIZE
# A step's Started and Done, outcome included, are about 70 bytes with short
# texts; a lane whose frames go over this sends outputs or events worth
# reading as they come (see ``FrameReader.loud``).
QUIET_FRAME = 1024


def framed(payload: bytes) -> bytes:
    """The frame as it travels: its length, then its bytes."""
    return _LENGTH.pack(len(payload)) + payload


def frame_parts(payload: bytes) -> list[bytes]:
    """The frame as pieces to write in order: one for a small frame, header and payload else."""
    if len(payload) <= LARGE_FRAME:
        return [framed(payload)]
    return [_LENGTH.pack(len(payload)), payload]


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` (whole frames) to ``fd``, blocking until all of it is in the pipe."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_parts(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` one after the other in one system call where it can, never joining them."""
    if len(parts) == 1:
        write_all(fd, parts[0])
        return
    written = os.writev(fd, parts)
    for part in parts:  # a signal or a full pipe may cut a writev short: finish piece by piece
        if written >= len(part):
            written -= len(part)
            continue
        write_all(fd, memoryview(part)[written:])  # type: ignore[arg-type]
        written = 0


def write_frame(fd: int, payload: bytes) -> None:
    """Write one frame to ``fd`` (blocking until all of it is in the pipe)."""
    write_parts(fd, frame_parts(payload))


# A step that floods its sink outruns the parent; whatever the pipe buffers
# is how late its events arrive. Linux's default 64 KiB holds ~5,000 small
# events: p99 latency 12 ms with two flooding steps. 8 KiB bounds it at about
# 5 ms (p99), for ~20 % of peak event throughput (still ~370,000 a second),
# and dispatch is unaffected: frames are read in one gulp all the same.
# While a large frame is in flight the parent grows the pipe (one system
# call per MiB instead of per 8 KiB) and shrinks it back once it is read.
PIPE_BYTES = 8 * 1024
_LARGE_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size for a user
_F_SETPIPE_SZ = 1031  # Linux's fcntl commands; elsewhere pipes keep their size
_F_GETPIPE_SZ = 1032


def _set_pipe_size(fd: int, size: int) -> bool:
    """Resize the pipe; False where it cannot be (not Linux, or busier than ``size``)."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except (ImportError, OSError):
        return False
    return True


def pipe_size(fd: int) -> int | None:
    """The pipe's buffer size in bytes (None where it cannot be read)."""
    try:
        import fcntl

        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except (ImportError, OSError):
        return None


Decode = Any  # a callable taking a buffer and returning a frame


class RawOutcome(msgspec.Struct, omit_defaults=True, gc=False):
    """``StepOutcome`` with ``structured`` left raw: a view into the frame's buffer.

    Also what the worker decodes its own ``Done`` as, to check that the
    parent can read it back, without decoding the result.
    """

    task_id: str
    session_id: str
    agent: str
    output: str
    success: bool
    structured: msgspec.Raw = msgspec.Raw(b"")
    error: StepError | None = None


class _RawDone(msgspec.Struct, tag="d", array_like=True, gc=False):
    step: int
    attempt: int
    outcome: RawOutcome
    duration: float
    usage: StepUsage | None = None


_decode_raw_done = msgspec.msgpack.Decoder(_RawDone).decode
_decode_view = msgspec.msgpack.Decoder(memoryview).decode
_decode_any = msgspec.msgpack.Decoder().decode
_DONE_TAG = b"\xa1d"  # a Done frame's first field, after its array header
_BIN = frozenset({0xC4, 0xC5, 0xC6})  # msgpack bin 8, 16, 32


def decode_large_done(buffer: bytearray) -> Done | None:
    """A large frame that is a ``Done`` whose result is ``bytes``, with that result a
    ``memoryview`` into ``buffer`` (no copy); None for any other frame.

    For ``ProcessPool``, which unpickles its calls' results straight from the
    frame (see ``FrameReader.read``). Raises what decoding raises.
    """
    if buffer[1:3] != _DONE_TAG:
        return None
    frame = _decode_raw_done(buffer)
    raw = frame.outcome.structured
    with memoryview(raw) as view:
        if not view or view[0] not in _BIN:
            return None
    got = frame.outcome
    structured = _decode_view(raw)
    outcome = StepOutcome(
        got.task_id, got.session_id, got.agent, got.output, got.success, structured, got.error
    )
    return Done(frame.step, frame.attempt, outcome, frame.duration, frame.usage)


class FrameReader:
    """Reads whole frames from a pipe without ever blocking, and decodes them.

    The parent reads whatever the pipe holds in 64 KiB gulps (one system call
    for hundreds of small frames) and decodes each frame straight from that
    buffer. A frame larger than ``LARGE_FRAME`` is read into one buffer of its
    own size (no copies on the way), with the pipe grown to 1 MiB while it is
    in flight and set back to 8 KiB once it is read. A frame cut short by its
    writer's death stays in the buffer, where it is simply never completed.
    """

    __slots__ = ("_buffer", "_decode", "_fd", "_filled", "_grown", "_large", "eof", "fd", "loud")

    def __init__(self, fd: int, decode: Decode = None) -> None:
        os.set_blocking(fd, False)
        _set_pipe_size(fd, PIPE_BYTES)
        self._fd = self.fd = fd
        self._decode = decode_frame if decode is None else decode
        self._buffer = bytearray()
        self._large: bytearray | None = None  # a large frame being read, and how far
        self._filled = 0
        self._grown = False  # the pipe is larger than PIPE_BYTES
        self.eof = False  # every writer is gone
        # A frame over QUIET_FRAME was read since the owner last cleared this:
        # its lane sends more than a step's few bytes, so it is kept watched.
        self.loud = False

    @property
    def pipe_grown(self) -> bool:
        """Whether the pipe is larger than its 8 KiB right now (a large frame in flight)."""
        return self._grown

    def read(self, views: bool = False) -> tuple[list[Any], Exception | None]:
        """The complete frames available now, decoded, in order; and a decode error, if any.

        Frames after one that cannot be decoded are not read: the channel
        cannot be trusted past it. With ``views``, a large frame's ``bytes``
        result is a ``memoryview`` into the buffer the frame was read into,
        not a copy of it (``decode_large_done``).
        """
        frames: list[Any] = []
        fd = self._fd
        try:
            while not self.eof:
                large = self._large
                if large is not None:
                    try:
                        count = os.readv(fd, [memoryview(large)[self._filled :]])
                    except BlockingIOError:
                        break
                    if not count:
                        self.eof = True
                        break
                    self._filled += count
                    if self._filled == len(large):
                        self._large = None
                        done = decode_large_done(large) if views else None
                        frames.append(self._decode(large) if done is None else done)
                    continue
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    break
                if not chunk:
                    self.eof = True
                    break
                self._buffer += chunk
                self._split(frames)
                if len(chunk) < _READ_SIZE and self._large is None:
                    break
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return frames, exc
        if self._grown and self._large is None:
            self._grown = not _set_pipe_size(fd, PIPE_BYTES)  # busy: try again next time
        return frames, None

    def _split(self, frames: list[Any]) -> None:
        """Decode the buffer's complete frames; start reading a large one apart."""
        buffer = self._buffer
        decode = self._decode
        start = 0
        size_of = _LENGTH.unpack_from
        header = _LENGTH.size
        end_of_data = len(buffer)
        try:
            with memoryview(buffer) as view:
                while end_of_data - start >= header:
                    (size,) = size_of(buffer, start)
                    end = start + header + size
                    if end > end_of_data:
                        if size > QUIET_FRAME:
                            self.loud = True
                        if size > LARGE_FRAME:
                            large = bytearray(size)
                            have = end_of_data - start - header
                            large[:have] = view[start + header :]
                            self._large, self._filled = large, have
                            start = end_of_data
                            if not self._grown:
                                self._grown = _set_pipe_size(self._fd, _LARGE_PIPE_BYTES)
                        break
                    if size > QUIET_FRAME:
                        self.loud = True
                    frames.append(decode(view[start + header : end]))
                    start = end
        finally:
            del buffer[:start]
