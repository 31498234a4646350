"""The frames a worker writes on its lane's channel, and their codec.

Each lane has its own one-way pipe from its worker to the parent. For every
step the worker writes ``_Started``, then any number of ``_Progress``, then
``_Done``. A pipe carries one writer's frames in order, so the parent never
sees a step's progress after its outcome, and a worker that dies mid-write can
only spoil its own lane's channel, which dies with it.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from ._model import StepOutcome


class _Started(msgspec.Struct, tag="s", array_like=True):
    pid: int


class _Progress(msgspec.Struct, tag="p", array_like=True):
    data: Any


class _Done(msgspec.Struct, tag="d", array_like=True):
    outcome: StepOutcome
    duration: float


_Frame = _Started | _Progress | _Done

_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(_Frame).decode

# How much of what a step printed a failed outcome keeps: the end, where the
# error usually is.
_PRINTED_TAIL_BYTES = 4096


def _read_tail(path: str) -> str:
    """The last _PRINTED_TAIL_BYTES of a capture file, as text ('' if absent)."""
    try:
        with open(path, "rb") as captured:
            size = captured.seek(0, os.SEEK_END)
            captured.seek(max(0, size - _PRINTED_TAIL_BYTES))
            return captured.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
