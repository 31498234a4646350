"""How lane workers are started: forked from a server that has procorch loaded.

loky's default start (fork, then exec a fresh interpreter) costs about 100 ms
per worker here, nearly all of it interpreter start-up and imports. After a
crash that is the price of every replacement worker. A fork server, started
once with procorch, loky, cloudpickle and msgspec already imported, forks a
ready worker in about 8 ms. It is safe where a plain fork is not: the server
is a single-threaded process that never ran user code.

The standard library's fork server also re-imports the parent's ``__main__``
module in every worker, as spawn does. procorch never needs it (executors
travel by value with cloudpickle), and a script without an
``if __name__ == "__main__":`` guard would run itself again in each worker;
so ``_Popen`` leaves the main module out of the data a new worker starts
from, as loky's own start method does. Its ``_launch`` is the standard
library's (identical in Python 3.11 to 3.13) with that one change. Where
there is no fork server (Windows), workers start loky's way.
"""

from __future__ import annotations

import ctypes
import importlib
import io
import os
import signal
import sys
from typing import Any

from loky.backend import get_context

# What the server imports once, for every worker to inherit.
_PRELOAD = ["loky.process_executor", "procorch._worker", "jsonschema", "asyncio", "sqlite3"]
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _preload() -> list[str]:
    """The modules to preload: procorch too, unless the current directory would shadow it.

    The server starts as ``python -c ...``, whose path begins with the current
    directory (Python 3.11 ignores the path it is handed), so a ``procorch``
    folder there, a checkout say, would stand in for the caller's procorch in
    every worker, speaking another protocol. Then workers import procorch
    themselves, after taking the caller's sys.path: slower to start (about
    80 ms instead of 5), but the right code.
    """
    local = os.path.join(os.getcwd(), "procorch")
    if os.path.isdir(local) and os.path.realpath(local) != os.path.realpath(PACKAGE_DIR):
        return [name for name in _PRELOAD if not name.startswith("procorch")]
    return _PRELOAD


# The fork server's internals are not typed for outside use: hold them as Any.
try:
    _mp_context: Any = importlib.import_module("multiprocessing.context")
    _forkserver: Any = importlib.import_module("multiprocessing.forkserver")
    _popen_forkserver: Any = importlib.import_module("multiprocessing.popen_forkserver")
    _spawn: Any = importlib.import_module("multiprocessing.spawn")
    _HAVE_FORKSERVER = True
except ImportError:  # pragma: no cover - no fork server on this platform
    _HAVE_FORKSERVER = False


if _HAVE_FORKSERVER:

    class _Popen(_popen_forkserver.Popen):  # type: ignore[misc]
        def _launch(self, process_obj: Any) -> None:
            prep_data = _spawn.get_preparation_data(process_obj._name)
            prep_data.pop("init_main_from_path", None)
            prep_data.pop("init_main_from_name", None)
            buf = io.BytesIO()
            _popen_forkserver.set_spawning_popen(self)
            try:
                _popen_forkserver.reduction.dump(prep_data, buf)
                _popen_forkserver.reduction.dump(process_obj, buf)
            finally:
                _popen_forkserver.set_spawning_popen(None)
            self.sentinel, w = _forkserver.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)
            self.finalizer = _popen_forkserver.util.Finalize(
                self, _popen_forkserver.util.close_fds, (_parent_w, self.sentinel)
            )
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = _forkserver.read_signed(self.sentinel)

    class _Process(_mp_context.ForkServerProcess):  # type: ignore[misc]
        @staticmethod
        def _Popen(process_obj: Any) -> _Popen:
            return _Popen(process_obj)

    class _Context(_mp_context.ForkServerContext):  # type: ignore[misc]
        Process = _Process


_started_server = False  # whether procorch started the fork server (and so may stop it)


def worker_context() -> Any:
    """The multiprocessing context lanes start their workers with."""
    global _started_server
    if not _HAVE_FORKSERVER:  # pragma: no cover
        return get_context("loky")
    server = _forkserver._forkserver
    if server._forkserver_pid is None:
        server.set_forkserver_preload(_preload())
        server.ensure_running()
        _started_server = True
    return _Context()


def stop_server() -> None:
    """Stop the fork server if procorch started it; the next lane starts it again."""
    global _started_server
    if _started_server:
        _forkserver._forkserver._stop()
        _started_server = False


def prepare_worker() -> None:
    """In a new worker: let go of the fork server and arrange to die with the caller."""
    release_server_in_worker()
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when its parent process dies.

    The parent is the fork server, which exits when the caller's process
    does, however that process dies (SIGKILL included): without this, a
    worker would finish its step (and its step's side effects) for nobody.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


_PR_SET_PDEATHSIG = 1


def release_server_in_worker() -> None:
    """In a worker: drop the fork server's keep-alive pipe, which every child inherits.

    The server exits when the last holder of that pipe closes it. Workers
    hold a copy only so that they could ask the server for children of their
    own, which they never do; without closing it, a caller killed by SIGKILL
    would leave the server alive because of its workers, and the workers
    alive because of the server (they die with their parent, see ``_worker``).
    """
    if not _HAVE_FORKSERVER:  # pragma: no cover
        return
    server = _forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
