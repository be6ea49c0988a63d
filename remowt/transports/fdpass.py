"""Handing this process's fds to a local agent: ``SCM_RIGHTS`` over a unix socket beside the link.

Only an agent started here (:func:`remowt.connect_local`) has such a socket.
For a spawn, the user side sends one message on it just before the spawn
call: the fds, and as data the spawn's handle (the *token*). The agent takes
the batch by that token when it handles the call. Messages keep their
boundaries (``SOCK_SEQPACKET``), so a batch never runs into the next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import BadArguments, ConnectionLost
from ..runtime.deadline import Deadline, poll_timeout
from .stdio import dup_above_stdio

log = logging.getLogger("remowt.fdpass")
TOKEN = struct.Struct("!Q")
MAX_FDS = 253
"""The most fds one message carries (Linux's ``SCM_MAX_FD``): a child's stdio and the fds it inherits."""
PEER_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
CLAIM_TIMEOUT = 10.0
"""How long a spawn waits for its batch (it was sent before the call, so it is there unless the sender died)."""


def socket_pair() -> Tuple[socket.socket, socket.socket]:
    """Two connected unix ``SOCK_SEQPACKET`` sockets, close-on-exec, neither on fds 0-2."""
    first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with first, second:
        return socket.socket(fileno=dup_above_stdio(first.fileno())), socket.socket(
            fileno=dup_above_stdio(second.fileno())
        )


class FdSender:
    """The user's end: sends a spawn's fds to the agent."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = threading.Lock()  # a send and the close never overlap (a closed fd's number may be reused)

    def try_send(self, token: int, fds: Sequence[int]) -> bool:
        """Send ``fds`` under ``token`` if the socket has room now (whole or not at all); False if not."""
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} fds to hand the child: at most {MAX_FDS} go in one message (SCM_MAX_FD)")
        data = [TOKEN.pack(token)]
        message = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        with self._lock:
            if self._sock.fileno() < 0:
                raise ConnectionLost("the connection to the local agent is closed")
            try:
                self._sock.sendmsg(data, message)
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionLost("the local agent's fd socket is closed") from None
        return True

    def wait_writable(self, timeout: Optional[float]) -> bool:
        """Wait until the agent has taken earlier batches and there is room; False after ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self._sock, select.POLLOUT)
        return bool(poller.poll(poll_timeout(timeout)))

    def close(self) -> None:
        with self._lock:
            self._sock.close()


class FdReceiver:
    """The agent's end: keeps each batch by its token until the spawn it belongs to takes it.

    A batch for a spawn that gave up waiting is closed when it comes, and every
    batch still held is closed by :meth:`close`: no fd of the caller stays open here.
    """

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._batches: Dict[int, List[int]] = {}
        self._given_up: Set[int] = set()
        self._ended = False  # the sender closed its end
        self._closed = False

    def peer_pid(self) -> int:
        """The process that made the socket pair: the user side that started this agent (``SO_PEERCRED``)."""
        pid, _, _ = PEER_CREDENTIALS.unpack(
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
        )
        return int(pid)

    def take(self, token: int, count: int, timeout: float = CLAIM_TIMEOUT) -> List[int]:
        """The ``count`` fds sent under ``token`` (the caller closes them), waiting up to ``timeout`` seconds."""
        deadline = Deadline(timeout)
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectionLost("the agent is shutting down")
                self._receive()
                fds = self._batches.pop(token, None)
                missing = fds is None and (self._ended or deadline.expired())
                if missing:
                    self._given_up.add(token)
                poller = select.poll()  # registered before a close can come: its shutdown then ends the wait
                poller.register(self._sock, select.POLLIN)
            if fds is not None:
                if len(fds) != count:
                    _close_all(fds)
                    raise BadArguments(f"spawn {token} was sent {len(fds)} fds for {count} passed ones")
                return fds
            if missing:
                raise BadArguments(
                    f"the stdio fds of spawn {token} did not arrive on the agent's fd socket within {timeout:g} s"
                )
            poller.poll(poll_timeout(deadline.left()))

    def _receive(self) -> None:
        """Take every message waiting on the socket (under the lock)."""
        while not self._ended:
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(
                    TOKEN.size, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            fds: List[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) - len(payload) % 4]))
            if not data and not fds:
                self._ended = True
                return
            if len(data) != TOKEN.size or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                log.warning("dropped a malformed message of %d bytes and %d fds on the fd socket", len(data), len(fds))
                _close_all(fds)
                continue
            (token,) = TOKEN.unpack(data)
            if token in self._given_up:
                self._given_up.discard(token)
                _close_all(fds)
                continue
            _close_all(self._batches.pop(token, []))  # a token sent twice: the last batch counts
            self._batches[token] = fds

    def close(self) -> None:
        """Close every batch still held, and the socket; a spawn waiting for its fds fails at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            batches, self._batches = self._batches, {}
            for fds in batches.values():
                _close_all(fds)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a take() waiting on the socket
            self._sock.close()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
