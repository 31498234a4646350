"""The seam between the step lifecycle and the backends that move work.

A backend (the local lanes, a Dask cluster) only moves steps to workers and
reports what it saw happen to them; what a fact means for a step (a retry, a
failed outcome, an event) is the lifecycle's business (``_lifecycle``).

The lifecycle drives a backend with the methods of :class:`StepBackend`, in
turns::

    open(steps, slots)          once, before the first turn
    warm_up(timeout)            optional (ProcessPool): start every worker now
    start_ready()               take queued steps (steps.take(n)) and send them
    wait_handles(), next_wakeup()
                                what the lifecycle's wait() should also watch
    poll()                      read everything that arrived; report it (when
                                ``steps.ready`` is set, only those handles
                                woke the wait: the others may be left unread)
    interrupt(index)            raise StepTimeout in a running step (a soft time limit)
    stop(index) / stop_all()    kill what runs a step (a guard acted)
    close()                     once, whatever happened

and the backend reports facts to the lifecycle, each naming the step and
the attempt it concerns: ``steps.started`` (with the start instant on this
process's clock), ``progress``, ``finished``, ``crashed``, ``failed`` (a
guard of the backend's own, such as the memory cap, or a protocol fault),
``interrupted`` for a running attempt cut short without a verdict (run
again, uncharged), and ``gave_back`` for steps it sent that never started
(they are queued again at no cost). A fact that does not match the
step's state is refused (the method returns False): the backend treats it as
a protocol fault of the worker that sent it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from ._lifecycle import StepLifecycle

__all__ = ["BackendFactory", "StepBackend", "StopFacts"]


class StopFacts(msgspec.Struct, frozen=True):
    """What a backend did to stop a running step, for the failure message."""

    pid: int | None = None
    printed: str | None = None
    stopped: str = "it was stopped"  # words: "its worker process (pid 12) was killed"


class StepBackend(Protocol):
    """Moves steps to workers and reports facts; see the module notes."""

    supported_guards: frozenset[str]
    """Guards (``Guards`` keys) this backend can enforce; others are refused up front."""

    def open(self, steps: StepLifecycle, slots: int) -> None: ...

    def warm_up(self, timeout: float) -> None:
        """Start the workers now and wait (up to ``timeout``) until none needs a new thread."""
        ...

    def start_ready(self) -> None: ...

    def wait_handles(self) -> Sequence[Any]: ...

    def next_wakeup(self) -> float | None: ...

    def poll(self) -> None: ...

    def stop(self, index: int) -> StopFacts: ...

    def interrupt(self, index: int) -> bool:
        """Raise ``StepTimeout`` in a running step (a soft limit); False if not possible."""
        ...

    def stop_all(self) -> dict[int, StopFacts]: ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """What ``backend=`` takes: an object that makes one :class:`StepBackend` per call."""

    name: str  # for messages: "the Dask backend"

    @property
    def supported_guards(self) -> frozenset[str]: ...

    def step_backend(self, blob: bytes, token: str, options: Any) -> StepBackend: ...
