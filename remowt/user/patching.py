"""``remowt.patch()``: make unmodified code that calls subprocess run through a connection."""

from __future__ import annotations

import functools
import subprocess
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar

if TYPE_CHECKING:
    from .connection import Remowt

F = TypeVar("F", bound=Callable[..., Any])
PATCHED = ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")
_lock = threading.Lock()


class patch:
    """Swap ``subprocess.Popen`` and its helpers for a connection's, for a ``with`` block or a function.

    The swap is process-wide (every thread sees it) and nests. remowt's own
    local processes (its agents) use the real ``Popen`` taken at import, so
    they are never routed through the patch. Code that did
    ``from subprocess import run`` before the patch keeps the original.
    """

    def __init__(self, connection: Optional[Remowt] = None) -> None:
        self.connection = connection
        self._saved: List[Dict[str, Any]] = []

    def __enter__(self) -> Remowt:
        connection = self.connection
        if connection is None:
            from .default import default_connection

            connection = default_connection()
        with _lock:
            self._saved.append({name: getattr(subprocess, name) for name in PATCHED})
            for name in PATCHED:
                setattr(subprocess, name, getattr(connection, name))
        return connection

    def __exit__(self, *exc: object) -> None:
        with _lock:
            for name, value in self._saved.pop().items():
                setattr(subprocess, name, value)

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def patched(*args: Any, **kwargs: Any) -> Any:
            with patch(self.connection):
                return fn(*args, **kwargs)

        return patched  # type: ignore[return-value]
