"""What the nodes over one link may hold at a router: streams they opened, bytes on those nobody accepted yet.

Plain counting, no threads and no I/O: the router keeps one :class:`PeerBudget`
per link and asks it before it takes a stream or its bytes.
"""

from __future__ import annotations

from typing import Optional

from ..errors import ProtocolError
from . import wire
from .streamstate import DEFAULT_WINDOW, MAX_WINDOW

MAX_STREAMS = 4096  # streams the nodes over one link may have opened here at a time
MAX_UNACCEPTED = DEFAULT_WINDOW  # bytes they may send on those of their streams nobody here accepted (yet)


class PeerBudget:
    """What the nodes over one link hold here: streams they opened, bytes on those nobody accepted yet.

    ``peer`` is the neighbour on the link: its own excess is a protocol error on the link; the excess of a
    node behind it costs only that stream (one bad plugin must not cut the user off from its agent).
    """

    __slots__ = ("peer", "streams", "unaccepted")

    def __init__(self, peer: Optional[str]) -> None:
        self.peer = peer
        self.streams = 0
        self.unaccepted = 0

    def admit(self, window: int) -> Optional[str]:
        """Count a stream opened with ``window``; or, counting nothing, say why it is refused."""
        if window > MAX_WINDOW:
            return f"opened a stream with a window of {window} bytes (at most {MAX_WINDOW})"
        if self.streams >= MAX_STREAMS:
            return f"opened more than {MAX_STREAMS} streams at once (with the nodes behind {self.peer})"
        self.streams += 1
        return None

    def hold(self, size: int) -> bool:
        """Count ``size`` bytes that arrived on a stream nobody accepted yet; False (nothing counted) past the bound."""
        if self.unaccepted + size > MAX_UNACCEPTED:
            return False
        self.unaccepted += size
        return True

    def release(self, size: int) -> None:
        """``size`` held bytes are off the bound: their stream was accepted after all, or is gone."""
        self.unaccepted -= size

    def stream_gone(self) -> None:
        """A stream it opened is gone."""
        self.streams -= 1

    def refusal(self, own: str, src: str, sid: int, why: str) -> wire.Reset:
        """The Reset that refuses stream ``sid`` of ``src``, a node behind the neighbour.

        A :class:`ProtocolError` instead when ``src`` is the neighbour itself: its link is to end.
        """
        if src == self.peer:
            raise ProtocolError(f"{src} {why}")
        return wire.Reset(own, src, sid, False, why)
