"""Password prompts, answered on the user's side.

When the agent needs a password (sudo, doas or run0 starting the privileged
agent), it calls :class:`PromptApi` at the address that asked for the
escalation. The user side answers with the connection's prompter: any
callable ``prompter(prompt_text) -> password``; raising cancels. The default,
:func:`terminal_prompter`, asks on the controlling terminal.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

from ..errors import EscalationError
from ..protocol.service import Service, rpc

Prompter = Callable[[str], str]
MAX_REMOTE_TEXT = 200
"""How much of a prompt's text from the target is shown."""

_terminal = threading.Lock()


class PromptApi(Service, namespace=21):
    """Served by the user side: the agent asks for secrets here."""

    @rpc(1, secret=True)
    def ask(self, prompt: str, tool: str) -> bytearray:
        """Ask the user ``prompt`` (``tool``'s own text): the password in UTF-8, wiped by the caller after use.

        EscalationError if the user cancelled or it is refused.
        """
        raise NotImplementedError


class PromptService(PromptApi):
    """The user side's implementation: asks :meth:`prompter` (by default on the terminal)."""

    def __init__(self, prompter: Optional[Prompter] = None) -> None:
        self._prompter = prompter

    def prompter(self) -> Prompter:
        """The prompter to ask now."""
        return self._prompter or terminal_prompter

    def ask(self, prompt: str, tool: str) -> bytearray:
        try:
            answer = self.prompter()(prompt)
        except EscalationError:
            raise
        except (Exception, KeyboardInterrupt) as e:  # raising is how a prompter cancels
            raise EscalationError(f"password prompt cancelled: {type(e).__name__}: {e}") from None
        if not isinstance(answer, str):
            raise EscalationError(f"the prompter returned {type(answer).__name__}, expected the password as str")
        return bytearray(answer, "utf-8")


def remote_text(text: str, limit: int = MAX_REMOTE_TEXT) -> str:
    """``text`` from the target, safe to show after our own words: what does not print escaped, at most ``limit`` chars.

    A carriage return, an escape sequence or a bidi override would let the
    remote text hide or rewrite what we put before it on a terminal.
    """
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"


def check_prompter(prompter: Optional[Prompter]) -> Optional[Prompter]:
    """Return ``prompter`` if it is None or callable, else raise TypeError."""
    if prompter is not None and not callable(prompter):
        raise TypeError(f"prompter must be a callable taking the prompt and returning the password, got {prompter!r}")
    return prompter


def terminal_prompter(prompt: str) -> str:
    """Ask on this process's controlling terminal without echo; EscalationError when there is none."""
    import getpass

    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError as e:
        raise EscalationError(
            f"a password is needed ({prompt.strip()!r}) but there is no terminal to ask on ({e.strerror}); "
            "pass prompter= to the connection to answer password prompts"
        ) from None
    with _terminal:
        return getpass.getpass(prompt)


def has_terminal() -> bool:
    """Whether this process has a controlling terminal to ask on."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True
