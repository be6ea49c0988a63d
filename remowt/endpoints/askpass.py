"""``askpass [PROMPT]``: sudo's password helper (``sudo -A``), the agent in a mode of its own.

sudo runs it, as the user, with the prompt as its argument. It asks the
agent that started sudo over a unix socket in the agent's private directory
(named in the environment, with a one-time token; the agent also checks
that the peer runs as its own uid) and prints the answer on stdout, which is
a pipe to sudo. No answer (the prompt was cancelled): exit status 1, and sudo
gives up without asking again.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, List, Optional

import msgspec

if TYPE_CHECKING:
    import socket

SOCKET_ENV = "REMOWT_ASKPASS_SOCKET"
TOKEN_ENV = "REMOWT_ASKPASS_TOKEN"
MAX_MESSAGE = 64 * 1024


class AskpassRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the helper sends: the agent's token and the tool's prompt."""

    token: str
    prompt: str


class AskpassReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The password, or why there is none."""

    password: Optional[str] = None
    error: Optional[str] = None


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
            data = read_message(sock)
    except (OSError, ValueError) as e:
        print(f"remowt askpass: cannot ask the agent at {path}: {e}", file=sys.stderr)
        return 1
    try:
        reply = msgspec.json.decode(data, type=AskpassReply)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        print(f"remowt askpass: the agent's answer is malformed: {e}", file=sys.stderr)
        return 1
    if reply.password is None:
        print(f"remowt askpass: {reply.error or 'no password was given'}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(reply.password.encode() + b"\n")
    sys.stdout.flush()
    return 0
