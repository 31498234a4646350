"""The pool: warm worker processes, one per lane, kept between calls.

A lane is one worker process behind its own single-worker loky executor, plus
two one-way pipes from that worker to the parent: the channel (step frames)
and the crash pipe (faulthandler's dump), and a file where the worker's
standard output and error go when a call captures them. The worker leads its
own process group, so killing the lane kills whatever its steps started.
Giving every worker its own executor is what makes crash attribution exact:
when a worker dies, loky breaks only that executor, so the only steps harmed
are the lane's own: the one it was running, and the queued ones it never
began, which run again elsewhere.

The engine keeps idle lanes between calls so a second call does not pay
process start-up again, hands lanes to calls (several calls may run at once
from different threads, each with lanes of its own), and shuts them all down
at interpreter exit or on :func:`shutdown`. A lane left idle longer than the
``idle_timeout`` of the call that gave it back (``DEFAULT_IDLE_TIMEOUT`` by
default) is retired by the engine's reaper thread: its worker exits, and the
next call forks a fresh one.
"""

from __future__ import annotations

import atexit
import collections
import glob
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import loky
import psutil

from . import _worker
from ._capture import read_tail
from ._containment import LaneCgroup
from ._context import PACKAGE_DIR, stop_server, worker_context
from ._inbox import Apart, ApartWire, InboxWriter
from ._procinfo import tree_pids
from ._protocol import SOFT_STOP, SOFT_STOP_SIGNAL, FrameReader

DEFAULT_IDLE_TIMEOUT = 300.0
"""Seconds a warm worker waits idle before it exits, unless a call says otherwise.

What joblib gives its loky workers (loky's own ``get_reusable_executor``
says 10 s, for workers that cost about 100 ms to start): long enough that a
program making calls every few seconds or minutes keeps its workers warm,
short enough that a program done with procorch gets their memory back
without calling :func:`shutdown`. A new worker costs about 5 ms here (the
fork server), so a shorter timeout costs little.
"""


class _Lane:
    """One worker process, its channel, and the executor token it holds."""

    def __init__(self, capture_path: str) -> None:
        self._context = worker_context()
        self.channel, channel_writer = self._context.Pipe(duplex=False)
        self.frames = FrameReader(self.channel.fileno())
        self._crash_reader, crash_writer = self._context.Pipe(duplex=False)
        # The one pipe the other way: which step a soft time limit is for.
        control_reader, self._control = self._context.Pipe(duplex=False)
        # And the inbox, where large calls travel beside their chunk (``_inbox``).
        inbox_reader, inbox_writer = self._context.Pipe(duplex=False)
        self.inbox = InboxWriter(os.dup(inbox_writer.fileno()))
        inbox_writer.close()
        # The parent drops its copies of the worker's ends once the worker
        # holds its own, so the worker's death reads as end-of-file.
        self._writers: tuple[Connection, ...] = (
            channel_writer,
            crash_writer,
            control_reader,
            inbox_reader,
        )
        self.capture_path = capture_path
        # The lane's cgroup and its executor are made by _setup, in a starter
        # thread (``_start_workers``) or at the first submit.
        self.cgroup: LaneCgroup | None = None  # None where procorch may not make one
        self._cgroup_tried = False
        self._pool: Any = None
        self._process: Any = None
        self.executor_token: str | None = None
        self.retire_at: float | None = None  # while idle in the engine: when it is retired
        self._lock = threading.Lock()  # _setup and _adopt_worker, from any thread
        self._starting: threading.Event | None = None  # set once a starter thread is done
        self._stopping: threading.Thread | None = None  # loky's manager, once stop_soon asked
        # Called by the starter once done: the wake-up of the call that holds
        # the lane now (an idle lane may still be starting when a call takes it).
        self.on_started: Callable[[], object] | None = None
        self._warm = False  # its executor has run a call: every thread of it runs (warm_up)
        self._fed = False  # a call was submitted to its executor (see close)

    def _setup(self) -> Any:
        """The lane's cgroup and its single-worker loky executor, made once; call under the lock."""
        if self._pool is None:
            if not self._cgroup_tried:
                self._cgroup_tried = True
                name = os.path.splitext(os.path.basename(self.capture_path))[0]
                self.cgroup = LaneCgroup.create(name)
            channel_writer, crash_writer, control_reader, inbox_reader = self._writers
            self._pool = loky.ProcessPoolExecutor(
                max_workers=1,
                context=self._context,
                initializer=_worker._init,
                initargs=(
                    channel_writer,
                    crash_writer,
                    self.capture_path,
                    PACKAGE_DIR,
                    None if self.cgroup is None else self.cgroup.path,
                    control_reader,
                    inbox_reader,
                ),
                timeout=None,
            )
        return self._pool

    @property
    def starting(self) -> bool:
        """A starter thread still sets this lane up: send it work once it is done."""
        return self._starting is not None and not self._starting.is_set()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def submit(
        self,
        token: str,
        blob: bytes,
        chunk: list[tuple[int, int, bytes]],
        capture: bool,
        retire_above: int | None,
        sandbox: Any = None,
        measure: bool = True,
    ) -> Future[None]:
        """Start a chunk of steps; raises loky's BrokenProcessPool if the worker is gone."""
        with self._lock:
            pool = self._setup()
        shipped = None if token == self.executor_token else blob
        apart = [item for item in chunk if type(item[2]) is ApartWire]
        sent: list[tuple[int, int, bytes | Apart]] = list(chunk)
        if apart:  # large calls: only their spec goes in the chunk (see _inbox)
            sent = [
                (step, attempt, Apart(bytes(wire)) if type(wire) is ApartWire else wire)
                for step, attempt, wire in chunk
            ]
            try:
                self.inbox.start()  # before the chunk: a thread refused at exit sends nothing
            except RuntimeError as exc:
                raise RuntimeError(
                    "a call over 1 MiB could not be sent: its lane's writer thread could not "
                    f"start ({exc}); {_NO_THREAD_AT_EXIT}"
                ) from exc
        try:
            future: Future[None] = pool.submit(
                _worker.run_steps, token, shipped, sent, capture, retire_above, sandbox, measure
            )
        except RuntimeError as exc:
            if "can't create new thread" not in str(exc):
                raise
            # Python 3.12, exiting: the worker was forked, its manager thread refused.
            self._kill_forked()
            raise RuntimeError(
                f"no worker could be started to replace one that was lost: {_NO_THREAD_AT_EXIT}"
            ) from exc
        for step, attempt, wire in apart:  # the worker reads each after its Started
            self.inbox.send(step, attempt, wire.call)  # type: ignore[attr-defined]
        self.executor_token = token
        self._fed = True
        self._adopt_worker()  # the first submit started the worker process, if no starter did
        return future

    def start_worker(self) -> None:
        """Start the lane's worker process now, rather than on the first submit.

        Runs in a starter thread (``_start_workers``) while the call already
        submits to the lanes started before; a submit to this lane meanwhile
        waits for it on loky's own lock. A worker that cannot start is left
        to the first submit, which tries again and reports what it meets.
        """
        try:
            with self._lock:
                pool = self._setup()
            pool._ensure_executor_running()
        except Exception:
            return
        self._adopt_worker()

    def warm_up(self) -> Future[object] | None:
        """Have the worker run a no-op call, once, so every thread its executor needs runs.

        loky starts the executor's manager thread at the first submit and the
        call queue's feeder thread when the manager forwards the first call.
        Python 3.12 lets no thread start once the interpreter has begun to
        exit, so a lane that ``ProcessPool`` may still use from its exit hook
        must have both before then. The future is done once they run; None
        when the lane is warm already, or broken (its first submit says why).
        """
        with self._lock:
            if self._warm:
                return None
            pool = self._setup()
        try:
            future: Future[object] = pool.submit(os.getpid)
            self._fed = True
        except Exception:
            return None
        self._adopt_worker()
        future.add_done_callback(self._note_warm)
        return future

    def _note_warm(self, future: Future[object]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._warm = True

    def _adopt_worker(self) -> None:
        """Once the worker runs: keep its process, and drop our copies of its pipes' ends."""
        with self._lock:
            if self._writers and self._pool is not None and self._pool._processes:
                self._process = next(iter(self._pool._processes.values()))
                for writer in self._writers:
                    writer.close()
                self._writers = ()

    def _wait_started(self) -> None:
        """Wait for a starter thread that works on this lane, if any."""
        if self._starting is not None:
            self._starting.wait()

    def interrupt(self, step: int, attempt: int) -> None:
        """Raise ``StepTimeout`` in the worker's step, if it is still running that step.

        The worker checks the step named on the control pipe against the one it
        runs, so a signal that arrives after the step ended never reaches the next.
        """
        if self._process is None:
            return
        try:
            os.write(self._control.fileno(), SOFT_STOP.pack(step, attempt))
            os.kill(self._process.pid, SOFT_STOP_SIGNAL)
        except (OSError, ProcessLookupError):
            pass

    def exit_code(self) -> int | None:
        """The dead worker's exit code (negative: the signal that killed it); None if unknown.

        Unknown when the fork server died before the worker: only the server
        could read the worker's exit status, and it took it along.
        """
        self._wait_started()
        if self._process is None:
            return None
        # Let loky's manager thread finish with the broken executor (shutdown
        # joins it): it reads the worker's exit status first.
        self._pool.shutdown(wait=True, kill_workers=True)
        code = self._process.exitcode
        if code is None or not getattr(self._process, "exit_status_known", True):
            return None
        return int(code)

    def crash_dump(self) -> str:
        """What faulthandler wrote before the worker died ('' if nothing)."""
        chunks = []
        fd = self._crash_reader.fileno()
        while self._crash_reader.poll(0):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def printed(self) -> str:
        """The end of what the lane's current step wrote to fds 1 and 2."""
        return read_tail(self.capture_path)

    def pids(self) -> list[int]:
        """The worker and every process its steps started that is still running.

        With a lane cgroup, that includes processes that left the worker's
        tree (daemons); otherwise it is the worker's descendants.
        """
        if self._process is None:
            return []
        pids = self.cgroup.pids() if self.cgroup is not None else []
        return pids or tree_pids(self._process.pid)

    def _kill_forked(self) -> None:
        """Kill the worker processes loky forked, told of by loky, not by ``_process``.

        For a worker whose manager thread never started: it may not have been
        adopted yet, nor lead its process group.
        """
        with self._lock:
            workers = list((self._pool._processes or {}).values()) if self._pool else []
        for worker in workers:
            worker.kill()

    def _kill_group(self) -> None:
        """SIGKILL the worker's process group: the worker and what its steps started."""
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_soon(self) -> None:
        """Ask an idle lane's worker to exit, without waiting; ``close`` then waits.

        Stopping many lanes this way first lets their workers exit side by
        side rather than one after another.
        """
        self._wait_started()
        if self._pool is not None and self._fed:
            self._stopping = self._pool._executor_manager_thread
            self._pool.shutdown(wait=False)

    def close(self, *, kill: bool) -> None:
        """Stop the worker (at once when ``kill``) and release everything the lane holds.

        A worker that was never sent a call is killed rather than asked to
        exit: asking puts a message on its call queue, whose feeder thread
        starts with the first call, and Python 3.12 starts no thread once the
        interpreter exits (loky's manager then dies printing a traceback).
        Such a worker holds nothing a kill could lose.
        """
        self._wait_started()
        kill = kill or not self._fed
        if kill:
            self._kill_group()
            if self._process is not None:
                # Let loky see the death before shutting down, or the lane's
                # executor can be left holding a semaphore until exit.
                self._process.join(timeout=1.0)
        if self._pool is not None:
            manager = self._pool._executor_manager_thread
            if manager is None:
                manager = self._stopping  # asked to stop earlier (stop_soon): its manager
            if manager is not None and manager.ident is None:
                # Its manager thread never started (Python 3.12 refuses new
                # threads once the interpreter exits, and a starter thread may
                # meet that): nothing will ask the worker forked before it to
                # exit, and multiprocessing's exit would wait for it forever.
                self._kill_forked()
                self._pool.shutdown(wait=False, kill_workers=True)
            else:
                self._pool.shutdown(wait=True, kill_workers=kill)
                if manager is not None:
                    manager.join()
        self._kill_group()  # whatever a step left running
        if self.cgroup is not None:
            self.cgroup.remove()  # and whatever left the process group or the session
        for conn in (self.channel, self._crash_reader, self._control, *self._writers):
            conn.close()
        self.inbox.close()  # its thread, if any, ends once the worker is gone
        self._writers = ()
        try:
            os.unlink(self.capture_path)
        except FileNotFoundError:
            pass


class _Engine:
    """Lends warm lanes to calls, takes the healthy ones back, retires those idle too long.

    The reaper thread sleeps until the earliest ``retire_at`` of the idle
    lanes (or until a lane is given back), takes the lanes due out of the
    idle list under the lock, so no call can acquire them meanwhile, and
    closes them outside it. It also closes the lanes a call retires
    (``retire``): a worker takes about 20 ms to exit, which the call need
    not wait for.
    """

    def __init__(self) -> None:
        self._idle: list[_Lane] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # idle lanes given back, or shutdown
        self._retired: list[_Lane] = []  # to close now, never lent again
        self._reaper: threading.Thread | None = None  # replaced or dropped: the old one ends
        self._lane_numbers = itertools.count(1)
        self._scratch: str | None = None  # a directory for the lanes' capture files

    def next_token(self) -> str:
        """A fresh random id for one call's executor, so each worker unpickles it once."""
        return uuid.uuid4().hex

    def new_lane(self, *, set_up: bool = True) -> _Lane:
        """A new lane, its executor made at once unless a starter thread will (``acquire``)."""
        with self._lock:
            if self._scratch is None:
                _sweep_stale_scratch()
                self._scratch = tempfile.mkdtemp(prefix=f"procorch-{os.getpid()}-")
            path = os.path.join(self._scratch, f"lane-{next(self._lane_numbers)}.out")
        _register_loky_exit_hook()  # here, in the caller's thread, before a pool's own
        lane = _Lane(path)
        if set_up:
            with lane._lock:
                lane._setup()
        return lane

    def acquire(self, count: int, on_started: Callable[[], object] | None = None) -> list[_Lane]:
        """``count`` lanes: idle ones first, then new ones, started in the background.

        A new lane is ``starting`` until its worker runs (or failed to
        start: the first submit then says why); ``on_started`` is called,
        from a starter thread, each time one is done.
        """
        with self._lock:
            lanes = self._idle[-count:] if count else []
            del self._idle[len(self._idle) - len(lanes) :]
        new = [self.new_lane(set_up=False) for _ in range(count - len(lanes))]
        for lane in lanes + new:
            lane.on_started = on_started
        if new:
            _start_workers(new)
        return lanes + new

    def release(self, lanes: list[_Lane], idle_timeout: float | None = None) -> None:
        """Take lanes back, to be retired after ``idle_timeout`` idle seconds (inf: never)."""
        timeout = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        retire_at = None if math.isinf(timeout) else time.monotonic() + timeout
        with self._lock:
            for lane in lanes:
                lane.retire_at = retire_at
            self._idle.extend(lanes)
            if retire_at is not None and lanes:
                self._wake_reaper()

    def retire(self, lane: _Lane) -> None:
        """Close a lane whose worker is idle, in the background: its worker exits."""
        with self._lock:
            self._retired.append(lane)
            self._wake_reaper()

    def _wake_reaper(self) -> None:
        """Start the reaper thread if need be, and make it look again (lock held).

        When the interpreter is exiting, Python 3.12 refuses to start it: the
        lanes then wait for ``shutdown``, which the exit hook runs next.
        """
        if self._reaper is None:
            reaper = threading.Thread(target=self._reap, name="procorch-idle-workers", daemon=True)
            try:
                reaper.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                return
            self._reaper = reaper
        self._changed.notify()

    def _reap(self) -> None:
        """The reaper thread: retire idle lanes as they come due, until shutdown."""
        with self._lock:
            while self._reaper is threading.current_thread():
                now = time.monotonic()
                due = [lane for lane in self._idle if _due(lane, now)]
                if due or self._retired:
                    self._idle = [lane for lane in self._idle if not _due(lane, now)]
                    due += self._retired
                    self._retired = []
                    self._lock.release()
                    try:
                        for lane in due:
                            _retire(lane)
                    finally:
                        self._lock.acquire()
                    continue
                times = [lane.retire_at for lane in self._idle if lane.retire_at is not None]
                self._changed.wait(min(times) - now if times else None)

    def drop_unfed(self) -> None:
        """Kill the idle lanes whose worker was never sent a call (see ``_drop_unfed_lanes``)."""
        with self._lock:
            unfed = [lane for lane in self._idle if not lane._fed]
            self._idle = [lane for lane in self._idle if lane._fed]
        for lane in unfed:
            lane.close(kill=True)

    def shutdown(self) -> None:
        with self._lock:
            reaper, self._reaper = self._reaper, None
            self._changed.notify()
        if reaper is not None:
            reaper.join()  # it may be closing lanes: they are gone before the server stops
        with self._lock:
            lanes, self._idle = self._idle + self._retired, []
            self._retired = []
            scratch, self._scratch = self._scratch, None
        for lane in lanes:
            lane.stop_soon()
        for lane in lanes:
            lane.close(kill=False)
        stop_server()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


_NO_THREAD_AT_EXIT = (
    f"the interpreter is exiting, and Python {sys.version_info[0]}.{sys.version_info[1]} "
    "starts no new thread then"
)

_loky_hook_lock = threading.Lock()


def _register_loky_exit_hook() -> None:
    """Register loky's exit hook once, before any lane starts (so it runs after every pool's).

    loky registers its hook (which stops every executor's manager thread)
    when an executor starts its manager thread, meaning to do it once, but
    it keeps the return value of ``threading._register_atexit`` (None) as
    the sign that it did, so every new executor registers it again. Those
    hooks run last-registered first: a lane started after a ``ProcessPool``
    registered its own exit hook would stop every lane before the pool
    finished its pending calls, and a lane started while the interpreter
    exits (to replace a crashed worker) could not register it and failed.
    Registered here once, and marked as registered for loky.
    """
    executor_module = loky.process_executor
    with _loky_hook_lock:
        if getattr(executor_module, "process_pool_executor_at_exit", False) is not None:
            return  # registered (or a loky that keeps its own record)
        hook = getattr(executor_module, "_python_exit", None)
        if hook is None:
            return
        try:
            threading._register_atexit(hook)  # type: ignore[attr-defined]
            # Ours runs before loky's (registered after it), and after every pool's.
            threading._register_atexit(_drop_unfed_lanes)  # type: ignore[attr-defined]
        except RuntimeError:  # the interpreter is exiting: loky's own try fails the same way
            return
        executor_module.process_pool_executor_at_exit = True


def _drop_unfed_lanes() -> None:
    """At exit, before loky's hook: kill the idle workers that were never sent a call.

    loky's hook asks every executor's worker to exit through its call queue,
    whose feeder thread starts with the first call; Python 3.12 starts no
    thread once the interpreter exits, so a worker started but never used
    (a call done before all its lanes started) made loky's manager die
    printing a traceback. Such a worker holds nothing a kill could lose.
    """
    _engine.drop_unfed()


def _retire(lane: _Lane) -> None:
    """Close an idle lane: its worker exits (or, if that fails, is killed)."""
    try:
        lane.close(kill=False)
    except Exception:  # the reaper must go on with the other lanes
        try:
            lane.close(kill=True)
        except Exception:
            pass


def _due(lane: _Lane, now: float) -> bool:
    return lane.retire_at is not None and lane.retire_at <= now


# How many threads start new lanes' workers at once. Each start is a round
# trip to the fork server (it forks while the caller waits) plus the
# caller's own share (loky's manager thread, pickling the worker's process
# object); with several in flight the waits overlap the work.
_STARTERS = 2


def _start_workers(lanes: list[_Lane]) -> None:
    """Set up and start the workers of new lanes side by side, in the background, in order.

    The call goes on at once and sends work to each lane as soon as it is
    started, so the first steps run while later lanes still start; a lane's
    ``close`` waits for its starter. 32 lanes one after another took about
    20 ms each, and the first step waited for all of them to be made.
    """
    pending = collections.deque(lanes)
    for lane in lanes:
        lane._starting = threading.Event()
    lock = threading.Lock()

    def start() -> None:
        while True:
            with lock:
                if not pending:
                    return
                lane = pending.popleft()
            try:
                lane.start_worker()
            finally:
                assert lane._starting is not None
                lane._starting.set()
                # Read after setting: a call that took the lane meanwhile
                # either sees it started or is the one woken here.
                on_started = lane.on_started
                if on_started is not None:
                    on_started()

    for _ in range(min(_STARTERS, len(lanes))):
        threading.Thread(target=start, name="procorch-lane-start", daemon=True).start()


def _sweep_stale_scratch() -> None:
    """Remove the capture directories of procorch processes that died without cleaning up.

    A SIGKILLed caller cannot remove its directory; the next one does. The
    owner's pid is in the name, and a directory is stale when that process is
    gone (or is another process by now, started after the directory was made).
    """
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "procorch-*-*")):
        try:
            pid = int(os.path.basename(path).split("-")[1])
            made = os.stat(path).st_mtime
        except (ValueError, OSError):
            continue
        try:
            alive = psutil.Process(pid).create_time() <= made + 1
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


_engine = _Engine()
atexit.register(_engine.shutdown)


def shutdown() -> None:
    """Stop every idle worker process that procorch keeps warm between calls.

    The next call starts fresh workers. procorch also does this on interpreter
    exit, and retires each idle worker after its call's ``idle_timeout``
    (``DEFAULT_IDLE_TIMEOUT``, 300 s, by default); call it yourself to free
    the processes sooner, the fork server's included.
    """
    _engine.shutdown()
