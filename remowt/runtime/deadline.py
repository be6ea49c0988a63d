"""One deadline for a blocking call and everything it waits on.

``Deadline(timeout)`` starts counting at once; ``timeout`` None is no limit.
Each wait inside the call takes ``remaining()`` (which raises ``TimeoutError``
once the time is up) or ``left()`` (0.0 then), so the whole call, not each of
its waits, is bounded by the caller's timeout. Time spent asking the user
(a password prompt) can be left out with :meth:`Deadline.paused`.
:func:`lock_timeout` and :func:`poll_timeout` put such a timeout (None: no
limit) the way a lock or ``poll`` takes it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Iterator, Optional, overload

CALL_TIMEOUT = 30.0
"""How long a call that should answer at once (ping, spawn, signal) waits by default."""
KILL_GRACE = 1.0
"""After a timeout: how long killing the child and seeing it exit may take before the caller gets the timeout."""


def lock_timeout(seconds: Optional[float]) -> float:
    """``seconds`` as ``Lock.acquire`` takes them: -1 for no limit, never below 0."""
    return -1 if seconds is None else max(seconds, 0.0)


def poll_timeout(seconds: Optional[float]) -> Optional[int]:
    """``seconds`` as ``poll`` takes them: milliseconds rounded up (no wait ends early), None for no limit."""
    return None if seconds is None else max(0, math.ceil(seconds * 1000))


class Deadline:
    """The end of a time limit of ``timeout`` seconds from now (None: no limit; <= 0: already over)."""

    __slots__ = ("_end", "_lock", "_paused", "_paused_at", "timeout", "what")

    def __init__(self, timeout: Optional[float], what: str = "the call") -> None:
        self.timeout = timeout
        self.what = what
        self._end = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.Lock()
        self._paused = 0
        self._paused_at = 0.0

    def __repr__(self) -> str:
        return f"<Deadline {self.what}: {self.left()} s left>"

    def left(self) -> Optional[float]:
        """Seconds left (0.0 once expired), None without a limit; while paused, what was left when it paused."""
        end = self._end
        if end is None:
            return None
        now = self._paused_at if self._paused else time.monotonic()
        return max(0.0, end - now)

    def remaining(self) -> Optional[float]:
        """Seconds left, None without a limit; ``TimeoutError`` once none are."""
        left = self.left()
        if left is not None and left <= 0.0:
            raise self.error()
        return left

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0.0

    def error(self) -> TimeoutError:
        """The error for this deadline's expiry (raise it)."""
        return TimeoutError(f"{self.what} did not finish within {self.timeout:g} s")

    @overload
    def shorter(self, seconds: float) -> float: ...

    @overload
    def shorter(self, seconds: Optional[float]) -> Optional[float]: ...

    def shorter(self, seconds: Optional[float]) -> Optional[float]:
        """``seconds`` capped at what is left (None: no limit of its own); ``TimeoutError`` when none is."""
        left = self.remaining()
        if seconds is None:
            return left
        return seconds if left is None else min(seconds, left)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock while in the block (any thread may pause it; pauses may overlap)."""
        with self._lock:
            if not self._paused:
                self._paused_at = time.monotonic()
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                if not self._paused and self._end is not None:
                    self._end += time.monotonic() - self._paused_at
