"""The wake pipe: how any thread interrupts a dispatcher's wait."""

from __future__ import annotations

import os
import threading

__all__ = ["WakePipe"]


class WakePipe:
    """Wakes a dispatcher's wait() from any thread; safe to poke after it is closed."""

    def __init__(self) -> None:
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._writer, False)
        self._lock = threading.Lock()  # no wake-up may hit a closed (reused) fd
        self.closed = False

    def fileno(self) -> int:
        return self._reader

    def poke(self, *_: object) -> None:
        with self._lock:
            if not self.closed:
                try:
                    os.write(self._writer, b"\0")
                except BlockingIOError:  # full: a wake-up is pending anyway
                    pass

    def drain(self) -> None:
        os.read(self._reader, 4096)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            os.close(self._reader)
            os.close(self._writer)
