"""What a router does with a routed message that arrived: plain decisions, no threads and no I/O.

:func:`decide` looks at the message, the link it came over and the route
table, and says: drop it (it came over a link that does not lead to its
sender), take it here (a call, a notification, an answer, a stream's opening
or another stream message), pass it on (the link to send it on), or bounce it
(no route, or too big for the next link) with the answer its sender is owed.
The router applies the decision: it holds the locks, sends and runs handlers.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional, Protocol, TypeVar, Union

from . import wire
from .routing import RouteTable
from .streamstate import StreamKey

MAX_FAIL_TEXT = 16 * 1024  # a failure's message and file name are cut to this many characters
#: The messages of a stream once it is open.
StreamEvent = Union[wire.Data, wire.Credit, wire.Eof, wire.Reset]


class Hop(Hashable, Protocol):
    """A link, as far as routing decisions go: its peer takes frames of at most ``peer_max_frame`` bytes."""

    peer_max_frame: int


H = TypeVar("H", bound=Hop)


class Act:
    """A decision that needs nothing but its kind: one of the constants below."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Act {self.name}>"


# Plain constants rather than an enum: they are compared for every message, and an enum member's lookup is slow.
DROP = Act("drop")  # it came over a link that does not lead to its sender
CALL = Act("call")  # a call for a service here
NOTIFY = Act("notify")  # a one-way call for a service here
ANSWER = Act("answer")  # the reply or failure of a call made here
OPEN = Act("open")  # a stream opened towards here
STREAM = Act("stream")  # data, credit, end or reset on a stream here


class Bounce:
    """The message cannot be passed on: send ``answer`` (towards ``answer.dst``), if its sender is owed one."""

    __slots__ = ("answer",)

    def __init__(self, answer: Optional[wire.Routed]) -> None:
        self.answer = answer


#: An :class:`Act`, a :class:`Bounce`, or the hop to pass the message on over (not wrapped: forwarding is hot).
Decision = Union[Act, Bounce, H]

_HERE: Dict[type, Act] = {
    wire.Call: CALL,
    wire.Notify: NOTIFY,
    wire.Reply: ANSWER,
    wire.Fail: ANSWER,
    wire.Open: OPEN,
    wire.Data: STREAM,
    wire.Credit: STREAM,
    wire.Eof: STREAM,
    wire.Reset: STREAM,
}


def decide(routes: RouteTable[H], arrived: H, message: wire.Routed, body: wire.Item) -> Decision[H]:
    """What to do with ``message``, which came over ``arrived`` as ``body``.

    ``body`` is the frame's body, which must fit the next link, or, for a piece
    of a payload the link read apart from its frame, the ``Data`` message itself
    (it goes on as a frame of its own). It is measured only when passed on.
    """
    if routes.next_hop(message.src) is not arrived:
        return DROP
    own = routes.own
    dst = message.dst
    if dst == own:
        return _HERE[type(message)]
    hop = routes.next_hop(dst)
    if hop is None or hop is arrived:
        return Bounce(bounce(own, message, f"{own} has no route to {dst!r}"))
    if not isinstance(body, wire.Data) and len(body) > hop.peer_max_frame:
        why = f"{own} cannot pass on {len(body)} bytes: {dst} takes at most {hop.peer_max_frame}"
        return Bounce(bounce(own, message, why))
    return hop


def bounce(own: str, message: wire.Routed, why: str) -> Optional[wire.Routed]:
    """What ``own`` answers the sender of ``message``, which it could not pass on; None when nothing is owed.

    A call fails as unreachable, and so does the call an answer was for; a
    stream's opening, data or end resets the stream; the rest is dropped.
    """
    if isinstance(message, wire.Call):
        return wire.Fail(message.id, own, message.src, "unreachable", clip(why))
    if isinstance(message, wire.Reply) or (isinstance(message, wire.Fail) and message.kind != "unreachable"):
        return wire.Fail(message.id, own, message.dst, "unreachable", clip(why))
    if isinstance(message, wire.Open):
        return wire.Reset(own, message.src, message.sid, False, "unreachable")
    if isinstance(message, (wire.Data, wire.Eof)):
        return wire.Reset(own, message.src, message.sid, not message.from_opener, "unreachable")
    return None


def stream_key(own: str, message: StreamEvent) -> StreamKey:
    """The stream ``message`` is for, at ``own``: ``from_opener`` tells whose ``sid`` it is."""
    return (message.src if message.from_opener else own, message.sid)


def no_such_stream(own: str, message: StreamEvent) -> Optional[wire.Reset]:
    """What ``own`` answers a stream message for a stream it does not have with the sender.

    Data and an end reset the stream, so its writer stops; credit and resets need no answer.
    """
    if isinstance(message, (wire.Data, wire.Eof)):
        return wire.Reset(own, message.src, message.sid, not message.from_opener, "no such stream")
    return None


def answers(message: Union[wire.Reply, wire.Fail], callee: str) -> bool:
    """Whether ``message`` settles a call made to ``callee``: only the callee answers one, but any router
    on the way may say the callee is unreachable."""
    return message.src == callee or (isinstance(message, wire.Fail) and message.kind == "unreachable")


def clip(text: str) -> str:
    """``text``, cut to :data:`MAX_FAIL_TEXT` characters (a failure must fit in any peer's frame)."""
    return text if len(text) <= MAX_FAIL_TEXT else text[:MAX_FAIL_TEXT] + "..."
