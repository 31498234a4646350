"""On a Dask nanny: how each worker process it ran ended (exit code or signal).

Dask tells a client that a worker died (``KilledWorker``) but not how: the
nanny, the worker's parent, is the one process that sees its exit code, and
only logs it. ``ExitWitness`` is a ``NannyPlugin`` that publishes each
worker process's end on the scheduler's ``procorch-worker-exits`` topic, as
``{"address", "pid", "code"}`` (``code`` is the exit code, negative for a
signal as in ``subprocess``), so the Dask backend can put it in a crash
outcome. The topic is one per cluster, bounded by the scheduler's
``distributed.admin.low-level-log-length`` (one small event per worker death),
and nothing is published per call.

This module imports ``distributed`` at its top: only ``_dask`` imports it,
when a call registers the plugin.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import NannyPlugin

__all__ = ["EXITS_TOPIC", "ExitWitness"]

EXITS_TOPIC = "procorch-worker-exits"
_WATCHED = "_procorch_exit_witness"


class ExitWitness(NannyPlugin):  # type: ignore[misc]  # distributed is untyped
    """Publish the end of every worker process this nanny starts, from now on."""

    name = "procorch-exit-witness"
    idempotent = True

    def setup(self, nanny: Any) -> None:
        if getattr(nanny, _WATCHED, False):
            return  # registered again (another client of the same cluster)
        setattr(nanny, _WATCHED, True)
        instantiate = nanny.instantiate

        async def instantiate_and_watch(*args: Any, **kwargs: Any) -> Any:
            status = await instantiate(*args, **kwargs)
            _watch(nanny)
            return status

        nanny.instantiate = instantiate_and_watch  # the nanny starts each worker through it
        _watch(nanny)  # the worker running now


def _watch(nanny: Any) -> None:
    """Have the nanny's current worker process publish its exit code when it ends.

    The nanny may start its next worker in the same ``WorkerProcess`` object:
    the hook is put on it once, and the pid and address it publishes are those
    of the run just started.
    """
    process = nanny.process
    if process is None or process.pid is None:
        return
    first = getattr(process, _WATCHED, None) is None
    setattr(process, _WATCHED, (process.pid, process.worker_address))
    if not first:
        return
    on_exit = process.on_exit

    def publish_then_go_on(code: int) -> None:
        pid, address = getattr(process, _WATCHED)
        try:
            nanny._ongoing_background_tasks.call_soon(_publish, nanny, address, pid, code)
        except Exception:  # the nanny is closing: nobody is left to tell
            pass
        on_exit(code)

    process.on_exit = publish_then_go_on


async def _publish(nanny: Any, address: str | None, pid: int, code: int) -> None:
    try:
        await nanny.scheduler.log_event(
            topic=EXITS_TOPIC, msg={"address": address, "pid": pid, "code": code}
        )
    except Exception:  # the scheduler is away: the crash is reported without its code
        pass
