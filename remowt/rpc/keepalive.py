"""Keepalives from the client to its agent, so that an agent cut off from its client ends itself.

A blackholed network leaves the agent's link open and silent forever: no
end of input ever comes. So the client sends the agent a keepalive notice
(:meth:`ControlApi.keepalive`) whenever an interval passed in which it sent
nothing else (:class:`Sender`, one thread per connection; a busy link carries
none), and the agent closes its upstream link, which ends it and its
children, once it heard nothing at all for ``count`` intervals in a row
(:class:`SilenceWatch`). The first notice, sent as soon as the link is up,
tells the agent the interval and the count; until one comes the agent waits
for its link's end only.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Optional

from ..errors import ConnectionLost, Unreachable
from ..runtime.interrupts import start
from .link import Link

log = logging.getLogger("remowt.keepalive")
DEFAULT_INTERVAL = 15.0
DEFAULT_COUNT = 3
#: The client sends at least every second interval (one with traffic, one without): fewer would end busy agents.
MIN_COUNT = 2


def check(interval: float, count: int) -> None:
    """Raise ValueError unless ``interval`` (seconds, 0 for none) and ``count`` make a keepalive setting."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
        raise ValueError(f"agent_keepalive must be a number of seconds, at least 0 (0: none), got {interval!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < MIN_COUNT:
        raise ValueError(
            f"agent_keepalive_count must be an integer of at least {MIN_COUNT} "
            f"(a keepalive may come up to two intervals after the last frame), got {count!r}"
        )


class Sender:
    """Calls ``send`` (which sends a keepalive on ``link``) now, and after every ``interval`` in which nothing else was.

    ``send`` raising ``ConnectionLost`` or ``Unreachable`` ends it.
    """

    def __init__(self, link: Link, interval: float, send: Callable[[], None]) -> None:
        self._link = link
        self._interval = interval
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remowt-keepalive", daemon=True)

    def start(self) -> None:
        self._send()
        start(self._thread)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        link = self._link
        while not self._stop.wait(self._interval):
            if not link.sent:
                try:
                    self._send()
                except (ConnectionLost, Unreachable):
                    return
            link.sent = False


class SilenceWatch:
    """Closes a link that heard nothing for ``count`` intervals in a row.

    It runs once it has both the link (:meth:`watch`) and a setting
    (:meth:`arm`, from the peer's keepalive), whichever comes first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._link: Optional[Link] = None
        self._interval = 0.0
        self._count = 0
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    def watch(self, link: Link) -> None:
        """Watch ``link``."""
        with self._cond:
            self._link = link
            self._start_locked()

    def arm(self, interval: float, count: int) -> None:
        """Close the link after ``count`` silent intervals of ``interval`` seconds (on the reader thread: quick)."""
        with self._cond:
            if (interval, count) == (self._interval, self._count):
                return
            self._interval, self._count = interval, count
            self._cond.notify()
            self._start_locked()

    def stop(self) -> None:
        """Stop watching, and join the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _start_locked(self) -> None:
        if self._thread is None and self._link is not None and self._interval > 0 and not self._stopped:
            self._thread = threading.Thread(target=self._run, args=(self._link,), name="remowt-silence", daemon=True)
            start(self._thread)

    def _run(self, link: Link) -> None:
        silent = 0
        with self._cond:
            while not self._stopped and silent < self._count:
                if self._cond.wait(self._interval):  # stopped, or armed anew: start the interval again
                    continue
                if link.heard:
                    link.heard = False
                    silent = 0
                else:
                    silent += 1
            if self._stopped:
                return
            quiet = silent * self._interval
        log.warning("heard nothing from %s for %g s: closing the link, which ends this agent", link.peer, quiet)
        link.close()
