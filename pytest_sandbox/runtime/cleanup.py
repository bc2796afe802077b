"""CleanupStack: undo steps run last-in first-out; every step runs even when others fail."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


class CleanupStack:
    """LIFO list of clean-up callbacks.

    ``close()`` runs every callback once, newest first; a failing callback does not stop the
    others, and all failures are raised together as an ``ExceptionGroup`` (a single failure is
    raised as itself). Calling ``close()`` again does nothing.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def push(self, callback: Callable[..., Any], *args: Any, name: str = "") -> None:
        with self._lock:
            self._steps.append((name or getattr(callback, "__qualname__", "step"), callback, args))

    def pop_all(self) -> CleanupStack:
        """Move every step to a new stack (e.g. to hand ownership on after a successful start)."""
        moved = CleanupStack()
        with self._lock:
            moved._steps, self._steps = self._steps, []
        return moved

    def __len__(self) -> int:
        return len(self._steps)

    def close(self) -> None:
        errors: list[Exception] = []
        while True:
            with self._lock:
                if not self._steps:
                    break
                name, callback, args = self._steps.pop()
            try:
                callback(*args)
            except Exception as exc:
                exc.add_note(f"while running clean-up step {name!r}")
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} clean-up steps failed", errors)

    def __enter__(self) -> CleanupStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
