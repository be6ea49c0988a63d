"""The connection: ``remowt.loopback()``, ``remowt.connect_local()`` and what they return."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..endpoints.control import ControlApi
from ..endpoints.prompt import Prompter
from ..errors import ConnectionLost
from ..protocol import wire
from ..rpc.link import Link
from ..rpc.router import Router
from ..runtime.deadline import CALL_TIMEOUT
from ..transports.fdpass import FdSender
from .children import Children
from .node import Node
from .pipes import FdWriters

if TYPE_CHECKING:
    from .privileged import Privileged

_KEEPALIVE = ControlApi.methods["keepalive"]


class Remowt(Node):
    """A connection to an agent, and the agent's :class:`~remowt.user.node.Node`. Use as a context manager.

    It has the face of the :mod:`subprocess` module, bound to itself:
    ``conn.Popen``, ``conn.run``, ``conn.check_output`` …, ``conn.PIPE`` and
    the exception classes, so ``subprocess = conn`` works in a script.
    ``conn.privileged`` is the privileged agent's node, with the same face.
    """

    def __init__(
        self,
        router: Router,
        link: Link,
        *,
        description: str,
        on_close: Sequence[Callable[[], None]] = (),
        prompter: Optional[Prompter] = None,
        escalation: Optional[str] = None,
        call_timeout: Optional[float] = CALL_TIMEOUT,
    ) -> None:
        super().__init__(
            router,
            wire.AGENT,
            description=description,
            children=Children(),
            fd_writers=FdWriters(),
            call_timeout=call_timeout,
        )
        self.link = link
        self.prompter = prompter
        self.escalation = escalation
        self._privileged: Optional[Privileged] = None
        self._privileged_lock = threading.Lock()
        self._on_close = list(on_close)
        router.on_link_closed(self._link_closed)

    def __enter__(self) -> Remowt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def privileged(self) -> Privileged:
        """The privileged agent's node (the agent started again as root; started on first use).

        The agent starts itself again through ``self.escalation`` (run0, sudo
        or doas; None: the first one found on the target); password prompts
        go to ``self.prompter`` (None: the terminal). Both may be changed
        before first use. See :class:`remowt.user.privileged.Privileged`.
        """
        from .privileged import Privileged

        with self._privileged_lock:
            if self._privileged is None:
                self._privileged = Privileged(self)
            return self._privileged

    def privileged_if_made(self) -> Optional[Privileged]:
        """The privileged node if :attr:`privileged` was asked for already (no side effects)."""
        return self._privileged

    def attach_fd_sender(self, sender: FdSender) -> None:
        """Hand children this process's fds through ``sender`` (an agent started here); closed with the connection."""
        self.fd_sender = sender
        self._on_close.append(sender.close)

    def _link_closed(self, link: Link, reason: Optional[BaseException]) -> None:
        if link is self.link:
            why = f"connection to {self.description} lost" + (f": {reason}" if reason else "")
            self.children.lose(None, ConnectionLost(why))

    def close(self) -> None:
        """End the connection: its agents, their children, and every thread it started."""
        if self.children.closed:
            return
        self.children.close()
        self.router.close()
        for hook in self._on_close:
            hook()
        self.fd_writers.close()
