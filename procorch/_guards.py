"""Guards a caller can put on a call: retries and a cancel token.

Time limits and the memory cap are plain numbers given to
``execute_steps_parallel``; this module holds the two guards that are objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import msgspec

__all__ = ["CancelToken", "RetryPolicy"]

RetryableKind = Literal["exception", "crash", "timeout", "memory"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Run a step again when it fails in one of the ``on`` ways.

    ``attempts`` is the most times a step is started, the first included
    (``attempts=3`` allows two retries). Before attempt *n* + 1 the step waits
    ``backoff * 2 ** (n - 1)`` seconds, without holding a worker. Only
    failures procorch observed are retried: an outcome the executor itself
    returned with ``success=False`` is its answer, not an accident.
    """

    attempts: int = 3
    on: frozenset[RetryableKind] = frozenset({"exception", "crash", "timeout", "memory"})
    backoff: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int (got {self.attempts!r})")
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1 (got {self.attempts})")
        if not isinstance(self.backoff, (int, float)) or self.backoff < 0:
            raise ValueError(f"backoff must be a number >= 0 (got {self.backoff!r})")
        unknown = set(self.on) - {"exception", "crash", "timeout", "memory"}
        if unknown:
            raise ValueError(
                f"on must name failure kinds among exception, crash, timeout, memory "
                f"(got {sorted(unknown)})"
            )

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before starting ``attempt`` (2 or more)."""
        return float(self.backoff * 2 ** (attempt - 2))


class CancelToken:
    """Trip it from any thread to cancel the calls it was given to.

    Running steps are stopped (their workers killed), queued steps are not
    started, and each unfinished step yields a failed outcome of kind
    ``cancelled``; the call then returns. A token stays tripped.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def cancel(self) -> None:
        """Cancel every call using this token, now and later."""
        with self._lock:
            self._event.set()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def _listen(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
        if self._event.is_set():
            listener()

    def _forget(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
