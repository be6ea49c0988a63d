"""A real terminal for tests: a tmux pane on a tmux server of its own, typed into and read as a person does.

``send-keys`` types, ``capture-pane`` reads the screen; waiting is for text to
appear on the screen, never for a while.
"""

from __future__ import annotations

import subprocess
import uuid
from typing import Callable

from _util import wait_until

SCREEN_TIMEOUT = 15.0


class Pane:
    """One tmux window of one pane, started by :meth:`start`; :meth:`close` kills its server."""

    def __init__(self) -> None:
        self.socket = f"remowt-test-{uuid.uuid4().hex[:12]}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    def start(self, command: str, cols: int = 100, rows: int = 30) -> None:
        """Run ``command`` (a shell line) in a new window of ``cols`` x ``rows``, no status line."""
        self.tmux("new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows), command)
        self.tmux("set-option", "-t", "t", "status", "off")

    def keys(self, *keys: str) -> None:
        """Press keys by tmux's names: ``Enter``, ``C-c``, ``Escape``."""
        self.tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        """Type ``text`` as it is."""
        self.tmux("send-keys", "-t", "t", "-l", text)

    def line(self, text: str) -> None:
        """Type ``text`` and Enter."""
        self.type(text)
        self.keys("Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "t")

    def wait_for(self, text: str, timeout: float = SCREEN_TIMEOUT) -> str:
        """The screen once ``text`` is on it; AssertionError with the screen if it does not come."""
        return self.wait_until(lambda screen: text in screen, f"{text!r}", timeout)

    def wait_until(self, ready: Callable[[str], bool], what: str, timeout: float = SCREEN_TIMEOUT) -> str:
        screens = [""]

        def look() -> bool:
            screens[0] = self.screen()
            return ready(screens[0])

        if not wait_until(look, timeout, interval=0.05):
            raise AssertionError(f"no {what} on the screen within {timeout:g} s:\n{screens[0]}")
        return screens[0]

    def resize(self, cols: int, rows: int) -> None:
        self.tmux("resize-window", "-t", "t", "-x", str(cols), "-y", str(rows))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
