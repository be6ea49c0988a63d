"""``askpass [PROMPT]``: sudo's password helper (``sudo -A``), the agent in a mode of its own.

sudo runs it, as the user, with the prompt as its argument. It asks the
agent that started sudo over a unix socket in the agent's private directory
(named in the environment) and prints the answer on stdout, which is a pipe
to sudo. No answer (the prompt was cancelled, or the agent refused): exit
status 1, and sudo gives up without asking again.

The agent answers only a process that descends from the sudo it started,
and only once per token: the token comes from the script sudo runs, which
the agent rewrites with a new one after each request. The helper makes
itself undumpable at once, so other processes of the user cannot read the
token from its environment or the password from its memory.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, List

import msgspec

from ..runtime.secret import protected

if TYPE_CHECKING:
    import socket

SOCKET_ENV = "REMOWT_ASKPASS_SOCKET"
TOKEN_ENV = "REMOWT_ASKPASS_TOKEN"
MAX_MESSAGE = 64 * 1024
#: The first byte of the agent's reply: the password follows, or why there is none (UTF-8).
PASSWORD, REFUSED = b"\x01", b"\x00"


class AskpassRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the helper sends: the token it was started with and the tool's prompt."""

    token: str
    prompt: str


def read_message(sock: socket.socket) -> bytes:
    """Everything the peer sends until it shuts down its side (at most :data:`MAX_MESSAGE` bytes)."""
    chunks: List[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(MAX_MESSAGE)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise ValueError(f"askpass message longer than {MAX_MESSAGE} bytes")
        chunks.append(chunk)


def main(prompt: str) -> int:
    """Ask the agent for the answer to ``prompt``; print it for sudo. Returns the exit status."""
    with protected():
        return _ask(prompt)


def _ask(prompt: str) -> int:
    import socket

    path = os.environ.get(SOCKET_ENV)
    token = os.environ.get(TOKEN_ENV)
    if not path or not token:
        print(f"remowt askpass: {SOCKET_ENV} or {TOKEN_ENV} is not set: only a remowt agent runs this", file=sys.stderr)
        return 1
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(msgspec.json.encode(AskpassRequest(token, prompt)))
            sock.shutdown(socket.SHUT_WR)
            reply = read_message(sock)
    except (OSError, ValueError) as e:
        print(f"remowt askpass: cannot ask the agent at {path}: {e}", file=sys.stderr)
        return 1
    if reply[:1] != PASSWORD:
        why = reply[1:].decode("utf-8", "replace") if reply[:1] == REFUSED else "the agent's answer is malformed"
        print(f"remowt askpass: {why or 'no password was given'}", file=sys.stderr)
        return 1
    os.writev(sys.stdout.fileno(), [memoryview(reply)[1:], b"\n"])
    return 0
