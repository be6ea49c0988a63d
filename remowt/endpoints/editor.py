"""Editing a target's files in the caller's editor.

Children on a terminal get ``EDITOR`` and ``VISUAL`` naming the agent in a
mode of its own, ``editor FILE...`` (as sudo's askpass is): run by ``git
commit``, ``crontab -e`` and the like, it reads each file, hands it over a
unix socket to the agent that started the child (in a private directory, with
a token from the environment; the agent checks the peer's uid), which asks
the caller's :class:`EditorApi`; the caller opens it in *its* editor on its
terminal, and the result comes back and is saved in place of the file
(atomically, keeping mode and owner). The remote program waits meanwhile,
as it waits for any editor. An unchanged file is left as it was.

``remowt edit HOST:PATH`` does the same from the caller's side, through
:class:`FileEditApi` (served by the agent and the privileged agent).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import struct
import sys
import threading
from typing import Callable, List, Optional

import msgspec

from ..protocol.service import Service, rpc
from .fs import replace_file

log = logging.getLogger("remowt.editor")

SOCKET_ENV = "REMOWT_EDITOR_SOCKET"
TOKEN_ENV = "REMOWT_EDITOR_TOKEN"
MAX_FILE = 8 << 20  # what fits in one call, with room
_PEERCRED = struct.Struct("3i")
_LENGTH = struct.Struct(">I")


class EditorApi(Service, namespace=13):
    """Served by the user: open a file of the target in the caller's editor."""

    @rpc(1)
    def edit(self, name: str, content: bytes) -> Optional[bytes]:
        """The edited content of file ``name`` (``content`` as it is now); None if it was left unchanged."""
        raise NotImplementedError


class FileEditApi(Service, namespace=21):
    """Served by the agents: a whole file read, and written back in its place."""

    @rpc(1)
    def read(self, path: str) -> bytes:
        """The content of ``path`` (at most 8 MiB)."""
        raise NotImplementedError

    @rpc(2)
    def replace(self, path: str, content: bytes) -> None:
        """Write ``content`` to ``path`` atomically, keeping the mode and owner of the file it replaces."""
        raise NotImplementedError


class EditRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the editor helper sends the agent: the token, the file's name and its content."""

    token: str
    name: str
    content: bytes


class EditReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The edited content (None: unchanged), or why there is none."""

    content: Optional[bytes] = None
    error: Optional[str] = None


def read_file(path: str) -> bytes:
    """The content of ``path``, refused past :data:`MAX_FILE` bytes."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise OSError(f"{path} is over {MAX_FILE >> 20} MiB: too big to edit this way")
    return data


class FileEdits(FileEditApi):
    """The agents' implementation."""

    def read(self, path: str) -> bytes:
        return read_file(path)

    def replace(self, path: str, content: bytes) -> None:
        replace_file(path, content)


def _send_message(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_message(sock: socket.socket) -> bytes:
    """One length-prefixed message (at most :data:`MAX_FILE` and a little)."""
    head = _receive_exactly(sock, _LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FILE + 4096:
        raise ValueError(f"an editor message of {size} bytes")
    return _receive_exactly(sock, size)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: List[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the editor socket")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class EditorHost:
    """The agent's side: the socket editor helpers reach it on, and the variables that name it.

    Made on the first child on a terminal; ``ask(name, content)`` asks the caller (it may wait long).
    """

    def __init__(self, ask: Callable[[str, bytes], Optional[bytes]], helper: List[str]) -> None:
        import secrets
        import shlex
        import tempfile

        self._ask = ask
        self._token = secrets.token_hex(16)
        self._directory = tempfile.mkdtemp(prefix="remowt-editor-")
        self.path = os.path.join(self._directory, "socket")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        command = " ".join(shlex.quote(word) for word in helper)
        names = {"EDITOR": command, "VISUAL": command, SOCKET_ENV: self.path, TOKEN_ENV: self._token}
        self.environment = {os.fsencode(name): os.fsencode(value) for name, value in names.items()}
        from ..runtime.interrupts import start

        start(threading.Thread(target=self._accept, name="remowt-editor", daemon=True))

    def _accept(self) -> None:
        from ..runtime.interrupts import start

        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            start(threading.Thread(target=self._serve, args=(sock,), name="remowt-editor-request", daemon=True))

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                uid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]
                if uid != os.getuid():
                    raise PermissionError(f"the editor helper runs as uid {uid}, not {os.getuid()}")
                request = msgspec.msgpack.decode(_receive_message(sock), type=EditRequest)
                if not hmac.compare_digest(request.token, self._token):
                    raise PermissionError("the editor helper's token is wrong")
                reply = EditReply(content=self._ask(request.name, request.content))
            except Exception as e:
                log.info("an edit failed: %s", e)
                reply = EditReply(error=f"{type(e).__name__}: {e}")
            try:
                _send_message(sock, msgspec.msgpack.encode(reply))
            except OSError as e:
                log.info("the editor helper went away: %s", e)

    def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._directory)


def main(files: List[str]) -> int:
    """``editor FILE...``: have each file edited on the caller's side; the exit status."""
    path, token = os.environ.get(SOCKET_ENV), os.environ.get(TOKEN_ENV)
    if not path or not token:
        print(f"remowt editor: {SOCKET_ENV} or {TOKEN_ENV} is not set: only a remowt agent runs this", file=sys.stderr)
        return 1
    if not files:
        print("remowt editor: give the file to edit", file=sys.stderr)
        return 2
    for name in files:
        try:
            content = read_file(name) if os.path.exists(name) else b""
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                _send_message(sock, msgspec.msgpack.encode(EditRequest(token, os.path.abspath(name), content)))
                reply = msgspec.msgpack.decode(_receive_message(sock), type=EditReply)
            if reply.error is not None:
                print(f"remowt editor: {name}: {reply.error}", file=sys.stderr)
                return 1
            if reply.content is not None and reply.content != content:
                replace_file(name, reply.content)
        except (OSError, EOFError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            print(f"remowt editor: {name}: {e}", file=sys.stderr)
            return 1
    return 0
