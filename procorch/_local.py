"""The local backend: steps on warm worker processes of this machine, one lane each.

Data flow for one call (the calling thread does all of it)::

    steps.take(n) --chunk--> lane.submit --> worker runs the chunk in order
                                                  |
        lane.channel <-- Started / Progress / Done frames, each naming (step, attempt)
             |
    poll(): every frame matched against what was sent to that lane
             --> steps.started / progress / finished
    a dead worker --> its running step crashed, the rest of its chunk given back;
    a guard (memory) --> the lane killed, its running step failed, the rest given back;
    a frame that matches nothing --> a protocol fault: the lane is killed, the
    step it concerns fails saying so, the rest are given back.

- A lane's worker runs one step at a time and names it in its ``Started``
  frame, so when the worker dies (or is killed for a guard) exactly that step
  is the culprit. Steps queued behind it never began; they run elsewhere
  without being charged an attempt.
- A lane that was sent steps and announces none of them within
  ``_ANNOUNCE_SECONDS`` (a frozen or wedged worker) is killed, and its steps
  are given back: nothing waits behind a worker that cannot run it.
- Chunks amortise the round trip to the worker: their size grows from 1 so
  that a chunk lasts about ``_CHUNK_SECONDS`` whatever the step time, capped
  by bytes of specs, and shrinks at the end of the batch so every lane stays
  busy. While steps are quick (a mean under ``_QUEUE_BEHIND_BELOW``) each
  lane also holds a second chunk queued behind the running one, so a worker
  never waits for the parent between chunks; steps under
  ``_QUEUE_LAST_BELOW`` queue one behind a lane's last running step while no
  other lane is free; slower steps never queue, since work queued on a
  worker cannot be taken back if the step ahead of it turns out slow.
- ``max_tasks_per_child``: a lane is never sent more steps of the call than
  its worker may still start (each ``Started`` counts), and a worker that has
  started its last one is retired once its calls return, a fresh one taking
  its place. Steps are never declined, so none is given back or charged.
- ``idle_timeout``: a lane whose worker has had nothing to do for that long
  is retired (its worker exits) and replaced by a lane whose worker starts
  only when it is sent a step; lanes given back at the end of the call are
  retired by the engine after the same time (see ``_pool``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import sys
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

from . import _messages
from ._backend import StopFacts
from ._model import StepError
from ._options import CallOptions
from ._pool import DEFAULT_IDLE_TIMEOUT, _engine, _Lane
from ._procinfo import memory_over
from ._protocol import Done, Next, Retire, Started

if TYPE_CHECKING:
    from ._lifecycle import StepLifecycle

__all__ = ["LOCAL_GUARDS", "LocalBackend"]

LOCAL_GUARDS = frozenset(
    {
        "sandbox",
        "timeout_grace",
        "step_timeout",
        "step_timeouts",
        "call_timeout",
        "memory_limit",
        "retry",
        "capture_output",
        "cancel",
        "max_tasks_per_child",
        "idle_timeout",
    }
)

# Chunk sizing: a larger target amortises the round trip over more steps; a
# smaller one keeps the tail of a batch balanced across lanes (the fair-share
# cap below does that too). A chunk transition costs its worker about 0.5 ms
# of loky's own work, so a 100 ms chunk loses 0.5 % at most.
_CHUNK_SECONDS = 0.1
_MAX_CHUNK = 8192
_MAX_CHUNK_BYTES = 4 * 1024 * 1024  # of specs: a chunk of long prompts holds one or a few
_PIPELINE_DEPTH = 2  # chunks a lane may hold: the running one and the next
# Under this mean step time a second chunk queues behind a lane's running one
# as soon as that one has begun: the worker never waits for the parent.
_QUEUE_BEHIND_BELOW = 0.01
# Under this one, a second chunk queues once the lane runs the last step it
# holds, so it waits behind that one step at most (as ProcessPoolExecutor's
# one extra queued call does). Slower steps never queue: queued work cannot
# be taken back, and a step queued behind a one-second step waits a second
# while another lane may be idle, for a gain of under 0.1 %.
_QUEUE_LAST_BELOW = 0.1

# Python 3.12.0 to 3.12.2 refuse to start a thread once the interpreter
# exits (CPython gh-113964, gh-115533); taken as all of 3.12, to be safe.
_NO_THREADS_AT_EXIT = sys.version_info[:2] == (3, 12)

# A lane that runs a step with more queued behind it is left unwatched
# (its channel out of the wait) for as long as the steps ahead of its last
# one should take, at most this long, when nothing it reports is awaited
# before then: no events, no outcome hooks, no time limits, no memory or
# process watch. Its frames wait in its pipe (about 70 bytes a step) and are
# read at the next turn, before any verdict: a wake-up (a returned or broken
# call, a cancel), a timer or the call's deadline reads every lane. At 10 ms
# steps this turns one wake-up of the caller per step into one per five.
_COAST_SECONDS = 0.05
# Steps quicker than this are not worth a timer: their frames fill the pipe first.
_COAST_ABOVE = 0.0005

# How long a lane may hold steps without starting any before it is taken for
# frozen (SIGSTOPped, wedged) and killed; its steps run elsewhere, uncharged.
# A warm worker announces a step within milliseconds and a fresh one within
# tens; the bound is far above both so that a busy machine never trips it.
_ANNOUNCE_SECONDS = 10.0
# The bound when another lane of the call sits idle and could run those
# steps now: killing a lane that was only slow to start costs one fork.
_ANNOUNCE_SECONDS_PEER_IDLE = 2.0

# At the end of a call, how long a lane whose steps are all done may take to
# report its last call returned before it is killed instead of kept warm.
_LAST_RETURN_SECONDS = 2.0

# How often the memory of busy workers is read when a cap is set. A step
# that allocates faster than cap / interval can overshoot by that much.
_MEMORY_POLL_SECONDS = 0.02

_Id = tuple[int, int]  # (step index, attempt)

_SIGXCPU = -24  # the exit code of a worker that went over RLIMIT_CPU


class _LaneWork:
    """What one lane of this call is doing."""

    __slots__ = (
        "chatty",
        "chunks",
        "coast_until",
        "idle_since",
        "lane",
        "maybe_returned",
        "pid",
        "retiring",
        "running",
        "sent",
        "started",
        "waiting_since",
    )

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane
        self.sent: collections.deque[_Id] = collections.deque()  # not yet done, in run order
        self.chunks: list[tuple[Future[None], list[_Id]]] = []  # calls not yet seen returned
        self.running: _Id | None = None  # the step the worker announced and has not finished
        self.pid: int | None = None
        self.retiring = False  # the worker grew too large and takes no more steps
        # Since when the lane holds steps without running any (None: it runs
        # one, or holds none): the frozen-worker clock.
        self.waiting_since: float | None = None
        self.idle_since: float | None = None  # its worker has had nothing to do since
        self.started = 0  # steps of this call its worker started (max_tasks_per_child)
        # Until then its channel is not watched: it has steps queued for that
        # long and nothing it reports is awaited (see _COAST_SECONDS).
        self.coast_until = 0.0
        # It sent events or a frame of more than a few bytes in this call:
        # never left unwatched, so that its worker never waits on a full pipe.
        self.chatty = False
        # Set (from loky's thread) when one of its calls returned: only then
        # are the futures looked at, each look taking the future's lock.
        self.maybe_returned = False

    def note_return(self, _: object) -> None:
        self.maybe_returned = True

    @property
    def busy(self) -> bool:
        return bool(self.sent or self.chunks)

    def reset(self, lane: _Lane) -> None:
        """Start over on a fresh lane."""
        self.lane = lane
        self.sent.clear()
        self.chunks.clear()
        self.running = None
        self.pid = None
        self.retiring = False
        self.waiting_since = None
        self.idle_since = None
        self.started = 0
        self.coast_until = 0.0
        self.chatty = False


class LocalBackend:
    """Lanes of this machine behind the ``StepBackend`` seam."""

    supported_guards = LOCAL_GUARDS

    def __init__(self, blob: bytes, token: str, options: CallOptions) -> None:
        self.blob = blob
        self.token = token
        self.options = options
        self.works: list[_LaneWork] = []
        self.mean_duration: float | None = None
        # A worker left holding more than half the cap is retired between
        # steps, so that the next step starts with room to work.
        limit = options.memory_limit
        self.retire_above = None if limit is None else limit // 2
        self.next_memory_check = 0.0
        sandbox = options.sandbox
        self.max_processes = None if sandbox is None else sandbox.processes
        self._watch_usage = limit is not None or self.max_processes is not None
        self.max_tasks = options.max_tasks_per_child
        idle = options.idle_timeout
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT if idle is None else idle
        self.steps: StepLifecycle | None = None
        # A large bytes result as a memoryview into the frame it came in, not
        # a copy: set by ProcessPool, which unpickles its results from there.
        self.structured_views = False
        self._may_coast = False  # set by open: nothing a lane reports is awaited

    # -- the seam ----------------------------------------------------------------------

    def open(self, steps: StepLifecycle, slots: int) -> None:
        self.steps = steps
        options = self.options
        self._may_coast = (
            steps.emit is None
            and steps.on_outcome is None
            and options.step_timeout is None
            and not options.step_timeouts
            and not self._watch_usage
            and self.max_tasks is None
        )
        self.works = [_LaneWork(lane) for lane in _engine.acquire(slots, steps.wake)]

    def warm_up(self, timeout: float) -> None:
        """Start every lane's worker now, and wait until none needs a new thread to take work.

        ``ProcessPool`` calls this before its first ``submit`` returns, so the
        calls it finishes from its exit hook need no thread (see
        ``_Lane.warm_up``). A worker that is not ready within ``timeout``
        seconds is left to the usual checks of the first chunk sent to it.
        Elsewhere threads may start at exit, and the lanes start in the
        background (``_start_workers``) while the first calls run.
        """
        if not _NO_THREADS_AT_EXIT:
            return
        for work in self.works:
            work.lane._wait_started()
        futures = [work.lane.warm_up() for work in self.works]
        concurrent.futures.wait([f for f in futures if f is not None], timeout=timeout)

    def start_ready(self) -> None:
        steps = self._steps()
        if not steps.queued:
            return
        # Idle lanes first; then a second chunk queued behind a running one:
        # for quick steps as soon as it has begun, for steps up to
        # _QUEUE_LAST_BELOW once it runs its last step. A step queued behind a
        # slow one would wait for it (queued work cannot be taken back).
        mean = self.mean_duration
        quick = mean is not None and mean < _QUEUE_BEHIND_BELOW
        queue_last = mean is not None and mean < _QUEUE_LAST_BELOW
        works = self.works if len(self.works) == 1 else sorted(self.works, key=_held)
        if queue_last and not quick and any(not work.sent for work in works):
            queue_last = False  # a lane is (about to be) free: nothing waits behind a step
        for work in works:
            if not steps.queued:
                return
            if work.retiring or work.lane.frames.eof:
                continue
            if work.lane.starting:
                continue  # its worker is on its way: the starter wakes us when it is ready
            if work.chunks:
                if len(work.chunks) >= _PIPELINE_DEPTH or work.running is None:
                    continue  # full, or it has not begun what it holds: nothing behind it
                if not quick and not (queue_last and len(work.sent) == 1):
                    continue
            size = self._chunk_size()
            if self.max_tasks is not None:
                self._retire_if_spent(work)
                size = min(size, self._room(work))
                if size < 1:
                    continue  # its worker will start all it may; it is retired after them
            chunk = steps.take_wire(size, _MAX_CHUNK_BYTES)
            if not chunk:
                return
            try:
                future = work.lane.submit(
                    self.token,
                    self.blob,
                    chunk,
                    self.options.capture,
                    self.retire_above,
                    self.options.sandbox,
                    steps.emit is not None,  # usage travels on events only: measure for them
                )
            except (BrokenProcessPool, ShutdownExecutorError):
                # The worker died while idle; the chunk never began.
                steps.gave_back([index for index, _, _ in chunk])
                if not work.chunks:
                    self._replace_lane(work)
                continue
            future.add_done_callback(work.note_return)  # first: set before the wake-up
            future.add_done_callback(steps.wake)
            ids = [(index, attempt) for index, attempt, _ in chunk]
            work.chunks.append((future, ids))
            work.sent.extend(ids)
            if work.running is None:
                work.coast_until = 0.0  # watched until it announces a step
                if work.waiting_since is None:
                    work.waiting_since = time.monotonic()

    def wait_handles(self) -> list[Any]:
        if self._may_coast:
            now = time.monotonic()
            return [
                work.lane.channel
                for work in self.works
                if work.busy and not work.lane.frames.eof and work.coast_until <= now
            ]
        return [work.lane.channel for work in self.works if work.busy and not work.lane.frames.eof]

    def next_wakeup(self) -> float | None:
        waiting = [work.waiting_since for work in self.works if work.waiting_since is not None]
        bound = self._announce_bound() if waiting else 0.0
        wake_at = [since + bound for since in waiting]
        if self._watch_usage and any(w.running for w in self.works):
            wake_at.append(self.next_memory_check)
        if not math.isinf(self.idle_timeout):
            wake_at.extend(
                work.idle_since + self.idle_timeout
                for work in self.works
                if work.idle_since is not None
            )
        if self._may_coast:
            now = time.monotonic()
            wake_at.extend(w.coast_until for w in self.works if w.coast_until > now)
        if any(work.lane.starting for work in self.works):
            # Each lane's starter wakes the call when it is done; this only backs it up.
            wake_at.append(time.monotonic() + 0.5)
        return min(wake_at) if wake_at else None

    def poll(self) -> None:
        # Only the lanes with news: those whose channel the wait saw ready
        # (data, or the end of it), and those with a call seen returned.
        # Poll is level-triggered, so nothing that had arrived is left unread.
        ready = self._steps().ready
        for work in self.works:
            if ready is None or work.maybe_returned or work.lane.frames.fd in ready:
                self._service(work)
        self._check_announcements()
        self._check_usage()
        self._check_idle()

    def stop(self, index: int) -> StopFacts:
        work = self._running(index)
        return StopFacts() if work is None else self._kill_running(work)

    def interrupt(self, index: int) -> bool:
        work = self._running(index)
        if work is None or work.running is None:
            return False
        work.lane.interrupt(*work.running)
        return True

    def _running(self, index: int) -> _LaneWork | None:
        """The lane whose worker announced step ``index`` and has not finished it."""
        for work in self.works:
            if work.running is not None and work.running[0] == index:
                return work
        return None

    def stop_all(self) -> dict[int, StopFacts]:
        facts = {}
        for work in self.works:
            if work.running is not None:
                index = work.running[0]
                facts[index] = self._kill_running(work)
            elif work.busy:
                self._give_back(work)
                self._replace_lane(work)
        return facts

    def close(self) -> None:
        """Give healthy lanes back; kill lanes whose work is unfinished."""
        healthy = []
        for work in self.works:
            if not work.sent and _returned_cleanly([future for future, _ in work.chunks]):
                healthy.append(work.lane)
            else:
                work.lane.close(kill=True)
        _engine.release(healthy, self.options.idle_timeout)
        self.works = []

    # -- sending -------------------------------------------------------------------------

    def _steps(self) -> StepLifecycle:
        assert self.steps is not None, "backend used before open"
        return self.steps

    def _chunk_size(self) -> int:
        if self.mean_duration is None:
            return 1
        wanted = int(_CHUNK_SECONDS / max(self.mean_duration, 1e-6))
        fair = math.ceil(self._steps().queued / (_PIPELINE_DEPTH * len(self.works)))
        return max(1, min(wanted, fair, _MAX_CHUNK))

    # -- hearing from lanes ---------------------------------------------------------------

    def _service(self, work: _LaneWork) -> None:
        if not work.busy:
            return
        # Look at the calls before draining: a worker writes a chunk's last
        # frame before its call returns, so once a call is seen returned every
        # frame of its chunk is already in the pipe. Looking after draining races.
        returned = []
        if work.maybe_returned:
            work.maybe_returned = False  # before looking: a later return sets it again
            returned = [(future, chunk) for future, chunk in work.chunks if future.done()]
        frames, error = work.lane.frames.read(self.structured_views)
        if frames:
            problem = self._on_frames(work, frames)
            if problem is not None:
                self._protocol_fault(work, problem)
                return
        if error is not None:
            self._protocol_fault(work, f"a frame could not be decoded: {error}")
            return
        if work.running is None and work.sent and work.waiting_since is None:
            work.waiting_since = time.monotonic()  # it holds steps and runs none of them
        if self._may_coast:
            self._coast(work)
        for future, _ in returned:
            failure = future.exception()
            if isinstance(failure, BrokenProcessPool):
                self._on_dead_worker(work)
                return
            if failure is not None:
                self._on_broken_worker(work, failure)
                return
        if work.retiring:
            self._give_back(work)
            self._replace_lane(work, kill=False)  # it runs nothing: its calls return at once
            return
        for future, chunk in returned:
            work.chunks.remove((future, chunk))
            # Chunks run in order and every Done leaves the front of `sent`: a
            # returned chunk left unreported steps iff one of them is in front.
            if work.sent and work.sent[0] in chunk:
                index, attempt = work.sent[0]
                self._protocol_fault(
                    work, f"its call returned without reporting step {index} attempt {attempt}"
                )
                return
        if self.max_tasks is not None:
            self._retire_if_spent(work)

    def _coast(self, work: _LaneWork) -> None:
        """Leave the lane unwatched while the steps before its last one run (_COAST_SECONDS)."""
        mean = self.mean_duration
        ahead = len(work.sent) - 2  # queued behind the running step, but its last
        frames = work.lane.frames
        if frames.loud:
            frames.loud = False
            work.chatty = True
        if work.chatty or work.running is None or ahead < 1 or mean is None or mean < _COAST_ABOVE:
            work.coast_until = 0.0
        else:
            work.coast_until = time.monotonic() + min(mean * ahead, _COAST_SECONDS)

    def _on_frames(self, work: _LaneWork, frames: list[Any]) -> str | None:
        """Report a lane's frames in order; a description of the first mismatch, if any.

        The hot path, a ``Next`` that ends the running step and starts the one
        sent after it, is matched here in line; every other frame, and any
        ``Next`` that does not match, goes through ``_on_frame``.
        """
        steps = self._steps()
        finished = steps.finished
        started = steps.started
        sent = work.sent
        for frame in frames:
            if type(frame) is Next:
                done = frame.done
                running = work.running
                if (
                    running is not None
                    and running[0] == done.step
                    and running[1] == done.attempt
                    and len(sent) > 1
                ):
                    following = sent[1]
                    if following[0] == frame.step and following[1] == frame.attempt:
                        sent.popleft()
                        duration = done.duration
                        mean = self.mean_duration
                        self.mean_duration = (
                            duration if mean is None else 0.8 * mean + 0.2 * duration
                        )
                        finished(done.step, done.attempt, done.outcome, duration, done.usage)
                        if not started(frame.step, frame.attempt, frame.pid, frame.at):
                            work.running = None
                            return f"step {following} was not waiting to start"
                        work.started += 1
                        work.running = following
                        work.pid = frame.pid
                        work.waiting_since = None
                        continue
            problem = self._on_frame(work, frame)
            if problem is not None:
                return problem
        return None

    def _on_frame(self, work: _LaneWork, frame: Any) -> str | None:
        """Report one frame to the lifecycle; a description of the mismatch, if any."""
        kind = type(frame)
        if kind is Next:  # a Done, then the next step's Started: the hot path
            problem = self._on_done(work, frame.done)
            return problem if problem is not None else self._on_started(work, frame)
        if kind is Done:
            return self._on_done(work, frame)
        if kind is Started:
            return self._on_started(work, frame)
        identity = (frame.step, frame.attempt)
        if kind is Retire:
            if work.running is not None or not work.sent or work.sent[0] != identity:
                expected = work.sent[0] if work.sent and work.running is None else None
                return f"it announced step {identity} while {_expecting(work, expected)}"
            work.retiring = True
            return None
        work.chatty = True  # events: its pipe may fill at any moment
        if work.running != identity:
            return f"it sent progress for step {identity} while {_expecting(work, None)}"
        self._steps().progress(frame.step, frame.attempt, frame.data)
        return None

    def _on_done(self, work: _LaneWork, frame: Done) -> str | None:
        running = work.running
        if running is None or running[0] != frame.step or running[1] != frame.attempt:
            identity = (frame.step, frame.attempt)
            return f"it sent an outcome for step {identity} while {_expecting(work, None)}"
        work.sent.popleft()
        work.running = None
        # The frozen-lane clock starts at the end of _service if no Started followed.
        duration = frame.duration
        mean = self.mean_duration
        self.mean_duration = duration if mean is None else 0.8 * mean + 0.2 * duration
        self.steps.finished(  # type: ignore[union-attr]
            frame.step, frame.attempt, frame.outcome, duration, frame.usage
        )
        return None

    def _on_started(self, work: _LaneWork, frame: Started | Next) -> str | None:
        step, attempt = frame.step, frame.attempt
        sent = work.sent
        if work.running is not None or not sent or sent[0] != (step, attempt):
            expected = sent[0] if sent and work.running is None else None
            return f"it announced step {(step, attempt)} while {_expecting(work, expected)}"
        if not self.steps.started(step, attempt, frame.pid, frame.at):  # type: ignore[union-attr]
            return f"step {(step, attempt)} was not waiting to start"
        work.started += 1
        work.running = sent[0]
        work.pid = frame.pid
        work.waiting_since = None
        return None

    def _on_dead_worker(self, work: _LaneWork) -> None:
        """The lane's worker died: the step it was running is the culprit."""
        lane = work.lane
        dump = lane.crash_dump()
        exit_code = _exit_code(lane.exit_code(), dump)
        pid = work.pid if work.pid is not None else lane.pid
        printed = lane.printed() if self.options.capture else None
        running = work.running
        work.running = None
        if running is None:
            self._give_back(work, death=(pid, exit_code, dump))
        else:
            work.sent.remove(running)
            self._give_back(work)
        self._replace_lane(work)
        if running is None:
            return
        sandbox = self.options.sandbox
        if sandbox is not None and sandbox.cpu_seconds is not None and exit_code == _SIGXCPU:
            spec = self._steps().spec(running[0])
            error = StepError(
                kind="cpu_time",
                message=_messages.cpu_time(spec, pid, sandbox.cpu_seconds),
                exit_code=exit_code,
                signal="SIGXCPU",
                pid=pid,
                limit=float(sandbox.cpu_seconds),
                printed=printed,
            )
            self._steps().failed(*running, error)
            return
        self._steps().crashed(*running, pid=pid, exit_code=exit_code, dump=dump, printed=printed)

    def _on_broken_worker(self, work: _LaneWork, exc: BaseException) -> None:
        """The worker's call raised: it can no longer report (a step broke its channel?)."""
        detail = f"the worker failed with {type(exc).__name__}: {_messages.safe_text(exc)}"
        self._protocol_fault(work, detail)

    def _protocol_fault(self, work: _LaneWork, detail: str) -> None:
        """The lane's reports cannot be trusted: kill it; the step it concerns fails."""
        running = work.running
        pid = work.pid if work.pid is not None else work.lane.pid
        work.running = None
        if running is not None:
            work.sent.remove(running)
            self._give_back(work)
        else:
            self._give_back(work, death=(pid, None, detail))
        self._replace_lane(work)
        if running is not None:
            spec = self._steps().spec(running[0])
            message = _messages.unreadable_report(spec, pid, detail)
            self._steps().failed(*running, StepError(kind="internal", message=message, pid=pid))

    def _give_back(
        self, work: _LaneWork, death: tuple[int | None, int | None, str] | None = None
    ) -> None:
        """Every step the lane holds and never began goes back to the lifecycle."""
        unstarted = [index for index, _ in work.sent]
        work.sent.clear()
        if unstarted:
            self._steps().gave_back(unstarted, death=death)

    def _replace_lane(self, work: _LaneWork, *, kill: bool = True) -> None:
        """A fresh lane in place of this one, killed, or (``kill=False``) left to exit."""
        if kill:
            work.lane.close(kill=True)
        else:  # its worker is idle: it exits in the background, no step waits for it
            _engine.retire(work.lane)
        work.reset(_engine.new_lane())

    # -- guards of this backend ---------------------------------------------------------

    def _room(self, work: _LaneWork) -> int:
        """How many more steps the lane may be sent under max_tasks_per_child."""
        assert self.max_tasks is not None
        unstarted = len(work.sent) - (work.running is not None)
        return self.max_tasks - work.started - unstarted

    def _retire_if_spent(self, work: _LaneWork) -> None:
        """Replace a lane whose worker started its last step under max_tasks_per_child."""
        assert self.max_tasks is not None
        if not work.busy and work.started >= self.max_tasks:
            self._replace_lane(work, kill=False)  # its calls returned: it exits at once

    def _check_idle(self) -> None:
        """Retire the workers that have had nothing to do for idle_timeout seconds."""
        now = time.monotonic()
        for work in self.works:
            if work.busy or work.lane.pid is None:
                work.idle_since = None  # working, or no worker started yet
            elif work.idle_since is None:
                work.idle_since = now
            elif now - work.idle_since >= self.idle_timeout:
                self._replace_lane(work, kill=False)  # a lane whose worker starts when sent work

    def _announce_bound(self) -> float:
        """How long a lane may hold steps without starting one (see _ANNOUNCE_SECONDS)."""
        peer_idle = any(
            not work.busy and not work.lane.frames.eof and not work.lane.starting
            for work in self.works
        )
        return _ANNOUNCE_SECONDS_PEER_IDLE if peer_idle else _ANNOUNCE_SECONDS

    def _check_announcements(self) -> None:
        """Kill lanes that hold steps and started none of them in time (frozen workers)."""
        if all(work.waiting_since is None for work in self.works):
            return
        now = time.monotonic()
        bound = self._announce_bound()
        for work in self.works:
            since = work.waiting_since
            if since is None or now - since < bound or work.running is not None:
                continue
            self._service(work)  # one last look: the announcement may be in the pipe
            if work.running is not None or work.waiting_since != since:
                continue
            pid = work.lane.pid
            said = (
                f"it did not start any of the steps sent to it within {bound:g} s "
                "(stopped or wedged), so it was killed"
            )
            self._give_back(work, death=(pid, None, said))
            self._replace_lane(work)

    def _check_usage(self) -> None:
        """The memory cap and the sandbox's process count, read every _MEMORY_POLL_SECONDS."""
        limit = self.options.memory_limit
        now = time.monotonic()
        if not self._watch_usage or now < self.next_memory_check:
            return
        self.next_memory_check = now + _MEMORY_POLL_SECONDS
        for work in self.works:
            if work.running is None:
                continue
            pids = work.lane.pids()
            if self.max_processes is not None and len(pids) - 1 > self.max_processes:
                index, attempt = work.running
                spec = self._steps().spec(index)
                facts = self._kill_running(work)
                words = f"it had {len(pids) - 1} processes running, more than the "
                words += f"{self.max_processes} allowed, so they were killed"
                error = StepError(
                    kind="processes",
                    message=_messages.sandbox_breach(spec, words, None),
                    pid=facts.pid,
                    limit=float(self.max_processes),
                    printed=facts.printed,
                )
                self._steps().failed(index, attempt, error)
                continue
            used = None if limit is None else memory_over(pids, limit)
            if used is not None:
                assert limit is not None
                index, attempt = work.running
                spec = self._steps().spec(index)
                facts = self._kill_running(work)
                error = StepError(
                    kind="memory",
                    message=_messages.memory(spec, facts.pid, used, limit),
                    pid=facts.pid,
                    limit=float(limit),
                    memory=used,
                    printed=facts.printed,
                )
                self._steps().failed(index, attempt, error)

    def _kill_running(self, work: _LaneWork) -> StopFacts:
        """Kill the lane running a step; its other steps go back to the queue."""
        pid = work.pid
        printed = work.lane.printed() if self.options.capture else None
        running = work.running
        work.running = None
        if running is not None:
            work.sent.remove(running)
        self._give_back(work)
        self._replace_lane(work)
        return StopFacts(
            pid=pid, printed=printed, stopped=f"its worker process (pid {pid}) was killed"
        )


def _held(work: _LaneWork) -> int:
    return len(work.chunks)


def _expecting(work: _LaneWork, expected: _Id | None) -> str:
    if work.running is not None:
        return f"running step {work.running}"
    if expected is not None:
        return f"step {expected} was due to start next"
    return "it had no step to run"


# faulthandler's first line names the fatal signal it caught.
_FAULTHANDLER_SIGNALS = {
    "Segmentation fault": -11,
    "Aborted": -6,
    "Bus error": -7,
    "Floating-point exception": -8,
    "Illegal instruction": -4,
}


def _exit_code(reported: int | None, dump: str) -> int | None:
    """The worker's exit code, corrected by faulthandler's word where the fork server lost it.

    The fork server relays a worker's exit status over a socket, and now and
    then reports 255 instead (CPython's bpo-30589; seen here about once in 300
    crashes). When faulthandler named the fatal signal, that signal is the truth.
    """
    if reported is None or reported == 255:
        for name, code in _FAULTHANDLER_SIGNALS.items():
            if f"Fatal Python error: {name}" in dump:
                return code
    return reported


def _returned_cleanly(futures: list[Future[None]]) -> bool:
    """True when every chunk call returns without error (each has sent its last frame)."""
    done, pending = concurrent.futures.wait(futures, timeout=_LAST_RETURN_SECONDS)
    return not pending and all(future.exception() is None for future in done)
