"""Privilege escalation, client side: ``conn.privileged``, ``Popen(..., sudo=True)``, ``cmd(...).sudo()``.

On first use the connection's agent starts a privileged copy of itself
through run0, sudo or doas (:mod:`remowt.endpoints.escalate`); it becomes the
address ``agent-privileged``, reached through the same connection. Password
prompts come back to the connection's prompter (:mod:`remowt.endpoints.prompt`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

from ..endpoints.escalate import START_TIMEOUT as AGENT_START_TIMEOUT
from ..endpoints.escalate import EscalateApi, PrivilegedEventsApi
from ..endpoints.prompt import Prompter, PromptService, remote_text, terminal_prompter
from ..errors import ConnectionLost, EscalationError
from ..protocol import wire
from ..protocol.service import proxy
from ..rpc.router import Router
from ..runtime.deadline import Deadline, lock_timeout
from .connection import Remowt
from .node import Node

START_TIMEOUT = AGENT_START_TIMEOUT + 15.0
"""How long :meth:`Privileged.start` waits by default (the user's time at a password prompt not counted)."""
_ELEVATE = EscalateApi.methods["elevate"]


class Privileged(Node):
    """``conn.privileged``: the privileged agent's node, reached through the same connection.

    It has every node's face (``Popen``, ``run``, ``check_output``, ``cmd``,
    ``spawn``, ``ping``, ``info`` …). The privileged agent is started on first
    use, asking the connection's prompter if the tool wants a password, and
    then reused. Closing the node ends the privileged agent and its children,
    not the connection; the next use starts it again.
    """

    def __init__(self, connection: Remowt) -> None:
        super().__init__(
            connection.router,
            wire.AGENT_PRIVILEGED,
            description=f"{connection.description}, privileged",
            children=connection.children,
            fd_writers=connection.fd_writers,
            call_timeout=connection.call_timeout,
        )
        self.connection = connection
        self.tool: Optional[str] = None
        self._escalate = proxy(EscalateApi, connection.router, connection.address, connection.call_timeout)
        self._start_lock = threading.Lock()
        self._starts = 0
        self._failure: Optional[BaseException] = None
        self._starting: Optional[Deadline] = None  # the deadline of the start in progress

    @property
    def privileged(self) -> Privileged:
        return self

    def running(self) -> bool:
        """Whether the privileged agent is up now (no round trip)."""
        return wire.AGENT_PRIVILEGED in self.router.reachable()

    def start(self, timeout: Optional[float] = None) -> str:
        """Start the privileged agent unless it runs; returns the tool used ("" if the agent is root).

        Raises :class:`~remowt.errors.EscalationError` when no tool is found,
        authentication fails or the prompt is cancelled. Callers that waited
        while another thread's start failed get that failure, not a new prompt.
        ``TimeoutError`` when it is not done within ``timeout`` seconds (None:
        :data:`START_TIMEOUT`), not counting the time the prompter takes.
        """
        return self._start(Deadline(START_TIMEOUT if timeout is None else timeout, "starting the privileged agent"))

    def _start(self, deadline: Deadline) -> str:
        """:meth:`start` by ``deadline``, which is paused while the user is asked for a password."""
        starts = self._starts
        if not self._start_lock.acquire(True, lock_timeout(deadline.left())):
            raise deadline.error()
        try:
            if self.connection.closed:
                raise ConnectionLost(f"{self.connection!r} is closed")
            if self.running() and self.tool is not None:
                return self.tool
            if self._starts != starts and self._failure is not None:
                raise self._failure
            try:
                self.tool = self._elevate(deadline)
                self._failure = None
            except BaseException as e:
                self._failure = e
                raise
            finally:
                self._starts += 1
            return self.tool
        finally:
            self._start_lock.release()

    def _elevate(self, deadline: Deadline) -> str:
        """Ask the agent to start the privileged agent; wait by ``deadline`` (paused while the user is asked)."""
        args = _ELEVATE.encode_args((self.connection.escalation,), {})
        self._starting = deadline  # before the call: its prompt may come at once
        try:
            pending = self.router.call(self.connection.address, EscalateApi.namespace, _ELEVATE.number, args)
            while not pending.wait(deadline.left()):
                if deadline.expired() and pending.abandon():
                    raise deadline.error()
        finally:
            self._starting = None
        tool: str = _ELEVATE.decode_result(pending.result())
        return tool

    @contextlib.contextmanager
    def prompting(self) -> Iterator[None]:
        """Around a password prompt of the start in progress, which does not count the user's time.

        ``EscalationError`` when no start is in progress: only a start this
        side asked for may ask the user for a password.
        """
        deadline = self._starting
        if deadline is None:
            raise EscalationError(
                f"{self.connection.description} asked for a password while no privileged agent was being "
                "started from this side: refused, the prompter was not asked"
            )
        with deadline.paused():
            yield

    def _ready(self, timeout: Optional[float]) -> Optional[float]:
        """Start the agent within ``timeout`` (None: the defaults); what is left of it for the call after.

        As for :meth:`start`, the user's time at a password prompt is not counted.
        """
        if timeout is None:
            self.start()
            return None
        deadline = Deadline(timeout, "a call to the privileged agent")
        self._start(deadline)
        return deadline.remaining()

    def close(self) -> None:
        """End the privileged agent and its children; the connection stays open."""
        with self._start_lock:
            if not self.connection.closed and self.running():
                self._escalate.drop()


class _PrivilegedEvents(PrivilegedEventsApi):
    def __init__(self, connection: Remowt) -> None:
        self._connection = connection

    def lost(self, reason: str) -> None:
        error = ConnectionLost(f"privileged agent of {self._connection.description} lost: {reason}")
        self._connection.children.lose(wire.AGENT_PRIVILEGED, error)


class _ConnectionPrompts(PromptService):
    """Prompts answered by the connection's prompter as it is when asked (it may be set later)."""

    def __init__(self, connection: Remowt) -> None:
        super().__init__()
        self._connection = connection

    def prompter(self) -> Prompter:
        return self._connection.prompter or terminal_prompter

    def ask(self, prompt: str, tool: str) -> bytearray:
        """Ask the prompter for the start this side asked for, else refuse; the host shown, the target's words marked.

        What the target says (the tool and its prompt) follows our own words,
        escaped where it would not print, so it cannot pass for ours.
        """
        connection = self._connection
        caller = connection.router.caller()
        privileged = connection.privileged_if_made()
        if caller != connection.address or privileged is None:
            raise EscalationError(f"{caller} asked for a password unbidden: refused, the prompter was not asked")
        with privileged.prompting():
            asked = f"{connection.description} asks for {remote_text(tool or 'a password')}: {remote_text(prompt)}"
            return super().ask(asked, tool)


def serve_user_side(router: Router, connection: Remowt) -> None:
    """Register what the agent calls back during escalation: the prompt and the lost-agent event."""
    router.register(_ConnectionPrompts(connection))
    router.register(_PrivilegedEvents(connection))
