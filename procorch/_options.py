"""The guards of one call, checked by ``_call`` and read by the lifecycle and backends."""

from __future__ import annotations

from collections.abc import Mapping

from ._guards import CancelToken, RetryPolicy
from ._sandbox import Sandbox

__all__ = ["CallOptions"]


class CallOptions:
    """The guards of one call, checked and resolved per step."""

    __slots__ = (
        "call_timeout",
        "cancel",
        "capture",
        "idle_timeout",
        "max_tasks_per_child",
        "memory_limit",
        "retry",
        "sandbox",
        "step_timeout",
        "step_timeouts",
        "timeout_grace",
    )

    def __init__(
        self,
        *,
        step_timeout: float | None = None,
        step_timeouts: Mapping[str, float] | None = None,
        call_timeout: float | None = None,
        memory_limit: int | None = None,
        retry: RetryPolicy | None = None,
        capture: bool = False,
        cancel: CancelToken | None = None,
        sandbox: Sandbox | None = None,
        timeout_grace: float | None = None,
        max_tasks_per_child: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.step_timeout = step_timeout
        self.step_timeouts = step_timeouts or {}
        self.call_timeout = call_timeout
        self.memory_limit = memory_limit
        self.retry = retry
        self.capture = capture
        self.cancel = cancel
        self.sandbox = sandbox
        self.timeout_grace = timeout_grace
        self.max_tasks_per_child = max_tasks_per_child  # steps a worker process runs, at most
        self.idle_timeout = idle_timeout  # seconds a warm worker waits idle (None: the default)
