"""Errors raised to the caller before any work starts."""

from __future__ import annotations

__all__ = ["ExecutorError", "InvalidSpecError"]


class InvalidSpecError(ValueError):
    """A spec in the input breaks a rule; ``index`` is its position in the input."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"specs[{index}]: {reason}")
        self.index = index
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidSpecError], tuple[int, str]]:
        return type(self), (self.index, self.reason)


class ExecutorError(TypeError):
    """The executor object cannot be used: it lacks the seam, or cannot be pickled."""
