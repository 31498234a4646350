"""execute_steps_parallel: the barrier."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Unpack

from ._call import EventTarget, Guards, check_step_timeouts_name_specs, checked_specs, prepare_call
from ._executor import Executor
from ._model import AgentStepSpec, StepOutcome

__all__ = ["execute_steps_parallel"]


def execute_steps_parallel(
    executor: Executor,
    specs: Iterable[AgentStepSpec],
    events: EventTarget | None = None,
    **guards: Unpack[Guards],
) -> list[StepOutcome]:
    """Run every spec in worker processes; return one outcome per spec, in input order.

    At most ``executor.concurrency_hint()`` steps run at once. A step that
    fails in any way, including killing its worker process, yields a failed
    outcome labelled with its ``task_id`` and ``agent``; every other step
    runs as if nothing happened.

    ``events`` receives :data:`Event` records in the calling thread as they
    happen: pass a callable, or anything with a ``put`` method such as a
    ``queue.Queue``.

    Guards (keyword arguments, all off by default):

    - ``step_timeout``: seconds any one step may run; ``step_timeouts`` maps
      a ``task_id`` to its own limit. A step past its limit has its worker
      killed (it may be stuck in C code) and fails with kind ``timeout``.
    - ``call_timeout``: seconds for the whole call. When it runs out, running
      steps fail with kind ``timeout``, queued ones with ``cancelled``, and
      the call returns.
    - ``memory_limit``: bytes of resident memory a step's worker (with the
      processes it started) may use; over it, the step fails with kind
      ``memory``. A worker left above half the cap after a step is replaced.
    - ``retry``: a :class:`RetryPolicy` for failures procorch observed.
    - ``capture_output``: keep what each step writes to its standard output
      and error (C code and child processes included); a failed outcome's
      ``error.printed`` holds the last 4 KiB.
    - ``cancel``: a :class:`CancelToken`; tripping it stops the call.
    - ``max_tasks_per_child``: steps of the call a worker process may run;
      then it is replaced by a fresh one (steps are never lost for it).
    - ``idle_timeout``: seconds a worker may sit idle, during the call or
      kept warm after it, before it exits (300 by default; ``float("inf")``
      keeps it until :func:`procorch.shutdown`).
    - ``concurrency``: at most this many steps at once, instead of the
      executor's ``concurrency_hint()``.

    A spec with an ``output_schema`` must come back with a ``structured``
    value that conforms to it (JSON Schema, draft 2020-12), or its outcome
    fails with kind ``invalid_result`` naming the first violation.

    Ctrl-C (and SIGTERM, when the program has no handler of its own) during
    a call kills every worker process of the call and whatever its steps
    started, then raises KeyboardInterrupt.

    Bad input (an item that is not a spec, a field of the wrong type, a
    repeated ``task_id``, an invalid ``output_schema``, an executor that
    cannot be pickled, a guard out of range) raises before any step starts.
    """
    call = prepare_call(executor, events, guards)
    checked, wire = checked_specs(specs)
    check_step_timeouts_name_specs(guards, checked)
    if not checked:
        return []
    dispatch = call.dispatch()
    for spec, data in zip(checked, wire, strict=True):
        dispatch.add(spec, data)
    dispatch.run(min(call.limit, len(checked)))
    assert dispatch.outcomes is not None
    return [dispatch.outcomes[index] for index in range(len(checked))]
