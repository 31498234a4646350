"""procorch's own fork server: one per calling process, started and stopped by procorch alone.

A worker forked from a process that has already imported procorch and its
dependencies is ready in milliseconds, where a fresh interpreter takes about
100 ms. Forking the caller itself is unsafe (it has threads, and user state),
so a small server process does the forking: it starts once, imports the
preload list, and from then on only forks on request. It is procorch's
alone: the standard library's fork server (``multiprocessing.forkserver``),
its preload list and its workers belong to the calling program and are never
touched.

Data flow for one worker::

    caller: ForkServer.start_child                 server: _serve
      status pipe (r | w), data pipe (r | w)
      connect, send fds [status w, data r, ...] --> accept, fork
                                                       | child (_serve_one):
      status r <-- (PID, pid) -------------------------+ writes its own pid,
      data w   -- preparation data, Process ---------> + reads, runs the worker
      ...
      status r <-- (EXIT, code) -- server reaps the child and reports its status
      status r:  end of file     -- the server died, then the worker exited:
                                    its exit status is lost (Popen.status_known)

- The caller holds the only write end of the server's keep-alive pipe; the
  server exits when it closes (``stop``, interpreter exit, or the caller's
  death, SIGKILL included). ``start_child`` restarts a server that died.
- The server never runs user code, imports only the preload list, and keeps
  no state but its children's status pipes. Killing it (a step may SIGKILL
  its parent) costs what it held: the exit status of the workers it forked.
  The workers themselves go on, their steps finish, and the next worker comes
  from a new server.
- Each worker holds a copy of its own status pipe's write end, so the pipe
  reaches end of file when the worker exits even if the server is gone: that
  end of file is the worker's death, never the server's. It also holds the
  read end of its data pipe (its *lifeline*), whose write end only the caller
  holds: ``_context.prepare_worker`` has the kernel kill the worker's process
  group when the caller closes it, so workers die with the caller without
  depending on the server.
"""

from __future__ import annotations

import gc
import importlib
import io
import itertools
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from typing import Any

# The multiprocessing internals a fork server plugs into are not typed for
# outside use: hold them as Any.
_mp_context: Any = importlib.import_module("multiprocessing.context")
_popen_fork: Any = importlib.import_module("multiprocessing.popen_fork")
_reduction: Any = importlib.import_module("multiprocessing.reduction")
_spawn: Any = importlib.import_module("multiprocessing.spawn")
_util: Any = importlib.import_module("multiprocessing.util")

# Everything on a status pipe is a record: (kind, value), 16 bytes, so that
# the child's PID and the server's EXIT can never be taken one for the other.
# A write of at most PIPE_BUF bytes is atomic, so records never interleave.
_RECORD = struct.Struct("=qq")
_PID = 1  # written by the child itself, first thing after the fork
_EXIT = 2  # written by the server once it has reaped the child

# How many times start_child asks (a new server each time) before giving up;
# each try fails only when the server died or froze under the request.
_START_TRIES = 3
# How long a server may take to answer a fork request before it is taken for
# frozen (SIGSTOP, say), killed and replaced. Forking takes milliseconds.
_START_TIMEOUT = 30.0
_MAX_FDS = 256  # file descriptors one request may carry
# How long the server waits without a request before it imports the next
# module of its ``later`` list: long enough that a burst of worker starts
# (the first call's lanes) never waits behind an import.
_IDLE_BEFORE_IMPORT = 0.25

# Bootstrap of the server process. The caller's procorch is loaded from its
# own directory, whatever sys.path says (``python -c`` puts the current
# directory first, where another procorch, a checkout say, could sit); every
# other import then resolves on the caller's sys.path.
_BOOTSTRAP = """\
import importlib.util, sys
sys.path[:] = {sys_path!r}
spec = importlib.util.spec_from_file_location(
    "procorch", {init!r}, submodule_search_locations=[{package!r}]
)
sys.modules["procorch"] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from procorch._forkserver import _serve
_serve({listener}, {alive}, {preload!r}, {later!r}, {tracker})
"""


class ServerStartError(OSError):
    """procorch's fork server could not start a worker process."""


def _read_record(fd: int) -> tuple[int, int]:
    """One record from a status pipe; EOFError at end of file."""
    data = b""
    while len(data) < _RECORD.size:
        chunk = os.read(fd, _RECORD.size - len(data))
        if not chunk:
            raise EOFError("the status pipe closed")
        data += chunk
    kind, value = _RECORD.unpack(data)
    return int(kind), int(value)


def _tracker_wanted() -> bool:
    """Whether the server should fork this process its resource tracker.

    multiprocessing starts the tracker (which unlinks the named semaphores
    of a process that died without doing so; every lane's loky executor
    makes some) as an interpreter of its own: one more start-up, about 15
    ms of a short program's wall time on 2 cores. The server, a process of
    procorch's own that starts anyway, forks it instead: the same
    ``resource_tracker.main``, reading a pipe whose write end becomes this
    process's tracker fd. Only where the tracker's state is the one known
    (Python 3.11) and no tracker runs yet (a program's own multiprocessing
    may have started one: it is kept).
    """
    tracker: Any = resource_tracker._resource_tracker
    return sys.version_info < (3, 12) and getattr(tracker, "_fd", 0) is None


def _adopt_tracker(write_end: int) -> None:
    """Make ``write_end`` this process's resource tracker fd, unless one appeared meanwhile."""
    tracker: Any = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._fd is None:
            tracker._fd = write_end
            return
    _close(write_end)  # the forked tracker reads end of file and exits


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and reap it. It holds nothing that needs a cleaner end."""
    if process.poll() is None:
        try:
            process.kill()
        except ProcessLookupError:
            pass
        process.wait()


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- the caller's side ----------------------------------------------------------


class ForkServer:
    """A handle on one server process, started on demand and restarted if it died.

    ``start_child`` is safe from any thread. After ``os.fork()`` in the
    caller, the child forgets the handle (and closes its copy of the
    keep-alive pipe), so a forked child never keeps the server alive and
    starts a server of its own if it needs one.
    """

    def __init__(self, preload: Sequence[str], package_dir: str, later: Sequence[str] = ()) -> None:
        self._preload = list(preload)
        self._later = list(later)
        self._package_dir = package_dir
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._address: str | None = None
        self._alive_w: int | None = None  # the server exits when this closes
        _handles.append(self)

    @property
    def pid(self) -> int | None:
        """The running server's pid (None before the first worker or after stop)."""
        process = self._process
        return None if process is None else process.pid

    def start_child(self, fds: Sequence[int]) -> tuple[int, int, int]:
        """Fork a worker that inherits ``fds``; returns its pid, status read end, data write end.

        The caller must write the worker's preparation data and process object
        to the data pipe. A server found dead, or dying under the request, is
        replaced and the request made again.
        """
        if len(fds) + 3 > _MAX_FDS:
            raise ValueError(f"a worker can inherit at most {_MAX_FDS - 3} fds (got {len(fds)})")
        failure: BaseException | None = None
        for _ in range(_START_TRIES):
            process, address = self._ensure_running()
            tracker_fd = resource_tracker.getfd()
            status_r, status_w = os.pipe()
            data_r, data_w = os.pipe()
            try:
                try:
                    with socket.socket(socket.AF_UNIX) as client:
                        client.connect(address)
                        _reduction.sendfds(client, [status_w, data_r, tracker_fd, *fds])
                finally:
                    _close(status_w, data_r)
                if not wait([status_r], _START_TIMEOUT):
                    raise TimeoutError(f"the fork server did not answer in {_START_TIMEOUT:g} s")
                kind, pid = _read_record(status_r)
            except (OSError, EOFError) as exc:
                # Refused, cut off or unanswered: the server is dead, dying (a
                # SIGKILLed server still looks alive for a moment) or frozen,
                # and started nothing. Make sure it is gone; the next try
                # starts another.
                _close(status_r, data_w)
                _kill(process)
                failure = exc
                continue
            if kind != _PID:
                # The child was killed between its fork and its first word.
                _close(status_r, data_w)
                failure = ChildProcessError(f"a new worker died at once (exit code {pid})")
                continue
            return pid, status_r, data_w
        raise ServerStartError(
            f"procorch's fork server could not start a worker process in {_START_TRIES} "
            f"tries; the last failure: {failure!r}"
        ) from failure

    def start_soon(self) -> None:
        """Start the server (and the resource tracker its workers share) without waiting for it.

        Both boot in processes of their own while the caller goes on; the
        first ``start_child`` then finds them ready, or nearly. A server that
        fails to start is the first ``start_child``'s to report.
        """
        try:
            self._ensure_running()
            resource_tracker.getfd()
        except OSError:
            pass

    def stop(self) -> None:
        """Stop the server if it runs. Its workers go on; the next worker starts a new one."""
        with self._lock:
            if self._process is not None:
                _kill(self._process)
            self._forget()

    def _ensure_running(self) -> tuple[subprocess.Popen[bytes], str]:
        with self._lock:
            if self._process is not None and self._process.poll() is not None:
                self._forget()  # it died: reaped by poll
            if self._process is None or self._address is None:
                self._start()
            assert self._process is not None and self._address is not None
            return self._process, self._address

    def _start(self) -> None:
        # In multiprocessing's private directory for this process (removed at
        # exit), under a short name: a socket's path has room for 107 bytes.
        address = os.path.join(_util.get_temp_dir(), f"fs-{next(_server_numbers)}")
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            tracker_r = tracker_w = -1
            if _tracker_wanted():
                tracker_r, tracker_w = os.pipe()
            try:
                command = _BOOTSTRAP.format(
                    sys_path=sys.path,
                    init=os.path.join(self._package_dir, "__init__.py"),
                    package=self._package_dir,
                    listener=listener.fileno(),
                    alive=alive_r,
                    preload=self._preload,
                    later=self._later,
                    tracker=tracker_r,
                )
                executable = _spawn.get_executable()
                self._process = subprocess.Popen(
                    [executable, *_util._args_from_interpreter_flags(), "-c", command],
                    executable=executable,
                    stdin=subprocess.DEVNULL,
                    pass_fds=tuple(fd for fd in (listener.fileno(), alive_r, tracker_r) if fd >= 0),
                )
            except BaseException:
                _close(alive_w)
                if tracker_w >= 0:
                    _close(tracker_w)
                raise
            finally:
                _close(alive_r)
                if tracker_r >= 0:
                    _close(tracker_r)
            if tracker_w >= 0:
                _adopt_tracker(tracker_w)
        self._address = address
        self._alive_w = alive_w

    def _forget(self) -> None:
        if self._alive_w is not None:
            _close(self._alive_w)
        if self._address is not None:
            try:
                os.unlink(self._address)
            except OSError:
                pass
        self._process, self._address, self._alive_w = None, None, None

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._alive_w is not None:
            _close(self._alive_w)
        self._process, self._address, self._alive_w = None, None, None


_handles: list[ForkServer] = []  # every handle, for the fork hook
_server_numbers = itertools.count(1)
_lifelines: set[int] = set()  # the caller's write ends of its workers' lifelines


def _after_fork_in_child() -> None:
    """In a child forked from the caller: hold neither the servers nor the workers alive."""
    for handle in _handles:
        handle._after_fork_in_child()
    if _lifelines:
        # Point the inherited copies at /dev/null rather than close them: the
        # Popen objects that own them still close them, and those numbers
        # must not by then belong to something else.
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in list(_lifelines):
            os.dup2(null, fd, inheritable=False)
        os.close(null)
        _lifelines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- multiprocessing's side: a context whose processes come from a ForkServer ----


class _DupFd:
    """An fd passed to a worker: in the worker, the inherited copy at this index."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        return _inherited_fds[self.index]


class _Popen(_popen_fork.Popen):  # type: ignore[misc]
    """A worker process started by a ForkServer.

    Its sentinel is the status pipe. ``poll`` reads the exit status once,
    under a lock, since several threads ask (loky's manager thread, joins);
    a status pipe that ends without a record means the server died before
    the worker, and the status is lost: ``status_known`` is then False and
    ``returncode`` 255, as the standard library's fork server reports it.
    """

    method = "forkserver"
    DupFd = _DupFd
    returncode: int | None
    sentinel: int
    pid: int

    def __init__(self, process_obj: Any, server: ForkServer) -> None:
        self._fds: list[int] = []
        self._server = server
        self._status_lock = threading.Lock()
        self.status_known = True
        super().__init__(process_obj)

    def duplicate_for_child(self, fd: int) -> int:
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj: Any) -> None:
        prep_data = _spawn.get_preparation_data(process_obj._name)
        # procorch never needs the caller's __main__ in a worker (executors
        # travel by value), and a script without an `if __name__ ==
        # "__main__":` guard would run again in each worker: leave it out, as
        # loky's own start method does.
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        _mp_context.set_spawning_popen(self)
        try:
            _reduction.dump(prep_data, buf)
            _reduction.dump(process_obj, buf)
        finally:
            _mp_context.set_spawning_popen(None)
        self.pid, self.sentinel, data_w = self._server.start_child(self._fds)
        # The worker's lifeline: this copy of the data pipe's write end lives
        # as long as this object, and the worker dies when it closes.
        lifeline = os.dup(data_w)
        _lifelines.add(lifeline)
        self.finalizer = _util.Finalize(self, _release, (lifeline, self.sentinel))
        try:
            with open(data_w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
        except BrokenPipeError:
            pass  # the worker died at once: its sentinel says so

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        # Look and read under the lock: a thread that saw the pipe readable and
        # then waited on it, after another thread read the record, would block
        # for good when something else still holds the pipe's write end (a
        # step's forked grandchild does). A blocking poll looks again often.
        while True:
            with self._status_lock:
                if self.returncode is not None:
                    return self.returncode
                if wait([self.sentinel], 0):
                    try:
                        kind, code = _read_record(self.sentinel)
                    except (OSError, EOFError):
                        kind, code = 0, 255
                    self.status_known = kind == _EXIT
                    self.returncode = code if self.status_known else 255
                    return self.returncode
            if flag == os.WNOHANG:
                return None
            wait([self.sentinel], 0.1)


def _release(lifeline: int, sentinel: int) -> None:
    _lifelines.discard(lifeline)
    _close(lifeline, sentinel)


class _Process(_mp_context.ForkServerProcess):  # type: ignore[misc]
    """A worker process forked by procorch's server (the one its context names)."""

    _server: ForkServer | None = None

    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        assert process_obj._server is not None, "a worker process made outside its context"
        return _Popen(process_obj, process_obj._server)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_server", None)  # the worker has no use for the caller's handle
        return state

    @property
    def exit_status_known(self) -> bool:
        """False when the worker outlived the server that would have reported its exit status."""
        popen = self._popen
        return popen is None or bool(popen.status_known)


class Context(_mp_context.ForkServerContext):  # type: ignore[misc]
    """A multiprocessing context whose processes are forked by ``server``."""

    def __init__(self, server: ForkServer) -> None:
        self._server = server

    def Process(self, *args: Any, **kwargs: Any) -> _Process:
        process = _Process(*args, **kwargs)
        process._server = self._server
        return process


# -- the server's side ----------------------------------------------------------


def _fork_tracker(tracker_fd: int, keep_from_it: Sequence[int]) -> None:
    """Fork the caller's resource tracker, reading ``tracker_fd`` (see ``_tracker_wanted``)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _close(*keep_from_it)
            resource_tracker.main(tracker_fd)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _close(tracker_fd)


def _serve(
    listener_fd: int,
    alive_r: int,
    preload: list[str],
    later: Sequence[str] = (),
    tracker_fd: int = -1,
) -> None:
    """The server process: import ``preload``, then fork on request until the caller goes.

    The modules of ``later`` are imported one at a time whenever no request
    came for a moment, so the first workers do not wait for what only some
    steps need (asyncio, jsonschema), and the workers forked afterwards
    inherit it. Everything the server holds is frozen (``gc.freeze``) before
    each fork: a worker's garbage collector then never visits the inherited
    objects, so their pages stay shared with the server instead of being
    copied into every worker.
    """
    if tracker_fd >= 0:
        _fork_tracker(tracker_fd, [listener_fd, alive_r])
    _preload(preload)
    pending = list(later)
    caller = os.getppid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    handlers: dict[int, Any] = {
        signal.SIGCHLD: _ignore,  # only to wake the selector
        signal.SIGINT: signal.SIG_IGN,  # Ctrl-C is for the caller
    }
    saved: dict[int, Any] = {
        signum: signal.signal(signum, handler) for signum, handler in handlers.items()
    }
    signal.set_wakeup_fd(wake_w)
    children: dict[int, int] = {}  # pid -> the server's copy of its status pipe
    with (
        socket.socket(socket.AF_UNIX, fileno=listener_fd) as listener,
        selectors.DefaultSelector() as selector,
    ):
        selector.register(listener, selectors.EVENT_READ)
        selector.register(alive_r, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            timeout = _IDLE_BEFORE_IMPORT if pending else None
            ready = {key.fileobj for key, _ in selector.select(timeout)}
            if not ready and pending:
                _preload([pending.pop(0)])
                continue
            if alive_r in ready:  # the caller stopped us, or is gone
                # What the caller's steps started and left in their lanes'
                # cgroups (daemons, if the caller was SIGKILLed) goes with it.
                from ._containment import remove_lanes_of

                remove_lanes_of(caller)
                return
            if wake_r in ready:
                _drain(wake_r)
                _reap(children)
            if listener in ready:
                request = _accept(listener)
                if request is None:
                    continue
                status_w, data_r, tracker_fd, *inherited = request
                gc.freeze()  # what the server allocated since the last fork, too
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        listener.close()
                        selector.close()
                        unused = [alive_r, wake_r, wake_w, *children.values()]
                        code = _serve_one(status_w, data_r, tracker_fd, inherited, unused, saved)
                    except EOFError:
                        pass  # the caller gave up on this worker before sending it anything
                    except BaseException:
                        sys.excepthook(*sys.exc_info())
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
                children[pid] = status_w
                _close(data_r, tracker_fd, *inherited)


def _preload(names: Sequence[str]) -> None:
    """Import ``names`` without a collection midway, then freeze everything (see ``_serve``)."""
    gc.disable()
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:
                pass  # the worker imports it again, and reports the error where it matters
    finally:
        gc.freeze()
        gc.enable()


def _ignore(signum: int, frame: Any) -> None:
    pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _accept(listener: socket.socket) -> list[int] | None:
    """The fds of one fork request, or None for a request cut short."""
    try:
        connection, _ = listener.accept()
    except OSError:
        return None
    with connection:
        try:
            fds: list[int] = _reduction.recvfds(connection, _MAX_FDS + 1)
        except (OSError, EOFError, RuntimeError):
            return None
    if len(fds) < 3 or len(fds) > _MAX_FDS:
        _close(*fds)
        return None
    return fds


def _reap(children: dict[int, int]) -> None:
    """Collect every child that exited and report its status on its status pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_w = children.pop(pid, None)
        if status_w is not None:
            try:
                os.write(status_w, _RECORD.pack(_EXIT, os.waitstatus_to_exitcode(status)))
            except OSError:
                pass  # the caller is gone
            _close(status_w)


# -- the worker's side -----------------------------------------------------------

_inherited_fds: list[int] = []  # the fds the caller passed, in order (see _DupFd)
_lifeline: int | None = None  # the read end of the lifeline, in a worker


def _serve_one(
    status_w: int,
    data_r: int,
    tracker_fd: int,
    inherited: list[int],
    unused: list[int],
    handlers: dict[int, Any],
) -> int:
    """In a freshly forked child: say who we are, drop the server's things, become the worker."""
    global _inherited_fds, _lifeline
    try:
        os.write(status_w, _RECORD.pack(_PID, os.getpid()))
    except OSError:
        return 1  # the caller is gone
    signal.set_wakeup_fd(-1)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    _close(*unused)
    # Received fds are inheritable; a program a step runs must not hold them.
    # The worker keeps status_w, unused, so that its status pipe ends only
    # when it exits (see the module docstring).
    for fd in (status_w, data_r, tracker_fd, *inherited):
        os.set_inheritable(fd, False)
    _inherited_fds = inherited
    resource_tracker._resource_tracker._fd = tracker_fd  # type: ignore[attr-defined]
    _lifeline = os.dup(data_r)
    code: int = _spawn._main(data_r, _lifeline)
    return code


def lifeline() -> int | None:
    """In a worker: the fd that reaches end of file when the caller is gone (None elsewhere)."""
    return _lifeline
