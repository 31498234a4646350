"""A lane's inbox: large calls travel beside their chunk, pickled straight into a pipe.

A ``ProcessPool`` call whose pickle is larger than ``LARGE_CALL`` does not
travel inside its chunk (loky would pickle the chunk, copying the call once
more, then push it through a 64 KiB pipe and unpickle it into a third copy).
The chunk carries only its small spec, marked ``Apart``; the call itself is
pickled by the lane's writer thread straight into the lane's inbox pipe
(1 MiB), and the worker unpickles it straight from there::

    parent: submit --> ApartWire (the small spec + a reference to the call; nothing pickled kept)
            lane.submit --> chunk [.., (step, attempt, Apart(spec)), ..] --> loky --> worker
                        \\-> InboxWriter thread: header(step, attempt), then the call,
                            pickled in pieces [length, bytes]..., then an end mark
    worker: run_steps: Started(step) written, then open_stream(step, attempt) checks the
            header names that step; the executor unpickles the call from the stream
            (the large bytes land in their final object: one copy); the rest is drained

- **Identity.** Every stream names its step and attempt, and the worker reads
  it for the step it has just announced: a stream that names another is a
  protocol fault (the worker's call raises, the parent fails that step).
- **Crashes.** The stream is read after ``Started``, so a worker killed
  mid-transfer is a crash of exactly that step; the writer thread meets a
  broken pipe and drops the lane's other streams (those steps never began
  and are sent again elsewhere, re-pickled from the call). The parent never
  blocks on the inbox: only the lane's writer thread writes to it.
- **Memory.** The parent keeps the call, not its pickle: a big ``bytes``
  argument goes from the caller's object to the pipe without a copy
  (pickle protocol 5 hands it to ``write`` as is). Submitting checks that the
  call pickles (into a sink that only counts bytes past ``LARGE_CALL``) and
  the writer pickles it again when it is sent, as the standard library's
  pool pickles at sending time; a call whose pickling fails then fails as
  ``serialization``, alone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import threading
from typing import Any

import cloudpickle

__all__ = [
    "LARGE_CALL",
    "Apart",
    "ApartWire",
    "CallNotSentError",
    "InboxError",
    "InboxStream",
    "InboxWriter",
    "open_stream",
]

LARGE_CALL = 1 << 20
"""A pickled call larger than this travels apart on the lane's inbox.

Below it, the call goes in its chunk: one pickle copy more than apart, but
no thread hop; at 1 MiB that copy costs about 0.3 ms.
"""

_HEADER = struct.Struct("<II")  # step, attempt
_PIECE = struct.Struct("<Q")  # then pieces: their length, then their bytes
_END = 2**64 - 1  # a piece length that ends the stream: the call was sent whole
_ABORTED = 2**64 - 2  # ends it too: pickling failed, a piece with the reason follows
_INBOX_PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size for a user


class ApartWire(bytes):
    """The wire bytes of a call that travels apart: the spec alone, and the call, not pickled.

    The bytes are what the step's chunk carries (``CarrierSpec`` without its
    payload, made by ``_payload.call_wire``); the lane's ``InboxWriter``
    pickles ``call`` into the inbox when the step is sent, so the parent
    never holds the pickle. A retry sends it again the same way.
    """

    call: object


class Apart:
    """A chunk's entry for a step whose call travels on the lane's inbox: its spec only."""

    __slots__ = ("spec",)

    def __init__(self, spec: bytes) -> None:
        self.spec = spec

    def __reduce__(self) -> tuple[type[Apart], tuple[bytes]]:
        return Apart, (self.spec,)


class InboxError(RuntimeError):
    """The lane's inbox does not carry what the worker expects: a protocol fault."""


class _PieceWriter:
    """The file a pickler writes to: each ``write`` becomes a piece on the pipe."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B")) if not isinstance(data, bytes) else len(data)
        _write_all(self._fd, [_PIECE.pack(size), data])
        return size


def _write_all(fd: int, parts: list[Any]) -> None:
    """Write ``parts`` in order, blocking until all of them are in the pipe."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class InboxWriter:
    """The parent's end of a lane's inbox, and the thread that writes every stream to it.

    ``send`` queues a call and returns at once; the thread (started on the
    first ``send``) pickles each call into the pipe in order, blocking on the
    pipe as the worker reads. A broken pipe (the worker died) ends the
    thread: the streams still queued were for steps that never began. The
    write end belongs to the thread once it runs; ``close`` lets it finish.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[tuple[int, int, object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the thread now, if it is not running (RuntimeError where no thread may start:
        Python 3.12 at interpreter exit)."""
        if self._thread is not None or self._closed:
            return
        thread = threading.Thread(target=self._serve, name="procorch-inbox-writer", daemon=True)
        thread.start()
        self._thread = thread
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.fcntl(self._fd, 1031, _INBOX_PIPE_BYTES)  # F_SETPIPE_SZ

    def send(self, step: int, attempt: int, call: object) -> None:
        """Queue ``call`` for the worker's step ``(step, attempt)``, after those queued before."""
        if self._closed:
            return
        self.start()
        self._queue.put((step, attempt, call))

    def close(self) -> None:
        """No more streams: the thread ends once it has written (or failed to write) the rest."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            os.close(self._fd)
        else:
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (True: ended, or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _serve(self) -> None:
        fd = self._fd
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                step, attempt, call = item
                _write_all(fd, [_HEADER.pack(step, attempt)])
                try:
                    cloudpickle.CloudPickler(_PieceWriter(fd), protocol=5).dump(call)
                except OSError:
                    raise
                except Exception as exc:  # changed since submit: it no longer pickles
                    reason = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
                    _write_all(fd, [_PIECE.pack(_ABORTED), _PIECE.pack(len(reason)), reason])
                    continue
                _write_all(fd, [_PIECE.pack(_END)])
        except OSError:  # the worker is gone (EPIPE): its steps are given back
            pass
        finally:
            os.close(fd)


class InboxStream:
    """The worker's reading of one step's call: a file the unpickler reads straight from the pipe.

    ``readinto`` reads from the pipe into the unpickler's own buffer (the
    final ``bytes`` of a large argument), so the call lands in one copy.
    ``finish`` reads whatever the step left unread, up to the end mark, so
    the next stream starts where it should.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._left = 0  # bytes left in the current piece
        self._ended = False

    def _next_piece(self) -> bool:
        """Move to the next piece with bytes in it; False at the end of the stream."""
        while not self._left and not self._ended:
            (size,) = _PIECE.unpack(_read_exactly(self._fd, _PIECE.size))
            if size == _END:
                self._ended = True
            elif size == _ABORTED:
                self._ended = True
                (length,) = _PIECE.unpack(_read_exactly(self._fd, _PIECE.size))
                reason = bytes(_read_exactly(self._fd, length)).decode("utf-8", "replace")
                raise _NotSent(f"the call could not be pickled when it was sent: {reason}")
            else:
                self._left = size
        return not self._ended or bool(self._left)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._next_piece():
            count = os.readv(self._fd, [view[done : done + self._left]])
            if not count:
                raise InboxError("the lane's inbox closed in the middle of a call")
            self._left -= count
            done += count
        return done

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise InboxError("a call is read from the inbox by size only")
        buffer = bytearray(size)
        count = self.readinto(buffer)
        del buffer[count:]
        return bytes(buffer)

    def readline(self) -> bytes:
        line = bytearray()
        while not line.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)

    def finish(self) -> None:
        """Read and drop what is left of the stream, up to its end mark."""
        scratch = bytearray(min(1 << 20, max(self._left, 1)))
        while True:
            try:
                if not self._next_piece():
                    return
            except _NotSent:
                return
            count = os.readv(self._fd, [memoryview(scratch)[: min(self._left, len(scratch))]])
            if not count:
                raise InboxError("the lane's inbox closed in the middle of a call")
            self._left -= count


class _NotSent(Exception):
    """The parent could not pickle the call when it sent it (it changed since submit)."""


def _read_exactly(fd: int, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = os.readv(fd, [view[done:]])
        if not count:
            raise InboxError("the lane's inbox closed before the step's call arrived")
        done += count
    return buffer


def open_stream(fd: int | None, step: int, attempt: int) -> InboxStream:
    """In a worker: the stream of step ``(step, attempt)``, which must be the next one."""
    if fd is None:
        raise InboxError(
            f"step {step} attempt {attempt} travels apart, but this worker has no inbox"
        )
    named = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if named != (step, attempt):
        raise InboxError(
            f"the inbox's next call is for step {named[0]} attempt {named[1]}, "
            f"not step {step} attempt {attempt}"
        )
    return InboxStream(fd)


class CallNotSentError(TypeError):
    """The parent could not pickle a large call when it sent it (it changed since submit)."""


def load_call(stream: InboxStream) -> Any:
    """Unpickle the call from its stream; CallNotSentError if the parent could not send it."""
    try:
        return cloudpickle.load(stream)
    except _NotSent as exc:
        raise CallNotSentError(str(exc)) from None
