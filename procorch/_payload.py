"""How procorch's own runners carry a pickled call beside a spec, as raw bytes.

``ProcessPool``'s calls and ``map``'s items are steps of private executors
(``_CallRunner``, ``_FunctionRunner``). What they run, cloudpickled, travels
in the step's wire bytes as one more msgpack field, a ``bin`` named
``payload``, after the seed's spec fields: no base64, no text, one copy into
the wire. In the worker the spec decodes as any spec does (msgspec skips a
field its type does not have), and the private executor reads the payload
from the step's wire bytes as a view, without copying it. User specs never
have the field, so their wire bytes, and the seed's JSON, are unchanged::

    parent: CarrierSpec(task_id, agent, "", "", payload=pickled) --encode--> wire bytes
            (ProcessPool: carrier_wire_bytes pickles the call straight into them)
    worker: wire bytes --> AgentStepSpec (for the events and messages)
                       \\-> payload_of_this_step(): a memoryview of the pickled bytes

A ``ProcessPool`` call whose pickle is larger than ``_inbox.LARGE_CALL``
travels apart instead (``call_wire`` returns an ``ApartWire``: the spec's
wire bytes without the payload, holding the call itself), on the lane's
inbox; see ``_inbox``. ``call_of_this_step`` reads it either way.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import cloudpickle
import msgspec

from . import _worker
from ._inbox import LARGE_CALL, ApartWire, CallNotSentError, load_call
from ._model import AgentStepSpec

__all__ = [
    "CallNotSentError",
    "CarrierSpec",
    "call_of_this_step",
    "call_wire",
    "carrier_wire_bytes",
    "inline_wire",
    "payload_of_this_step",
    "pickled_result",
]


class CarrierSpec(AgentStepSpec, frozen=True, omit_defaults=True):
    """A spec whose wire bytes also carry ``payload``, a pickled call, as msgpack ``bin``."""

    payload: bytes = b""


class _Payload(msgspec.Struct):
    payload: memoryview = memoryview(b"")


_decode_payload = msgspec.msgpack.Decoder(_Payload).decode
_encode = msgspec.msgpack.Encoder().encode

_PLACEHOLDER = b"\xc4\x01\x00"  # msgpack bin 8 of one byte, 0: the payload b"\0"
_BIN32 = struct.Struct(">BI")  # msgpack bin 32: 0xc6, then the length, big-endian
_MAX_PAYLOAD = 2**32 - 1


def carrier_wire_bytes(task_id: str, agent: str, call: object) -> bytes:
    """The wire bytes of a CarrierSpec whose payload is ``call`` cloudpickled, in one copy.

    Encoding a CarrierSpec copies a payload already pickled; instead msgspec
    encodes the spec with a one-byte placeholder payload, always the last
    field (the subclass's own), and cloudpickle writes the call in its place,
    behind a bin 32 header whose length is filled in afterwards. The bytes
    are those ``CarrierSpec(..., payload=cloudpickle.dumps(call))`` encodes
    to. Raises what pickling raises, or ValueError past msgpack's 4 GiB.
    """
    head = _encode(CarrierSpec(task_id, agent, "", "", payload=b"\0"))
    assert head.endswith(_PLACEHOLDER)
    wire = io.BytesIO()
    wire.write(head[: -len(_PLACEHOLDER)])
    header_at = wire.tell()
    wire.write(_BIN32.pack(0xC6, 0))
    cloudpickle.dump(call, wire)
    size = wire.tell() - header_at - _BIN32.size
    if size > _MAX_PAYLOAD:
        raise ValueError(f"the pickled call is {size} bytes, over the 4 GiB a step can carry")
    wire.seek(header_at)
    wire.write(_BIN32.pack(0xC6, size))
    return wire.getvalue()


class _CountingSink:
    """Where a call is pickled at submit: kept up to ``LARGE_CALL`` bytes, counted past it."""

    __slots__ = ("buffer", "size")

    def __init__(self, head: bytes) -> None:
        self.buffer: io.BytesIO | None = io.BytesIO()
        self.buffer.write(head)
        self.size = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        if self.buffer is not None:
            if self.size > LARGE_CALL:
                self.buffer = None  # large: it travels apart, pickled again when sent
            else:
                self.buffer.write(data)
        return size


def call_wire(task_id: str, agent: str, call: object) -> bytes:
    """The wire bytes of a step that runs ``call``: ``carrier_wire_bytes``'s, or an ``ApartWire``.

    The call is pickled once here, so that a call that cannot be pickled is
    refused at once; a large one is only counted (protocol 5 hands a large
    ``bytes`` to the sink as is: no copy) and travels apart. Raises what
    pickling raises, or ValueError past msgpack's 4 GiB for a small one.
    """
    head = _encode(CarrierSpec(task_id, agent, "", "", payload=b"\0"))
    assert head.endswith(_PLACEHOLDER)
    head = head[: -len(_PLACEHOLDER)]
    sink = _CountingSink(head + _BIN32.pack(0xC6, 0))
    cloudpickle.CloudPickler(sink, protocol=5).dump(call)
    if sink.buffer is None:
        wire = ApartWire(_encode(CarrierSpec(task_id, agent, "", "")))
        wire.call = call
        return wire
    sink.buffer.seek(len(head))
    sink.buffer.write(_BIN32.pack(0xC6, sink.size))
    return sink.buffer.getvalue()


def inline_wire(data: bytes) -> bytes:
    """Wire bytes that carry their call inline (for a backend without inboxes: Dask)."""
    if isinstance(data, ApartWire):
        spec = _decode_spec(data)
        return carrier_wire_bytes(spec.task_id, spec.agent, data.call)
    return data


_decode_spec = msgspec.msgpack.Decoder(AgentStepSpec).decode


def call_of_this_step() -> Any:
    """In a worker, the call of the step this thread is running, unpickled.

    From the lane's inbox when it travelled apart (the large bytes land in
    their final objects), else from the step's wire bytes. Raises
    ``CallNotSentError`` for a large call the parent could not pickle.
    """
    stream = _worker.take_step_stream()
    if stream is not None:
        return load_call(stream)
    return cloudpickle.loads(payload_of_this_step())


class _PieceSink:
    """Where a result is pickled: the pieces the pickler writes, kept as they are."""

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.size = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.pieces.append(data)  # a fresh frame of the pickler's, or the object's own bytes
        self.size += size
        return size


def pickled_result(result: object) -> bytes | _worker.ResultPieces:
    """``result`` cloudpickled: ``bytes``, or on a lane, when large, its pieces unjoined.

    Protocol 5 hands a large ``bytes`` inside the result to the sink as it
    is, so a lane's worker writes it to its channel without copying it
    (``_worker.done_parts``). Raises what pickling raises.
    """
    sink = _PieceSink()
    cloudpickle.CloudPickler(sink, protocol=5).dump(result)
    if sink.size > _LARGE_RESULT and _worker.on_a_lane():
        return _worker.ResultPieces(sink.pieces, sink.size)
    return b"".join(sink.pieces)


_LARGE_RESULT = 1 << 16  # as _protocol.LARGE_FRAME: a frame written in pieces


def payload_of_this_step() -> memoryview:
    """In a worker, the payload of the step this thread is running (empty if it has none)."""
    return _decode_payload(_worker.take_step_bytes()).payload
