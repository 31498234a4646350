"""How lane workers are started: forked from procorch's own preloaded fork server.

loky's default start (fork, then exec a fresh interpreter) costs about 100 ms
per worker here, nearly all of it interpreter start-up and imports. After a
crash that is the price of every replacement worker. A fork server, started
once with procorch, loky, cloudpickle and msgspec already imported, forks a
ready worker in a few milliseconds. It is safe where a plain fork is not: the
server is a single-threaded process that never ran user code.

The server is procorch's own (``_forkserver``), never the standard library's
global one, so a program that uses the forkserver start method keeps its
preload list, its server and its workers to itself. Workers do not re-import
the caller's ``__main__``. Each worker dies with the caller (``prepare_worker``)
but not with the server, so a step that kills the server harms no other step.
Where there is no fork server (Windows), workers start loky's way.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Any

_HAVE_FORKSERVER = sys.platform != "win32"
if _HAVE_FORKSERVER:
    import fcntl

    from . import _forkserver

# What the server imports before its first fork, for every worker to inherit:
# what every worker runs. Only some steps need asyncio (async executors) and
# jsonschema (structured output): the server imports them once it is idle,
# so the first workers start without waiting for them (a worker forked
# before imports them itself when a step needs them).
_PRELOAD = ["loky.process_executor", "procorch._worker"]
_PRELOAD_LATER = ["asyncio", "jsonschema"]
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

if _HAVE_FORKSERVER:
    _server = _forkserver.ForkServer(_PRELOAD, PACKAGE_DIR, _PRELOAD_LATER)


def worker_context() -> Any:
    """The multiprocessing context lanes start their workers with."""
    if not _HAVE_FORKSERVER:  # pragma: no cover
        from loky.backend import get_context

        return get_context("loky")
    return _forkserver.Context(_server)


def start_server() -> None:
    """Have the fork server start now, without waiting for it: the first worker will need it."""
    if _HAVE_FORKSERVER:
        _server.start_soon()


def stop_server() -> None:
    """Stop procorch's fork server; the next worker starts it again. Running workers go on."""
    if _HAVE_FORKSERVER:
        _server.stop()


def prepare_worker() -> None:
    """In a new worker: arrange to die with the caller, whatever becomes of the fork server."""
    if not _HAVE_FORKSERVER:  # pragma: no cover
        return
    lifeline = _forkserver.lifeline()
    if lifeline is not None:
        _die_with_caller(lifeline)


def _die_with_caller(lifeline: int) -> None:
    """Have this worker's process group SIGKILLed when the caller closes the lifeline.

    The caller holds the only write end of the lifeline pipe, so the pipe
    reaches end of file when the caller exits, however it dies (SIGKILL
    included). On Linux the kernel itself delivers the signal (``O_ASYNC``
    with ``F_SETSIG`` = SIGKILL, owned by the worker's process group), so it
    works while the worker is stopped, stuck in C code or holding the GIL,
    and takes whatever the step started along. Elsewhere a thread waits for
    the end of file and sends it. The worker leads its own group (``_worker``
    makes it so before calling this); if not, only the worker itself is
    targeted, never a group it shares with others.
    """
    target = -os.getpid() if os.getpgrp() == os.getpid() else os.getpid()
    if sys.platform.startswith("linux"):
        try:
            fcntl.fcntl(lifeline, fcntl.F_SETOWN, target)
            fcntl.fcntl(lifeline, fcntl.F_SETSIG, signal.SIGKILL)
            fcntl.fcntl(lifeline, fcntl.F_SETFL, fcntl.fcntl(lifeline, fcntl.F_GETFL) | os.O_ASYNC)
        except OSError:
            pass
        else:
            # The caller may have died before the signal was armed.
            if select.select([lifeline], [], [], 0)[0]:
                os.kill(target, signal.SIGKILL)
            return
    _watch_lifeline(lifeline, target)


def _watch_lifeline(lifeline: int, target: int) -> None:
    """The portable way: a thread that SIGKILLs ``target`` at the lifeline's end of file."""

    def watch() -> None:
        select.select([lifeline], [], [])
        os.kill(target, signal.SIGKILL)

    threading.Thread(target=watch, name="procorch-lifeline", daemon=True).start()
