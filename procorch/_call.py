"""What every entry point checks before any step starts, and the dispatch it builds.

The barrier, the pipeline, the loop and the resumable run all take the same
executor, events target and guards; this module turns them into a ready
``StepLifecycle`` on its backend, or a clear error naming what is wrong.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict, cast

import cloudpickle
import msgspec

from ._backend import BackendFactory, StepBackend
from ._errors import ExecutorError, InvalidSpecError
from ._events import Event
from ._executor import DEFAULT_MAX_PARALLEL_TASKS, Executor
from ._guards import CancelToken, RetryPolicy
from ._lifecycle import StepLifecycle
from ._model import AgentStepSpec, StepOutcome
from ._options import CallOptions
from ._sandbox import Sandbox, check_sandbox
from ._schema import check_output_schema

EventTarget = Callable[[Event], Any] | Any
"""A callable taking each event, or a queue-like object with ``put``."""

_encode = msgspec.msgpack.Encoder().encode
_decode_spec = msgspec.msgpack.Decoder(AgentStepSpec).decode


class Guards(TypedDict, total=False):
    """The guards every entry point accepts (see ``execute_steps_parallel``)."""

    step_timeout: float | None
    step_timeouts: Mapping[str, float] | None
    call_timeout: float | None
    memory_limit: int | None
    retry: RetryPolicy | None
    capture_output: bool
    cancel: CancelToken | None
    sandbox: Sandbox | None
    timeout_grace: float | None
    max_tasks_per_child: int | None
    idle_timeout: float | None
    concurrency: int | None
    backend: Any


class _LocalLanes:
    """The default backend: warm worker processes of this machine (``_local``).

    The pool (``_local``, loky and the worker's modules) is imported by the
    first call that uses it, not with procorch. That call first has procorch's
    fork server start on its own, so the server's start-up (an interpreter
    and its preloads) overlaps the import here instead of following it.
    """

    name = "the local worker processes"

    @property
    def supported_guards(self) -> frozenset[str]:
        guards: frozenset[str] = _local().LOCAL_GUARDS
        return guards

    def step_backend(self, blob: bytes, token: str, options: CallOptions) -> StepBackend:
        backend: StepBackend = _local().LocalBackend(blob, token, options)
        return backend


def _local() -> Any:
    """The local backend's module, imported on first use (see ``_LocalLanes``)."""
    module = sys.modules.get("procorch._local")
    if module is None:
        from ._context import start_server

        start_server()
        from . import _local as module
    return module


_LOCAL = _LocalLanes()


class _Call:
    """A call whose executor, events target and guards passed every check."""

    __slots__ = ("backend", "blob", "emit", "limit", "options")

    def __init__(
        self,
        limit: int,
        blob: bytes,
        emit: Callable[[Event], Any] | None,
        options: CallOptions,
        backend: BackendFactory = _LOCAL,
    ) -> None:
        self.limit = limit
        self.blob = blob
        self.emit = emit
        self.options = options
        self.backend = backend

    def dispatch(
        self,
        on_outcome: Callable[[int, StepOutcome], None] | None = None,
        keep_outcomes: bool = True,
    ) -> StepLifecycle:
        """A fresh step lifecycle for this call, on a fresh backend (a new random token)."""
        backend = self.backend.step_backend(self.blob, uuid.uuid4().hex, self.options)
        return StepLifecycle(backend, self.emit, self.options, on_outcome, keep_outcomes)


def prepare_call(executor: Executor, events: EventTarget | None, guards: Guards) -> _Call:
    """Check the executor, the events target and the guards; pickle the executor."""
    if not callable(getattr(executor, "execute_step", None)):
        raise ExecutorError(
            f"executor must have an execute_step(spec, events) method "
            f"(got {type(executor).__name__})"
        )
    limit = _concurrency(executor, guards.get("concurrency"))
    emit = _event_delivery(events)
    backend = _backend(guards)
    options = _call_options(guards)
    try:
        blob = cloudpickle.dumps(executor)
    except Exception as exc:
        raise ExecutorError(
            f"executor cannot be pickled for the worker processes: {type(exc).__name__}: {exc}"
        ) from exc
    return _Call(limit, blob, emit, options, backend)


def _backend(guards: Guards) -> BackendFactory:
    """The backend named by the guards (the local lanes by default), checked against the rest."""
    backend = guards.get("backend")
    if backend is None:
        return _LOCAL
    if not callable(getattr(backend, "step_backend", None)) or not hasattr(
        backend, "supported_guards"
    ):
        raise TypeError(f"backend must be a DaskBackend or None (got {type(backend).__name__})")
    for guard, value in guards.items():
        if guard in _UNIVERSAL or value is None or value is False:
            continue
        if guard not in backend.supported_guards:
            raise ValueError(
                f"{guard} is not available with {backend.name}{_INSTEAD.get(guard, '')}"
            )
    return cast(BackendFactory, backend)


_UNIVERSAL = frozenset({"backend", "concurrency"})  # read here, not by a backend

_INSTEAD = {
    "memory_limit": ": set the workers' own limits (memory_limit on the Dask workers) instead",
    "capture_output": ": the workers' own logs keep what steps print",
    "max_tasks_per_child": ": the cluster replaces its workers itself (dask worker --lifetime)",
    "idle_timeout": ": the cluster's workers live as long as the cluster keeps them",
}


def add_step(dispatch: Any, spec: AgentStepSpec, data: bytes | None, position: int) -> int:
    """Queue a step whose events name ``position`` in the caller's input; its index."""
    if isinstance(dispatch, StepLifecycle):
        return dispatch.add(spec, data, position)
    return dispatch.add(spec, data)  # type: ignore[no-any-return]  # Dask: dispatch order


# A spec's wire bytes are kept from its check to its sending only when small:
# a large one (a long prompt) is encoded again when it is sent, so a call does
# not hold every prompt twice (400 MB of prompts: parent peak +550 MB before).
KEEP_ENCODED_BYTES = 64 * 1024


def check_spec(index: int, spec: Any) -> bytes | None:
    """The spec's wire bytes (None when large: encoded again at sending), or
    InvalidSpecError naming what is wrong with it.

    One pass: the fields are checked by type here and the spec is encoded
    once; only a spec whose fields are not the plain types (a rare, wrong
    one) or that carries an ``output_schema`` is decoded back, so the error
    says exactly what msgspec's decoder would.
    """
    if not isinstance(spec, AgentStepSpec):
        raise InvalidSpecError(index, f"expected an AgentStepSpec, got {type(spec).__name__}")
    try:
        data = _encode(spec)
        if not _plain(spec):
            _decode_spec(data)
    except UnicodeEncodeError as exc:  # a lone surrogate: not text any encoding can carry
        raise InvalidSpecError(index, _unencodable_text(spec, exc)) from None
    except (TypeError, OverflowError) as exc:
        raise InvalidSpecError(index, f"cannot be encoded: {exc}") from None
    except msgspec.ValidationError as exc:
        raise InvalidSpecError(index, str(exc)) from None
    if spec.output_schema is not None:
        problem = check_output_schema(spec.output_schema)
        if problem is not None:
            raise InvalidSpecError(index, f"output_schema is not a valid JSON Schema: {problem}")
    return data if len(data) <= KEEP_ENCODED_BYTES else None


def _plain(spec: AgentStepSpec) -> bool:
    """Whether every field has the type the decoder wants (then decoding it back proves nothing)."""
    max_steps = spec.max_steps
    parent = spec.parent_session_id
    return (
        type(spec.task_id) is str
        and type(spec.agent) is str
        and type(spec.description) is str
        and type(spec.prompt) is str
        and (max_steps is None or (type(max_steps) is int and max_steps >= 0))
        and (parent is None or type(parent) is str)
        and spec.output_schema is None
    )


def _unencodable_text(spec: AgentStepSpec, exc: UnicodeEncodeError) -> str:
    """Which field holds text that cannot be encoded, and where in it."""
    for field in spec.__struct_fields__:
        value = getattr(spec, field)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as bad:
                return (
                    f"{field} holds text that cannot be encoded as UTF-8 "
                    f"({bad.reason} at position {bad.start}: {value[bad.start : bad.end]!r})"
                )
    return f"holds text that cannot be encoded as UTF-8 ({exc.reason})"


def checked_specs(
    specs: Iterable[AgentStepSpec],
) -> tuple[list[AgentStepSpec], list[bytes | None]]:
    """The specs as a list and as wire bytes, or an error naming the first bad one."""
    if isinstance(specs, (str, bytes, AgentStepSpec)) or not isinstance(specs, Iterable):
        raise TypeError(f"specs must be a list of AgentStepSpec (got {type(specs).__name__})")
    checked = list(specs)
    wire: list[bytes | None] = []
    first_index: dict[str, int] = {}
    for index, spec in enumerate(checked):
        wire.append(check_spec(index, spec))
        earlier = first_index.setdefault(spec.task_id, index)
        if earlier != index:
            raise InvalidSpecError(
                index, f"task_id {spec.task_id!r} is already used by specs[{earlier}]"
            )
    return checked, wire


def check_step_timeouts_name_specs(guards: Guards, specs: Iterable[AgentStepSpec]) -> None:
    """A per-task time limit must name a task of the call."""
    task_ids = {spec.task_id for spec in specs}
    for task_id in guards.get("step_timeouts") or {}:
        if task_id not in task_ids:
            raise ValueError(f"step_timeouts names task_id {task_id!r}, which no spec has")


def _concurrency(executor: Any, concurrency: Any = None) -> int:
    """The call's ``concurrency`` guard if given, else the executor's hint."""
    if concurrency is not None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1 (got {concurrency!r})")
        return concurrency
    hint_method = getattr(executor, "concurrency_hint", None)
    hint = DEFAULT_MAX_PARALLEL_TASKS if hint_method is None else hint_method()
    if isinstance(hint, bool) or not isinstance(hint, int):
        raise ExecutorError(f"concurrency_hint() must return an int (got {hint!r})")
    return max(1, hint)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 (got {value!r})")


def _call_options(guards: Guards) -> CallOptions:
    unknown = set(guards) - set(Guards.__annotations__)  # "backend" is read by _backend
    if unknown:
        raise TypeError(f"unknown guard {sorted(unknown)[0]!r}")
    step_timeout = guards.get("step_timeout")
    if step_timeout is not None:
        _positive("step_timeout", step_timeout)
    step_timeouts = guards.get("step_timeouts") or {}
    for task_id, limit in step_timeouts.items():
        _positive(f"step_timeouts[{task_id!r}]", limit)
    call_timeout = guards.get("call_timeout")
    if call_timeout is not None:
        _positive("call_timeout", call_timeout)
    memory_limit = guards.get("memory_limit")
    if memory_limit is not None and (
        isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0
    ):
        raise ValueError(f"memory_limit must be a number of bytes > 0 (got {memory_limit!r})")
    timeout_grace = guards.get("timeout_grace")
    if timeout_grace is not None:
        _positive("timeout_grace", timeout_grace)
    max_tasks = guards.get("max_tasks_per_child")
    if max_tasks is not None and (
        isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1
    ):
        raise ValueError(f"max_tasks_per_child must be an int >= 1 (got {max_tasks!r})")
    idle_timeout = guards.get("idle_timeout")
    if idle_timeout is not None and (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, (int, float))
        or not idle_timeout >= 0
    ):
        raise ValueError(f"idle_timeout must be a number of seconds >= 0 (got {idle_timeout!r})")
    retry = guards.get("retry")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy (got {type(retry).__name__})")
    cancel = guards.get("cancel")
    if cancel is not None and not isinstance(cancel, CancelToken):
        raise TypeError(f"cancel must be a CancelToken (got {type(cancel).__name__})")
    return CallOptions(
        step_timeout=step_timeout,
        step_timeouts=step_timeouts,
        call_timeout=call_timeout,
        memory_limit=memory_limit,
        retry=retry,
        capture=bool(guards.get("capture_output", False)),
        cancel=cancel,
        sandbox=check_sandbox(guards.get("sandbox")),
        timeout_grace=timeout_grace,
        max_tasks_per_child=max_tasks,
        idle_timeout=idle_timeout,
    )


def _event_delivery(events: EventTarget | None) -> Callable[[Event], Any] | None:
    if events is None:
        return None
    if callable(events):
        return events
    put = getattr(events, "put", None)
    if callable(put):
        return put  # type: ignore[no-any-return]
    raise TypeError(
        f"events must be a callable or an object with a put() method (got {type(events).__name__})"
    )
