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
"""

from __future__ import annotations

import io
import struct

import cloudpickle
import msgspec

from . import _worker
from ._model import AgentStepSpec

__all__ = ["CarrierSpec", "carrier_wire_bytes", "payload_of_this_step"]


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


def payload_of_this_step() -> memoryview:
    """In a worker, the payload of the step this thread is running (empty if it has none)."""
    return _decode_payload(_worker.take_step_bytes()).payload
