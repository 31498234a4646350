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
    worker: wire bytes --> AgentStepSpec (for the events and messages)
                       \\-> payload_of_this_step(): a memoryview of the pickled bytes
"""

from __future__ import annotations

import msgspec

from . import _worker
from ._model import AgentStepSpec

__all__ = ["CarrierSpec", "payload_of_this_step"]


class CarrierSpec(AgentStepSpec, frozen=True, omit_defaults=True):
    """A spec whose wire bytes also carry ``payload``, a pickled call, as msgpack ``bin``."""

    payload: bytes = b""


class _Payload(msgspec.Struct):
    payload: memoryview = memoryview(b"")


_decode_payload = msgspec.msgpack.Decoder(_Payload).decode


def payload_of_this_step() -> memoryview:
    """In a worker, the payload of the step this thread is running (empty if it has none)."""
    return _decode_payload(_worker.take_step_bytes()).payload
