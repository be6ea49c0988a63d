"""Sockets through a node: a real socket joined to a remote one, and forwards both ways (ssh's -L and -R).

A connection is the agent's socket joined to two streams (see
:mod:`remowt.endpoints.sockets`); here a :class:`Pump` joins those streams
to a local socket: a thread reads the socket and writes ``up`` (waiting for
credit, so a remote peer that stops reading stops this reader, and only it),
and ``down`` is written to the socket by the link's reader thread as it
arrives (a thread of its own writes only what the socket does not take at once).
End of input becomes the other side's end (``shutdown(SHUT_WR)``); a reset
or a lost link shuts the local socket both ways, so whoever holds it sees its
end instead of a hang.

``connect_unix`` and ``connect_tcp`` hand the caller one end of a
``socketpair()`` whose other end is pumped. A :class:`LocalForward` listens
here and connects through the node for each connection it accepts; a
:class:`RemoteForward` has the node listen and connects here for each
connection the node announces to :class:`SocketEvents`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import itertools
import logging
import os
import select
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Set, Tuple, Union

from ..endpoints.sockets import ConnectSpec, ListenSpec, SocketAddress, SocketEventsApi, SocketsApi, connect_socket
from ..errors import ConnectionLost, Unreachable
from ..rpc.fdinput import FdInput
from ..rpc.router import Router
from ..rpc.streams import Stream
from ..runtime.interrupts import start

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("remowt.sockets")

#: A socket address: a path (a unix socket), ``(host, port)`` (TCP), or a port alone (TCP on localhost).
Address = Union[str, bytes, "os.PathLike[str]", Tuple[str, int], int]
#: An address as :attr:`LocalForward.address` and :attr:`RemoteForward.address` give it: a path or ``(host, port)``.
Bound = Union[str, Tuple[str, int]]
#: Where a nix daemon listens.
NIX_DAEMON_SOCKET = "/nix/var/nix/daemon-socket/socket"
CHUNK = 256 * 1024  # one read of a local socket
CONNECT_TIMEOUT = 30.0
Prepared = Tuple[socket.socket, Stream, Stream]


def socket_address(address: Address) -> SocketAddress:
    """``address`` as the sockets service takes it."""
    if isinstance(address, bool):
        raise TypeError(f"a socket address must be a path, (host, port) or a port, got {address!r}")
    if isinstance(address, int):
        return SocketAddress(host="localhost", port=address)
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[0], str) or not isinstance(address[1], int):
            raise TypeError(f"a TCP address must be (host, port), got {address!r}")
        return SocketAddress(host=address[0], port=address[1])
    if isinstance(address, (str, bytes, os.PathLike)):
        return SocketAddress(path=os.fsencode(address))
    raise TypeError(f"a socket address must be a path, (host, port) or a port, got {type(address).__name__}")


def bound(address: SocketAddress) -> Bound:
    """What the caller sees of an address: a path as str, else ``(host, port)``."""
    return os.fsdecode(address.path) if address.path is not None else (address.host, address.port)


def open_streams(node: Node, address: SocketAddress, timeout: Optional[float]) -> Tuple[Stream, Stream]:
    """Have ``node`` connect to ``address`` within ``timeout`` s (None: the node's call timeout); its ``(up, down)``.

    Failing, it raises the node's ``OSError`` (``ConnectionRefusedError``, ``FileNotFoundError`` …).
    """
    limit = timeout if timeout is not None else node.call_timeout or CONNECT_TIMEOUT
    api = node.service(SocketsApi, limit + 5.0)  # the agent gives up first, and says why
    up = node.router.open_stream(node.address)
    down = node.router.open_stream(node.address)
    down.close_write()
    try:
        api.connect(ConnectSpec(address=address, up=up.sid, down=down.sid, timeout=limit))
    except BaseException:
        up.close()
        down.close()
        raise
    return up, down


def connect(node: Node, address: SocketAddress, timeout: Optional[float]) -> socket.socket:
    """A socket here joined to ``address`` at ``node``: one end of a socketpair, the other pumped."""
    up, down = open_streams(node, address, timeout)
    try:
        ours, theirs = socket.socketpair()
    except BaseException:
        up.close()
        down.close()
        raise
    Pump(f"socket-{up.sid}", lambda: (ours, up, down)).start()
    return theirs


def forward_nix_daemon(node: Node, local: Address, remote: Address = NIX_DAEMON_SOCKET) -> LocalForward:
    """The nix daemon's socket at ``node`` (``remote``), listened to at ``local`` here: ``nix --store unix://LOCAL``.

    Tried as the login first; a socket only root may use (``PermissionError``)
    is reached through the node's privileged agent.
    """
    target = socket_address(remote)
    try:
        probe = open_streams(node, target, None)
    except PermissionError:
        node = node.privileged
    else:
        for stream in probe:  # the probe ends at once: the daemon reads its end
            stream.close()
    return LocalForward(node, local, remote)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # not connected (any more): nothing to shut
        sock.shutdown(how)


class Pump:
    """Moves bytes between a local socket and a connection's streams.

    A thread reads the socket into ``up``; ``down`` is written to the socket
    where it arrives, by the link's reader thread, and only what the socket
    does not take at once by a thread of its own (:class:`~remowt.rpc.fdinput.FdInput`).
    ``prepare`` (run on the first thread) makes the socket and the streams,
    cleaning up after itself if it fails; ``on_done`` runs once both directions ended.
    """

    def __init__(self, name: str, prepare: Callable[[], Prepared], on_done: Callable[[Pump], None] = lambda p: None):
        self.name = name
        self._prepare = prepare
        self._on_done = on_done
        self._lock = threading.Lock()
        self._prepared: Optional[Prepared] = None
        self._stopping = False
        self._running = 0
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        with self._lock:
            self._running += 1
        thread = threading.Thread(target=self._outbound, name=f"remowt-{self.name}", daemon=True)
        self._add_thread(thread)
        start(thread)

    def _add_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.append(thread)

    def _outbound(self) -> None:
        """Make the connection, then copy the socket into ``up`` (and start the other direction)."""
        try:
            prepared = self._prepare()
        except (OSError, Unreachable) as e:
            log.debug("%s: no connection: %s", self.name, e)
            self._finished()
            return
        with self._lock:
            self._prepared = prepared
            self._running += 1
            stopping = self._stopping
        sock, up, down = prepared
        if stopping:
            self._stop_prepared(prepared)
        self._inbound(sock, down)
        try:
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    up.close_write()
                    break
                up.write(data)
        except OSError as e:  # the socket failed, or up did (reset: the remote socket stopped reading; lost)
            log.debug("%s: outbound ends: %s", self.name, e)
            up.close()
            _shutdown(sock, socket.SHUT_RD)
        self._finished()

    def _inbound(self, sock: socket.socket, down: Stream) -> None:
        """Copy ``down`` into the socket as it arrives: its end shuts the socket's write side, a failure both."""

        def end() -> None:
            # An end that is not the peer's EOF (a reset, a lost link, the socket gone here) shuts both sides.
            _shutdown(sock, socket.SHUT_WR if down.ended and down.error is None else socket.SHUT_RDWR)
            self._finished()

        FdInput(
            down,
            os.dup(sock.fileno()),
            f"{self.name}-in",
            self._add_thread,
            end,
            write=lambda view: sock.send(view, socket.MSG_DONTWAIT),
        )

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
            prepared = self._prepared
        if not last:
            return
        if prepared is not None:
            sock, up, down = prepared
            up.close()
            down.close()
            sock.close()
        self._on_done(self)

    @staticmethod
    def _stop_prepared(prepared: Prepared) -> None:
        sock, up, down = prepared
        _shutdown(sock, socket.SHUT_RDWR)
        up.close()
        down.close()

    def stop(self) -> None:
        """End both directions now (the local socket shut, the streams reset) and join the threads."""
        with self._lock:
            self._stopping = True
            prepared = self._prepared
        if prepared is not None:
            self._stop_prepared(prepared)
        current = threading.current_thread()
        while True:
            with self._lock:
                threads = [thread for thread in self._threads if thread is not current and thread.is_alive()]
            if not threads:
                return
            for thread in threads:
                thread.join()


class _Forward(abc.ABC):
    """What both forwards share: the pumps of their connections, stopped with them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pumps: Set[Pump] = set()
        self._closed = False

    def _add(self, name: str, prepare: Callable[[], Prepared], abandon: Callable[[], None]) -> None:
        """Start a pump for a new connection, or ``abandon`` it if the forward closed meanwhile."""
        pump = Pump(name, prepare, self._forget)
        with self._lock:
            closed = self._closed
            if not closed:
                self._pumps.add(pump)
        if closed:
            abandon()
        else:
            pump.start()

    def _forget(self, pump: Pump) -> None:
        with self._lock:
            self._pumps.discard(pump)

    def _stop_pumps(self) -> None:
        with self._lock:
            self._closed = True
            pumps = list(self._pumps)
        for pump in pumps:
            pump.stop()

    @property
    def connections(self) -> int:
        """How many connections are open."""
        with self._lock:
            return len(self._pumps)

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening and end every connection."""

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalForward(_Forward):
    """``ssh -L``: a listener here; each connection to it reaches ``remote`` through ``node``.

    :attr:`address` is where it listens (the port chosen if 0 was asked).
    Closing it stops the listener (removing a unix socket it made) and ends
    every connection. Use as a context manager.
    """

    def __init__(self, node: Node, local: Address, remote: Address, connect_timeout: Optional[float] = None) -> None:
        super().__init__()
        self.node = node
        self.remote = socket_address(remote)
        self._connect_timeout = connect_timeout
        wanted = socket_address(local)
        self._listener, where = _listen_here(wanted)
        self.address: Bound = bound(where)
        self._path = os.fsdecode(wanted.path) if wanted.path is not None else None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="remowt-forward-L", daemon=True)
        start(self._thread)

    def __enter__(self) -> LocalForward:
        return self

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        number = itertools.count(1)
        while True:
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:  # out of fds, say: wait rather than spin
                log.warning("forward to %s: accept failed: %s", self.remote.text(), e)
                if any(fd == self._wake_r for fd, _ in poller.poll(1000)):
                    return
                continue
            sock.setblocking(True)
            self._add(f"forward-L-{next(number)}", functools.partial(self._connect, sock), sock.close)

    def _connect(self, sock: socket.socket) -> Prepared:
        try:
            up, down = open_streams(self.node, self.remote, self._connect_timeout)
        except BaseException:
            sock.close()  # the client sees its end
            raise
        return sock, up, down

    def close(self) -> None:
        """Stop listening and end every connection (threads joined, fds closed)."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        self._stop_pumps()


class RemoteForward(_Forward):
    """``ssh -R``: ``node`` listens at ``remote`` (None: a socket in its runtime dir); connections reach ``local``.

    :attr:`address` is where the node listens (the port it chose, the path
    it made). Closing it stops the remote listener (removing its socket
    file) and ends every connection. Use as a context manager.
    """

    def __init__(self, node: Node, remote: Optional[Address], local: Address, mode: Optional[int] = None) -> None:
        super().__init__()
        self.node = node
        self.local = socket_address(local)
        wanted = None if remote is None else socket_address(remote)
        self._events = SocketEvents.of(node.router)
        self.handle = self._events.add(self)
        try:
            self._api = node.service(SocketsApi)
            where = self._api.listen(ListenSpec(handle=self.handle, address=wanted, mode=mode))
        except BaseException:
            self._events.remove(self.handle)
            raise
        self.address: Bound = bound(where)

    def __enter__(self) -> RemoteForward:
        return self

    def accepted(self, up: Stream, down: Stream, peer: str) -> None:
        """A connection from ``peer`` at the node (on the link's reader thread: only starts its pump)."""

        def abandon() -> None:
            up.close()
            down.close()

        self._add(f"forward-R-{self.handle}-{up.sid}", functools.partial(self._connect, up, down), abandon)

    def _connect(self, up: Stream, down: Stream) -> Prepared:
        try:
            sock = _connect_here(self.local)
        except BaseException:
            up.close()
            down.close()
            raise
        return sock, up, down

    def close(self) -> None:
        """Stop the remote listener and end every connection (threads joined, fds closed)."""
        if not self._events.remove(self.handle):
            return
        with contextlib.suppress(ConnectionLost, Unreachable):  # else the node and its listener are gone
            self._api.unlisten(self.handle)
        self._stop_pumps()


class SocketEvents(SocketEventsApi):
    """The user side of :class:`SocketEventsApi` on one router: hands accepted connections to their forwards."""

    _registered: weakref.WeakKeyDictionary[Router, SocketEvents] = weakref.WeakKeyDictionary()
    _registering = threading.Lock()

    def __init__(self, router: Router) -> None:
        self._router = weakref.ref(router)  # the router holds this service: no cycle keeps its key alive
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._forwards: Dict[int, RemoteForward] = {}

    @classmethod
    def of(cls, router: Router) -> SocketEvents:
        """The one served on ``router`` (registered on first use)."""
        with cls._registering:
            events = cls._registered.get(router)
            if events is None:
                events = cls._registered[router] = cls(router)
                router.register(events)
            return events

    def add(self, forward: RemoteForward) -> int:
        with self._lock:
            handle = next(self._handles)
            self._forwards[handle] = forward
        return handle

    def remove(self, handle: int) -> bool:
        """Forget listener ``handle``; False if it was forgotten already."""
        with self._lock:
            return self._forwards.pop(handle, None) is not None

    def accepted(self, handle: int, up: int, down: int, peer: str) -> None:
        router = self._router()
        if router is None:  # closed and gone meanwhile
            return
        caller = router.caller()
        try:
            up_stream = router.accept_stream(caller, up)
            down_stream = router.accept_stream(caller, down)
        except BrokenPipeError:  # the node gave up on it already
            return
        down_stream.receive_only()
        with self._lock:
            forward = self._forwards.get(handle)
        if forward is None:
            up_stream.close()
            down_stream.close()
            return
        forward.accepted(up_stream, down_stream, peer)


def _listen_here(address: SocketAddress) -> Tuple[socket.socket, SocketAddress]:
    """A listening socket here at ``address``, and the address it got."""
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = address
    else:
        family, kind, proto, _, target = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    try:
        if address.path is not None:
            sock.bind(address.path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(target)
            host, port = sock.getsockname()[:2]
            where = SocketAddress(host=host, port=port)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, where


def _connect_here(address: SocketAddress) -> socket.socket:
    """A socket here connected to ``address``."""
    sock = connect_socket(address, CONNECT_TIMEOUT)
    sock.settimeout(None)
    return sock
