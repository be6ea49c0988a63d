"""The remote children of one connection, on all its nodes: registered at spawn, settled by exit or loss."""

from __future__ import annotations

import itertools
import threading
from typing import Dict, List, Optional, Tuple

from ..errors import ConnectionLost
from .process import RemoteProcess


class Children:
    """Every child the nodes of one connection started and that has not exited yet.

    Handles are unique over the connection. An exit reported by a node frees
    its entry and queues a release (the node may then forget the child, told
    with the next spawn); a lost node or link settles its children as lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._running: Dict[int, Tuple[str, RemoteProcess]] = {}
        self._releases: List[Tuple[str, int]] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._closed

    def next_handle(self) -> int:
        return next(self._handles)

    def add(self, address: str, process: RemoteProcess, description: str) -> None:
        """Register ``process``, started at ``address``; ``ConnectionLost`` once the connection is closed."""
        with self._lock:
            if self._closed:
                raise ConnectionLost(f"{description} is closed")
            self._running[process.handle] = (address, process)

    def discard(self, handle: int) -> None:
        """Forget a child whose spawn failed."""
        with self._lock:
            self._running.pop(handle, None)

    def get(self, handle: int) -> Optional[RemoteProcess]:
        with self._lock:
            entry = self._running.get(handle)
        return None if entry is None else entry[1]

    def count(self) -> int:
        """How many children run (tests: nothing leaks)."""
        with self._lock:
            return len(self._running)

    def exited(self, address: str, handle: int, returncode: int) -> None:
        """``address`` reports the exit of child ``handle`` (also one whose spawn timed out: it is released)."""
        with self._lock:
            entry = self._running.pop(handle, None)
            if not self._closed:  # else the nodes forget their children by themselves as the connection goes
                self._releases.append((address, handle))
        if entry is not None:
            entry[1].set_exited(returncode)

    def take_releases(self) -> List[Tuple[str, int]]:
        """The (address, handle) of exited children their nodes may forget now."""
        with self._lock:
            releases, self._releases = self._releases, []
        return releases

    def lose(self, address: Optional[str], error: ConnectionLost) -> None:
        """The children at ``address`` (None: everywhere) will never be heard of again."""
        with self._lock:
            gone = [entry for entry in self._running.items() if address is None or entry[1][0] == address]
            for handle, _ in gone:
                del self._running[handle]
        for _, (_, process) in gone:
            process.set_lost(error)

    def close(self) -> None:
        """The connection ends: no more children, no more releases."""
        with self._lock:
            self._closed = True
