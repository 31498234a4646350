"""The frames a worker writes on its lane's channel, and their codec.

Each lane has its own one-way pipe from its worker to the parent. For every
step the worker writes ``_Started``, then any number of ``_Progress``, then
``_Done``; between steps it may write ``_Retire`` instead of starting the
next one, when it has grown too large to keep. A pipe carries one writer's
frames in order, so the parent never sees a step's progress after its
outcome, and a worker that dies mid-write can only spoil its own lane's
channel, which dies with it.
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


class _Retire(msgspec.Struct, tag="r", array_like=True):
    """The worker grew past the call's recycle threshold and stopped taking steps."""

    rss: int


_Frame = _Started | _Progress | _Done | _Retire

_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(_Frame).decode


def _tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 if it is gone).

    Reads /proc directly on Linux (tens of microseconds a process); elsewhere
    psutil, whose search for children scans every process on the machine.
    """
    if not _HAVE_PROC_CHILDREN:
        return _tree_rss_psutil(pid)
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE_SIZE
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as children:
                    pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited while we looked
    return total


def _tree_rss_psutil(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        total = int(root.memory_info().rss)
        for child in root.children(recursive=True):
            try:
                total += int(child.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_HAVE_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")

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
