"""The Dask backend: the same steps on a ``distributed`` cluster.

``DaskBackend(client_or_address)`` passed as ``backend=`` to any entry point
replaces the local lanes with a cluster. It is a backend factory: each call
gets a ``_DaskSteps``, a ``StepBackend`` that only moves steps to the cluster
and reports what its workers did; the step lifecycle (``_lifecycle``) owns
the rest as for local workers: retries with backoff, time limits, the call's
deadline, cancellation, SIGTERM unwinding, the failure sentences
(``_messages``) and the events.

Data flow for one call (``token`` is the call's random id; every name the
call leaves on the cluster, keys and queue, carries it)::

    open:         client.submit(_executor_bytes)    one task; each worker fetches it once
    start_ready:  steps.take(n) -> client.submit(_run_on_worker, token, <executor task>,
                  spec bytes, step, attempt, key)   a fresh key each; at most `slots` in flight
    worker, one run of a task (Dask runs a task again when its worker dies):
        start (key, step, run id, pid, address)   --Queue.put, synchronous-->  the call's
        run_step(...)                                                           queue on the
        end (the same, Done frame, every progress frame) --Queue.put-------->  scheduler
        each emit: (key, run id, number, Progress frame) --Queue.put, synchronous--> the queue
    parent threads, each only putting news on one queue and waking the lifecycle:
        listener        Queue.get            -> ("run", start or end, receive time),
                                                ("progress", event), ("barrier", n)
        done callback   a task that failed   -> ("failed", task, exception)
    poll() (the calling thread) reads the news in order, each matched by key and run id:
        start                    --> steps.started
        progress, in its order   --> steps.progress
        end                      --> steps.progress (those not reported live), steps.finished
        a second run of a task   --> steps.interrupted(resent), steps.started
        KilledWorker             --> judged once a barrier is back (below)
        any other failure        --> steps.failed, or gave_back if it never started

- A run's start and end travel on one road, the call's queue on the
  scheduler, in order, and each is safe there once its synchronous put
  returns: an end is never read before its start, and a step that crashes at
  once cannot take its unsent start marker down with it (``log_event`` is
  batched). No result is fetched from a worker: a fetch from one that just
  died can hang for Dask's connect timeout (30 s), and a lost result makes
  Dask run a finished step again.
- The start instant handed to the lifecycle is the parent's clock when the
  start arrived (the workers' clocks are not ours): later than the true start
  by the trip through the scheduler, so a time limit counts a little
  generously, never early. (Should an end come without its start, the start
  is placed at the end's arrival minus the duration the worker measured.)
- Progress travels twice: live on the same queue, after its run's start and
  in order, and in the end message (should a live put fail). Every event
  names its task's key, its run and its number in that run: a live one is
  reported only for the run the lifecycle knows as started and only in
  order; the end reports the rest; a late or stale one is dropped by those
  names.
- The call leaves nothing behind: at its end its futures are released (a
  finished step is never computed again when a worker holding its result
  dies), its executor task cancelled, and its queue dropped from the
  scheduler, whoever still holds it (``_forget_on_scheduler``).

Crash attribution: a worker that dies makes the scheduler suspect every task
it held, running or merely queued there, and after
``distributed.scheduler.allowed-failures`` + 1 deaths such a task fails with
``KilledWorker``. That count alone blames innocents: a step queued twice on
the worker a crashing step keeps killing is failed with it. So procorch
weighs its own evidence, the start messages. A ``KilledWorker`` reaches the
parent by another road than the queue and can overtake them, so the backend
first puts a barrier in the queue and judges when it comes back: every start
put before the death has been read by then. A step Dask gave up on that no
run was seen to start is given back to the lifecycle (uncharged; it fails
after too many deaths in a row). One seen running is submitted again under a
new key, uncharged (``StepRerun``), and blamed (``StepCrashed``) when Dask
gives up on that submission too. With one thread per worker, a started,
unfinished step on a dead worker can only be the one that killed it. A
running Python task cannot be interrupted: a step stopped for a guard has its
future cancelled and its worker restarted by its nanny, in the background (a
worker without a nanny cannot be, and the outcome says the step may still be
running there). A blamed step's outcome carries its worker's exit code or
signal, which the nanny publishes on the scheduler (``_dask_nanny``), looked
up from a background thread once the verdict is reached.

The cost of that caution: a step that kills its worker is failed only after
Dask gave up on it twice, that is 2 x (allowed-failures + 1) worker deaths
(8 with Dask's default of 3; set it to 0 on a cluster used for untrusted
steps to make it 2).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from . import _messages
from ._backend import StepBackend, StopFacts
from ._inbox import ApartWire
from ._model import StepError
from ._options import CallOptions
from ._protocol import Done, Progress, decode_frame, progress_frame
from ._usage import UsageMeter, partial_usage

if TYPE_CHECKING:
    from ._lifecycle import StepLifecycle

__all__ = ["DASK_GUARDS", "DaskBackend", "cluster_threads", "ship_executor_module"]

DASK_GUARDS = frozenset({"step_timeout", "step_timeouts", "call_timeout", "retry", "cancel"})

# A step seen running when its worker died is blamed at this many such
# deaths since its last verdict (each a KilledWorker: see the module notes).
_DEATHS_TO_BLAME = 2

# How long the listener's wait on the call's queue may last. The scheduler
# logs every such wait that times out as an error, with a traceback, so it is
# long; close() ends the wait at once with a stop message, and this bounds
# only the case where that message cannot be sent.
_LISTEN_SECONDS = 60.0
_LISTEN_RETRY_SECONDS = 1.0  # after the queue failed (a connection lost), before trying again

# When a call ends early (an exception, Ctrl-C, SIGTERM): how long to wait for
# the start messages still on their way, to know which workers run its steps.
_LAST_STARTS_SECONDS = 5.0

_RESTART_SECONDS = 30.0  # how long restarting a worker may take

# How long a crash verdict waits for the dead worker's exit code to reach the
# scheduler from its nanny (it is there within milliseconds, as a rule).
_EXIT_CODE_SECONDS = 5.0
_EXIT_CODE_POLL_SECONDS = 0.1
_STOP_LISTENER_SECONDS = 5.0  # how long close() waits for the listener to hear its stop


class DaskBackend:
    """Run steps on a Dask ``distributed`` cluster instead of local processes.

    Give it a ``distributed.Client``; or the scheduler's address, or a
    cluster object (``LocalCluster``, ``SLURMCluster``, ``KubeCluster``:
    anything with a ``scheduler_address``), and a client is then made and
    closed with each call, with ``security`` (a ``distributed.Security``,
    for TLS; a cluster object's own by default). Workers with one thread
    each give the cleanest crash attribution (see the module notes).

    ``annotations`` maps a step's ``task_id`` to what Dask should know of
    its task: ``resources`` (``{"GPU": 1}``: only workers started with them
    run it), ``priority`` (higher first), ``workers`` (an address or a list
    of them) and ``allow_other_workers``, as ``Client.submit`` takes them.
    A step no worker can take waits for one (bound it with ``call_timeout``).
    """

    supported_guards = DASK_GUARDS
    name = "the Dask backend"

    def __init__(
        self,
        client_or_address: Any,
        *,
        security: Any = None,
        annotations: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        try:
            import distributed
        except ImportError as exc:  # pragma: no cover - the extra is not installed
            raise ImportError(
                "the Dask backend needs the dask extra: pip install 'procorch[dask]'"
            ) from exc
        self.annotations = _checked_annotations(annotations)
        self.security = security
        if isinstance(client_or_address, str):
            self.address: str | None = client_or_address
            self.client: Any = None
        elif isinstance(client_or_address, distributed.Client):
            if security is not None:
                raise ValueError(
                    "security is for a scheduler address or a cluster: a Client has its own"
                )
            self.address = None
            self.client = client_or_address
        elif isinstance(getattr(client_or_address, "scheduler_address", None), str):
            self.address = client_or_address.scheduler_address
            self.client = None
            if security is None:
                self.security = getattr(client_or_address, "security", None)
        else:
            got = type(client_or_address).__name__
            raise TypeError(
                "DaskBackend takes a distributed.Client, a cluster object (with a "
                f"scheduler_address) or a scheduler address (got {got})"
            )

    def __repr__(self) -> str:
        return f"DaskBackend({self.address or self.client!r})"

    def step_backend(self, blob: bytes, token: str, options: CallOptions) -> StepBackend:
        return _DaskSteps(self, blob, token, options)


_ANNOTATIONS: dict[str, tuple[type, ...]] = {
    "resources": (Mapping,),
    "priority": (int,),
    "workers": (str, list, tuple),
    "allow_other_workers": (bool,),
}


def _checked_annotations(
    annotations: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """``annotations`` as plain dicts, or an error naming the task and what is wrong."""
    if annotations is None:
        return {}
    if not isinstance(annotations, Mapping):
        raise TypeError(
            "annotations must map a task_id to a dict of Dask task annotations "
            f"(got {type(annotations).__name__})"
        )
    checked = {}
    for task_id, given in annotations.items():
        if not isinstance(given, Mapping):
            raise TypeError(f"annotations[{task_id!r}] must be a dict (got {type(given).__name__})")
        for name, value in given.items():
            kinds = _ANNOTATIONS.get(name)
            if kinds is None:
                known = ", ".join(_ANNOTATIONS)
                raise ValueError(f"annotations[{task_id!r}]: unknown {name!r} (known: {known})")
            if not isinstance(value, kinds) or (name == "priority" and isinstance(value, bool)):
                raise ValueError(
                    f"annotations[{task_id!r}][{name!r}] has the wrong type "
                    f"({type(value).__name__})"
                )
        checked[task_id] = dict(given)
    return checked


def cluster_threads(client: Any) -> int | None:
    """The worker threads of the client's cluster now (None if it cannot say, or has none).

    The concurrency a cluster can serve: ``procorch run --dask`` uses it by
    default; from Python, pass ``concurrency=cluster_threads(client)``.
    """
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # the scheduler is away: the call will say so
        return None
    return threads or None


def ship_executor_module(module_name: str, executor: Any) -> list[str]:
    """Have cloudpickle send the executor's own module(s) by value; the names shipped.

    Dask workers import a pickled class by its module's name: a module that
    is not installed on them (a script beside the specs) fails every step
    with ModuleNotFoundError. A module found in this interpreter's
    installation (site-packages, the standard library) or in procorch is
    left to be imported there; the modules a shipped module imports are too.
    """
    import sysconfig

    import cloudpickle

    installed = {
        os.path.realpath(path) + os.sep
        for key in ("purelib", "platlib", "stdlib", "platstdlib")
        if (path := sysconfig.get_paths().get(key))
    }
    shipped = []
    for name in dict.fromkeys([module_name, type(executor).__module__]):
        top = name.partition(".")[0]
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None)
        if module is None or where is None or top == "procorch" or top == "__main__":
            continue
        if top in sys.stdlib_module_names or os.path.realpath(where).startswith(tuple(installed)):
            continue
        cloudpickle.register_pickle_by_value(module)
        shipped.append(name)
    return shipped


# -- in the worker ---------------------------------------------------------------


def _executor_bytes(blob: bytes) -> bytes:
    """The pickled executor, as a task: every worker fetches it once, and a lost copy is redone."""
    return blob


# Clients whose cluster's nannies were asked to publish their workers' exit codes.
_witnessed: weakref.WeakSet[Any] = weakref.WeakSet()
_witnessed_lock = threading.Lock()


def _ask_nannies_for_exit_codes(client: Any) -> None:
    """Register ``_dask_nanny.ExitWitness`` on the cluster, once per client.

    A cluster that refuses it (no nannies, procorch not importable there)
    still runs steps; its crashes are then reported without an exit code.
    """
    with _witnessed_lock:
        if client in _witnessed:
            return
        _witnessed.add(client)
    try:
        from ._dask_nanny import ExitWitness

        client.register_plugin(ExitWitness())
    except Exception:
        pass


def _forget_on_scheduler(queue_name: str, dask_scheduler: Any = None) -> None:
    """On the scheduler at a call's end: drop the call's queue, whoever still holds it.

    ``distributed`` has no public way to delete a queue: it lives while any
    ``Queue`` object made for it is not closed, and each run of a step on a
    worker makes one. It is named by the call's random token, so nothing
    else can be using it.
    """
    queues = getattr(dask_scheduler, "extensions", {}).get("queues")
    if queues is not None:
        queues.queues.pop(queue_name, None)
        queues.client_refcount.pop(queue_name, None)


class _DaskSink:
    """A Dask worker's event sink: each event goes live on the call's queue, and into the end.

    The live put is synchronous, after the run's start on the same road: the
    caller reads every event in order, after its start. (``log_event`` is
    batched: its events overtook the start, and a topic outlives the call.)
    A put costs a round trip to the scheduler, about a millisecond.
    """

    def __init__(self, runs: Any, key: str, run: str, step: int, attempt: int) -> None:
        self._runs = runs
        self._key = key
        self._run = run
        self._step = step
        self._attempt = attempt
        self._lock = threading.Lock()
        self.frames: list[bytes] = []
        self._open = True

    def emit(self, data: Any) -> None:
        frame = progress_frame(self._step, self._attempt, data)
        with self._lock:
            if not self._open:
                return
            self.frames.append(frame)
            message = {"k": self._key, "r": self._run, "n": len(self.frames), "f": frame}
            try:
                self._runs.put(message)
            except Exception:  # the scheduler is away: the end carries the event
                pass

    def close(self) -> None:
        with self._lock:
            self._open = False


def _inline(data: bytes) -> bytes:
    """Wire bytes with their call inside: a Dask worker has no inbox (see ``_inbox``)."""
    if isinstance(data, ApartWire):  # a large ProcessPool call
        from ._payload import inline_wire

        return inline_wire(data)
    return data


def _run_on_worker(
    token: str, blob: bytes, spec_bytes: bytes, step: int, attempt: int, key: str, queue_name: str
) -> None:
    """One run of a step on a Dask worker; ``attempt`` is the one it was submitted as.

    Its start and its end travel as messages of the call's queue on the
    scheduler, put synchronously: one ordered road for both, which survives
    this worker's death the moment each put returns.
    """
    from distributed import Queue, get_worker

    from ._worker import _decode_spec, done_frame, run_step

    worker = get_worker()
    run = uuid.uuid4().hex  # Dask may run this task again elsewhere: each run has its own name
    who = {"k": key, "i": step, "r": run, "pid": os.getpid(), "w": worker.address,
           "n": worker.nanny}  # fmt: skip
    runs = Queue(queue_name)  # type: ignore[no-untyped-call]
    runs.put(who)  # type: ignore[no-untyped-call]
    sink = _DaskSink(runs, key, run, step, attempt)
    meter = _step_meter(worker)
    if meter is not None:
        meter.begin()
    spec = _decode_spec(spec_bytes)
    outcome, duration = run_step(spec, token, blob, sink)
    sink.close()
    usage = meter.end(duration) if meter is not None else partial_usage(duration)
    done = done_frame(spec, step, attempt, outcome, duration, usage)
    runs.put({**who, "d": done, "p": sink.frames})  # type: ignore[no-untyped-call]


def _step_meter(worker: Any) -> Any:
    """A usage meter for this worker process when it runs one step at a time, else None.

    Process-wide figures (CPU, peak memory) are one step's own only on a
    worker with one thread; with more, steps share the process and only the
    wall time is the step's (see ``_usage``). Dask's own threads' CPU during
    the step counts as the step's (a few milliseconds a second, measured
    nowhere else).
    """
    global _dask_meter
    if getattr(getattr(worker, "state", None), "nthreads", None) != 1:
        return None
    if _dask_meter is None or _dask_meter[0] != os.getpid():
        _dask_meter = (os.getpid(), UsageMeter())
    return _dask_meter[1]


_dask_meter: tuple[int, UsageMeter] | None = None


# -- in the caller ------------------------------------------------------------------


class _Task:
    """One submission of a step: a Dask task under a key of its own."""

    __slots__ = (
        "address",
        "attempt",
        "delivered",
        "future",
        "index",
        "key",
        "nanny",
        "pid",
        "run",
    )

    def __init__(self, index: int, key: str, future: Any) -> None:
        self.index = index
        self.key = key
        self.future = future
        self.run: str | None = None  # the run the lifecycle knows as started, if any
        self.attempt = 0  # the lifecycle's attempt number for that run
        self.pid: int | None = None
        self.address: str | None = None
        self.nanny: str | None = None  # its worker's nanny, if it has one (it can restart it)
        self.delivered = 0  # that run's live progress events reported so far


class _Killed:
    """A task Dask gave up on (KilledWorker), judged once barrier ``barrier`` is back."""

    __slots__ = ("barrier", "exc", "task")

    def __init__(self, task: _Task, exc: BaseException) -> None:
        self.task = task
        self.exc = exc
        self.barrier: int | None = None


class _DaskSteps:
    """One call's steps on a Dask cluster, behind the ``StepBackend`` seam."""

    supported_guards = DASK_GUARDS

    def __init__(self, factory: DaskBackend, blob: bytes, token: str, options: CallOptions) -> None:
        self.factory = factory
        self.blob = blob
        self.token = token
        self.options = options
        self.queue_name = f"procorch-{token}-runs"
        self.slots = 1
        self.steps: StepLifecycle | None = None
        self.tasks: dict[int, _Task] = {}  # in flight, by step index
        self.submitted = 0
        self.suspected: dict[int, int] = {}  # step -> worker deaths while it ran, since a verdict
        self.killed: list[_Killed] = []
        self.barriers_sent = 0
        self.barriers_back = 0
        self._news: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._client: Any = None
        self._owns_client = False
        self._executor: Any = None
        self._runs: Any = None
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()
        self._restarts: list[threading.Thread] = []

    # -- the seam ----------------------------------------------------------------------

    def open(self, steps: StepLifecycle, slots: int) -> None:
        import distributed

        self.steps = steps
        self.slots = slots
        if self.factory.client is not None:
            self._client = self.factory.client
        else:
            try:
                self._client = distributed.Client(  # type: ignore[no-untyped-call]
                    self.factory.address,
                    set_as_default=False,
                    timeout="10s",
                    security=self.factory.security,
                )
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(
                    f"cannot reach the Dask scheduler at {self.factory.address}: {exc}"
                ) from None
            self._owns_client = True
        _ask_nannies_for_exit_codes(self._client)
        # A task, not scattered data: a worker's death can lose scattered data
        # for good, while a task's result is computed again from the graph.
        self._executor = self._client.submit(
            _executor_bytes, self.blob, pure=False, key=f"procorch-executor-{self.token}"
        )
        self._runs = distributed.Queue(  # type: ignore[no-untyped-call]
            self.queue_name, client=self._client
        )
        self._listener = threading.Thread(
            target=self._listen, name="procorch-dask-runs", daemon=True
        )
        self._listener.start()

    def warm_up(self, timeout: float) -> None:
        """Nothing to do: the client's threads run already, and the cluster's workers too."""

    def start_ready(self) -> None:
        steps = self._steps()
        free = self.slots - len(self.tasks)
        if free > 0 and steps.queued:
            for index in steps.take(free):
                self._submit(index)

    def wait_handles(self) -> list[Any]:
        return []  # news wakes the lifecycle through steps.wake()

    def next_wakeup(self) -> float | None:
        return None

    def poll(self) -> None:
        while True:
            try:
                news = self._news.get_nowait()
            except queue.Empty:
                break
            kind = news[0]
            if kind == "run":
                self._on_run_message(news[1], news[2])
            elif kind == "progress":
                self._on_progress(news[1])
            elif kind == "failed":
                self._on_failed(news[1], news[2])
            elif kind == "crashed":
                self._on_crashed(news[1], news[2])
            else:
                self.barriers_back = max(self.barriers_back, news[1])
        if self.killed:
            self._judge_killed()

    def interrupt(self, index: int) -> bool:
        """A running Python task on a Dask worker cannot be interrupted (no soft time limit)."""
        return False

    def stop(self, index: int) -> StopFacts:
        task = self.tasks.pop(index, None)
        self.suspected.pop(index, None)
        if task is None:
            return StopFacts()
        self._cancel([task])
        self._forget(task)
        return self._stopped([task]).get(index, StopFacts(pid=task.pid))

    def stop_all(self) -> dict[int, StopFacts]:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        self.killed.clear()
        self._cancel(tasks)
        for task in tasks:
            self._forget(task)
        return self._stopped([task for task in tasks if task.run is not None])

    def _stopped(self, running: list[_Task]) -> dict[int, StopFacts]:
        """Restart the workers of ``running`` (cancelled tasks) that can be, and say what was done.

        A running Python task cannot be stopped any other way; a worker
        without a nanny cannot be restarted, so its step may still be running.
        """
        self._restart_later(
            sorted({task.address for task in running if task.nanny and task.address})
        )
        self._retire_later(
            sorted({task.address for task in running if not task.nanny and task.address})
        )
        facts = {}
        for task in running:
            if task.nanny:
                said = _messages.dask_restarting(task.address)
            else:
                said = _messages.dask_not_restarted(task.address)
            facts[task.index] = StopFacts(pid=task.pid, stopped=said)
        return facts

    def close(self) -> None:
        """Stop whatever still runs (the call ended early), then leave the cluster."""
        client = self._client
        if client is None:
            return  # the scheduler could not be reached
        try:
            if self.tasks:
                self._read_last_runs()
                self.stop_all()
        finally:
            self._closing.set()
            self._stop_listener()
            self._leave(client)
            if self._owns_client:
                # Its restarts would end with it: let them be asked for first.
                for thread in self._restarts:
                    thread.join(timeout=_RESTART_SECONDS)
                client.close()

    def _leave(self, client: Any) -> None:
        """Leave nothing of the call behind: its futures and its queue."""
        for task in list(self.tasks.values()):
            self._forget(task)
        self.killed.clear()
        try:
            client.cancel([self._executor], force=True)
        except Exception:  # the client or the scheduler is already gone
            pass
        self._executor = None
        self.blob = b""  # the call's objects form cycles: do not wait for the collector
        runs, self._runs = self._runs, None
        try:
            client.run_on_scheduler(_forget_on_scheduler, self.queue_name)
        except Exception:  # the scheduler is gone, or refuses to run functions
            try:
                runs.close()  # our own hold on it, at least
            except Exception:
                pass

    # -- sending -------------------------------------------------------------------------

    def _steps(self) -> StepLifecycle:
        assert self.steps is not None, "backend used before open"
        return self.steps

    def _submit(self, index: int) -> None:
        steps = self._steps()
        attempt = steps.attempt(index)
        self.submitted += 1
        # Dask learns task durations by key prefix (the words before the
        # token): steps must not share theirs with the executor task, or the
        # scheduler, taking steps for instant, queues them where that task ran.
        key = f"procorch-step-{self.token}-{index}-{self.submitted}"
        annotations = self.factory.annotations.get(steps.spec(index).task_id, {})
        future = self._client.submit(
            _run_on_worker,
            self.token,
            self._executor,
            _inline(steps.data(index)),
            index,
            attempt,
            key,
            self.queue_name,
            pure=False,
            key=key,
            **annotations,
        )
        task = _Task(index, key, future)
        self.tasks[index] = task
        future.add_done_callback(lambda done, task=task: self._task_done(task, done))

    def _forget(self, task: _Task) -> None:
        """The task is over for this call: out of flight, its key released (never run again)."""
        if self.tasks.get(task.index) is task:
            del self.tasks[task.index]
        try:
            task.future.release()
        except Exception:  # the client is closing: its futures go with it
            pass

    def _cancel(self, tasks: list[_Task]) -> None:
        if tasks:
            try:
                self._client.cancel([task.future for task in tasks], force=True)
            except Exception:  # the client is closing: its futures go with it
                pass

    def _restart_later(self, addresses: list[str]) -> None:
        """Restart the workers at ``addresses`` from another thread: it takes seconds.

        Meanwhile the lifecycle goes on (other steps' limits, the call's
        deadline, cancellation). The step is over for the call already: its
        task is cancelled and its key released.
        """
        if addresses:
            thread = threading.Thread(
                target=self._restart, args=(addresses,), name="procorch-dask-restart", daemon=True
            )
            thread.start()
            self._restarts.append(thread)

    def _retire_later(self, addresses: list[str]) -> None:
        """Take the workers at ``addresses`` (no nanny, a step stuck in their thread) out of
        the scheduler's rotation, from another thread.

        Nothing can stop their step, and the scheduler, taking the cancelled
        task for gone, would go on queueing steps behind it (those of this
        call too, on the worker that holds the executor) where they would
        never start. Retired, the worker's data moves elsewhere and what was
        queued on it runs on the other workers; its process is left alone.
        """
        if addresses:
            thread = threading.Thread(
                target=self._retire, args=(addresses,), name="procorch-dask-retire", daemon=True
            )
            thread.start()
            self._restarts.append(thread)

    def _retire(self, addresses: list[str]) -> None:
        try:
            self._client.retire_workers(workers=addresses, close_workers=False, remove=True)
        except Exception:  # the worker or the scheduler is already gone: nothing to take out
            pass

    def _restart(self, addresses: list[str]) -> dict[str, str]:
        """Restart the workers at ``addresses``; what went wrong, by address."""
        if not addresses:
            return {}
        try:
            status = self._client.restart_workers(
                addresses, timeout=_RESTART_SECONDS, raise_for_error=False
            )
        except Exception as exc:  # no nanny, a worker already gone...
            problem = f"{type(exc).__name__}: {_messages.safe_text(exc)}"
            return dict.fromkeys(addresses, problem)
        return {address: str(said) for address, said in status.items() if said != "OK"}

    # -- news from other threads -----------------------------------------------------------

    def _tell(self, news: tuple[Any, ...]) -> None:
        self._news.put(news)
        self._steps().wake()

    def _listen(self) -> None:
        """Relay the call's queue (starts, progress, ends, barriers) as news, until closed."""
        runs = self._runs
        while not self._closing.is_set():
            try:
                messages = [runs.get(timeout=_LISTEN_SECONDS)]
                messages += runs.get(batch=True)  # a burst in one round trip
            except TimeoutError:
                continue
            except Exception:  # the client closing under us, the scheduler gone...
                if self._closing.wait(_LISTEN_RETRY_SECONDS):
                    return
                continue
            at = time.monotonic()
            for message in messages:
                if "stop" in message:
                    return
                if "b" in message:
                    self._tell(("barrier", message["b"]))
                elif "f" in message:
                    self._tell(("progress", message))
                else:
                    self._tell(("run", message, at))

    def _stop_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            self._runs.put({"stop": True})
        except Exception:  # the scheduler is gone: so is the listener's wait, soon
            pass
        listener.join(timeout=_STOP_LISTENER_SECONDS)

    def _task_done(self, task: _Task, future: Any) -> None:  # Dask's callback thread
        # A finished task's news came through the queue; only a failure is news here.
        # (Its result is None and never fetched: a fetch from a worker that
        # just died can block for the connect timeout, 30 s.)
        if self._closing.is_set() or future.status != "error":
            return
        try:
            exc = future.exception()
        except Exception as lost:  # the client is closing under us
            exc = lost
        self._tell(("failed", task, exc))

    # -- facts for the lifecycle -------------------------------------------------------------

    def _current(self, index: int, key: str) -> _Task | None:
        task = self.tasks.get(index)
        return task if task is not None and task.key == key else None

    def _on_run_message(self, message: dict[str, Any], at: float) -> None:
        """A run of a task began, or (with its Done frame) ended."""
        task = self._current(message["i"], message["k"])
        if task is None:
            return  # stale: a task since finished, stopped or replaced
        if "d" not in message:
            self._run_began(task, message, at)
        else:
            self._on_done(task, message, at)

    def _run_began(self, task: _Task, message: dict[str, Any], at: float) -> bool:
        """Tell the lifecycle that the run of the task ``message`` names began, once.

        False if the lifecycle refused it.
        """
        run, pid = message["r"], message["pid"]
        if task.run == run:
            return True
        steps = self._steps()
        if task.run is not None:
            # Dask runs the task again: the worker of the run we knew died running it.
            reason = _messages.dask_rerun(task.address, by_dask=True)
            steps.interrupted(task.index, task.attempt, reason, resent=True)
        attempt = steps.attempt(task.index)
        if not steps.started(task.index, attempt, pid, at):
            return False
        task.run, task.attempt, task.pid = run, attempt, pid
        task.address, task.nanny = message["w"], message.get("n")
        task.delivered = 0
        return True

    def _on_progress(self, message: dict[str, Any]) -> None:
        try:
            frame = decode_frame(message["f"])
        except (KeyError, TypeError, msgspec.DecodeError, msgspec.ValidationError):
            return  # not a frame of ours: the end message carries every real one
        if not isinstance(frame, Progress):
            return
        task = self._current(frame.step, message.get("k", ""))
        if task is None or task.run != message.get("r") or message.get("n") != task.delivered + 1:
            return  # stale, ahead of its run's start, or out of order: the end reports it
        task.delivered += 1
        self._steps().progress(task.index, task.attempt, frame.data)

    def _on_done(self, task: _Task, message: dict[str, Any], at: float) -> None:
        self._forget(task)  # its key released: Dask must not run it again if a worker dies now
        self.suspected.pop(task.index, None)
        steps = self._steps()
        try:
            done = decode_frame(message["d"])
            progress = [decode_frame(frame) for frame in message["p"]]
            assert isinstance(done, Done) and all(isinstance(f, Progress) for f in progress)
        except (AssertionError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if self._run_began(task, message, at):
                detail = f"its Dask task's report could not be read ({exc!r})"
                said = _messages.lost(steps.spec(task.index), detail)
                error = StepError(kind="internal", message=said, pid=message["pid"])
                steps.failed(task.index, task.attempt, error)
            return
        # Its start came first on the same road, so the run is known;
        # were it not, the start is placed by the duration the worker measured.
        if not self._run_began(task, message, at - done.duration):
            return
        for frame in progress[task.delivered :]:
            assert isinstance(frame, Progress)
            steps.progress(task.index, task.attempt, frame.data)
        steps.finished(task.index, task.attempt, done.outcome, done.duration, done.usage)

    def _on_failed(self, task: _Task, exc: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        if self.tasks.get(task.index) is not task:
            return  # its end was read first, or it was stopped
        if isinstance(exc, KilledWorker):
            self.killed.append(_Killed(task, exc))  # judged on the evidence: see the module notes
            return
        self._forget(task)
        steps = self._steps()
        if task.run is None:
            steps.gave_back([task.index], death=(None, None, _messages.dask_task_ended(exc)))
        else:
            message = _messages.dask_task_failed(steps.spec(task.index), exc)
            error = StepError(kind="internal", message=message, pid=task.pid)
            steps.failed(task.index, task.attempt, error)

    def _judge_killed(self) -> None:
        """Judge the tasks Dask gave up on, once every start put before them was read."""
        unmarked = [killed for killed in self.killed if killed.barrier is None]
        if unmarked:
            self.barriers_sent += 1
            barrier = self.barriers_sent
            try:
                self._runs.put({"b": barrier})
            except Exception:  # no barrier can come back: judge on what arrived
                barrier = self.barriers_back
            for killed in unmarked:
                killed.barrier = barrier
        ready = [
            killed
            for killed in self.killed
            if killed.barrier is not None and killed.barrier <= self.barriers_back
        ]
        self.killed = [killed for killed in self.killed if killed not in ready]
        steps = self._steps()
        for killed in ready:
            task = killed.task
            index = task.index
            if self.tasks.get(index) is not task:
                continue
            self._forget(task)
            if task.run is None:  # never seen to start: an innocent bystander
                steps.gave_back([index], death=(None, None, _messages.dask_gave_up()))
                continue
            deaths = self.suspected.get(index, 0) + 1
            if deaths < _DEATHS_TO_BLAME:
                # Seen running and not ended, but maybe innocent all the same:
                # another step of a worker with several threads, or something
                # outside, may have killed the worker. Its next run decides.
                self.suspected[index] = deaths
                reason = _messages.dask_rerun(task.address, by_dask=False)
                steps.interrupted(index, task.attempt, reason)
            else:
                self.suspected.pop(index, None)
                self._blame_later(task)

    def _blame_later(self, task: _Task) -> None:
        """The task's step killed its worker: blame it with the exit code its nanny saw.

        From another thread, as the code can reach the scheduler a moment
        after the death (see ``_dask_nanny``); meanwhile the step still runs
        for the lifecycle, so its limits and the call's deadline go on.
        """
        thread = threading.Thread(
            target=self._find_exit_code, args=(task,), name="procorch-dask-exit", daemon=True
        )
        thread.start()

    def _find_exit_code(self, task: _Task) -> None:
        from ._dask_nanny import EXITS_TOPIC

        code: int | None = None
        deadline = time.monotonic() + _EXIT_CODE_SECONDS
        while task.nanny is not None and code is None and not self._closing.is_set():
            try:
                events = self._client.get_events(EXITS_TOPIC)
            except Exception:  # the client is closing, the scheduler is away
                break
            for _, said in reversed(events):
                if isinstance(said, dict) and (said.get("pid"), said.get("address")) == (
                    task.pid,
                    task.address,
                ):
                    code = said.get("code")
                    break
            if code is None and self._closing.wait(_EXIT_CODE_POLL_SECONDS):
                break
            if time.monotonic() > deadline:
                break
        if not self._closing.is_set():  # else the call is over: nobody is listening
            self._tell(("crashed", task, code))

    def _on_crashed(self, task: _Task, code: int | None) -> None:
        steps = self._steps()
        message = _messages.dask_crash(
            steps.spec(task.index), task.pid, task.address, code, task.nanny is not None
        )
        steps.crashed(task.index, task.attempt, pid=task.pid, exit_code=code, message=message)

    def _read_last_runs(self) -> None:
        """At an early end: learn which of the tasks in flight began, and where."""
        self.barriers_sent += 1
        barrier = self.barriers_sent
        try:
            self._runs.put({"b": barrier})
        except Exception:
            return
        deadline = time.monotonic() + _LAST_STARTS_SECONDS
        while True:
            try:
                news = self._news.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if news[0] == "barrier" and news[1] >= barrier:
                return
            if news[0] == "run":  # for stop_all only: the lifecycle hears no more
                message = news[1]
                task = self._current(message["i"], message["k"])
                if task is not None and "d" in message:
                    self._forget(task)  # over: nothing to stop
                elif task is not None:
                    task.run, task.pid = message["r"], message["pid"]
                    task.address, task.nanny = message["w"], message.get("n")
