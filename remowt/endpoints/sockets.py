"""The sockets service: connect to and listen on unix and TCP sockets, each connection a pair of streams.

Served by the agent and the privileged agent alike (a root-only socket is
reached through the latter). A connection moves through two streams: ``up``
(the caller writes, the socket gets it) and ``down`` (the socket's bytes go
to the caller), each with its own credit, so a peer that stops reading stops
only its own sender. The socket is read by a :class:`~remowt.endpoints.childio.ChildIO`
loop (no thread per connection) and written as a child's stdin is
(:class:`~remowt.rpc.fdinput.FdInput`: on the link's reader
thread while the socket takes the bytes at once), each through its own copy
of the socket's fd. The caller's end of ``up`` shuts the socket's write side
(the peer reads its end and may still answer); a reset or a lost link shuts
both sides, which ends ``down`` too.

A listener's connections are opened the other way: the serving side opens
their streams and announces them to the caller's :class:`SocketEventsApi`
before anything is sent on them, as lazy outputs are announced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import socket
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

import msgspec

from ..errors import BadArguments, ConnectionLost, Unreachable, os_name_text
from ..protocol.service import Service, proxy, rpc
from ..rpc.fdinput import FdInput
from ..rpc.router import Router
from ..rpc.streams import Stream
from ..runtime.interrupts import start
from .childio import Child, ChildIO

log = logging.getLogger("remowt.sockets")
BACKLOG = 128


class SocketAddress(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A unix socket at ``path``, else TCP ``host``:``port`` (port 0 to listen: any free port)."""

    path: Optional[bytes] = None
    host: str = ""
    port: int = 0

    def text(self) -> str:
        """As a person reads it: the path, or ``host:port``."""
        if self.path is not None:
            return os_name_text(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ConnectSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A connection to ``address`` over the caller's streams ``up`` and ``down``, given up after ``timeout`` s."""

    address: SocketAddress
    up: int
    down: int
    timeout: float = 30.0


class ListenSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A listener the caller names ``handle``: at ``address``, or (None) at a new socket in the runtime dir.

    The runtime dir is ``$XDG_RUNTIME_DIR``, else a private (0700) temporary
    directory made for it; either way the socket is removed when the listener
    closes. A unix socket gets ``mode`` (None: as the umask leaves it).
    """

    handle: int
    address: Optional[SocketAddress] = None
    mode: Optional[int] = None


class SocketsApi(Service, namespace=40):
    """Sockets of the serving node."""

    @rpc(1)
    def connect(self, spec: ConnectSpec) -> None:
        """Connect to ``spec.address`` and join the socket to the streams; the ``OSError`` if it fails."""
        raise NotImplementedError

    @rpc(2)
    def listen(self, spec: ListenSpec) -> SocketAddress:
        """Listen; the address bound (the port chosen, the path made). Connections go to :class:`SocketEventsApi`."""
        raise NotImplementedError

    @rpc(3)
    def unlisten(self, handle: int) -> None:
        """Stop listener ``handle`` (its socket file removed); its connections go on. Unknown: nothing."""
        raise NotImplementedError


class SocketEventsApi(Service, namespace=41):
    """Served by whoever listens: each accepted connection is announced here."""

    @rpc(1, inline=True, oneway=True)
    def accepted(self, handle: int, up: int, down: int, peer: str) -> None:
        """Listener ``handle`` accepted a connection from ``peer``; the sender opened streams ``up`` and ``down``."""
        raise NotImplementedError


def _fresh_error(e: OSError, address: SocketAddress) -> OSError:
    """``e`` as the caller should see it: its errno, naming the address (a timeout as ``ETIMEDOUT``)."""
    if isinstance(e, socket.gaierror):
        return OSError(errno.EHOSTUNREACH, f"cannot resolve {address.host!r}: {e.strerror}", address.text())
    code = e.errno if e.errno is not None else errno.ETIMEDOUT
    return OSError(code, e.strerror or os.strerror(code), address.text())


def connect_socket(address: SocketAddress, timeout: float) -> socket.socket:
    """A socket connected to ``address`` within ``timeout`` seconds (the OS's error as it is)."""
    if address.path is None:
        return socket.create_connection((address.host, address.port), timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address.path)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_socket(address: SocketAddress, timeout: float) -> socket.socket:
    """A socket connected to ``address`` within ``timeout`` seconds; a failure names the address."""
    try:
        return connect_socket(address, timeout)
    except OSError as e:
        raise _fresh_error(e, address) from None


class _Listener:
    """A listening socket and its accept thread; ``cleanup`` are the files (socket, then dir) removed at the end."""

    def __init__(self, owner: str, handle: int, sock: socket.socket, cleanup: List[str]) -> None:
        self.owner = owner
        self.handle = handle
        self.sock = sock
        self.cleanup = cleanup
        self.wake_r, self.wake_w = os.pipe()
        self.thread: Optional[threading.Thread] = None

    def stop(self, timeout: float) -> None:
        """Wake and join the accept thread, close the socket, remove its files."""
        os.write(self.wake_w, b"x")
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        for path in self.cleanup:
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)


class Sockets(SocketsApi):
    """The agent's implementation: one :class:`ChildIO` loop reads every socket, a thread per listener accepts."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._lock = threading.Lock()
        self._io = ChildIO(self._no_children)
        self._listeners: Dict[Tuple[str, int], _Listener] = {}
        self._writers: List[threading.Thread] = []
        self._closed = False

    @staticmethod
    def _no_children(child: Child) -> None:
        raise AssertionError(f"the sockets loop watches no children, got {child.pid}")

    # --- connections -------------------------------------------------------

    def connect(self, spec: ConnectSpec) -> None:
        owner = self._router.caller()
        _check_address(spec.address, listening=False)
        up = self._router.accept_stream(owner, spec.up)
        down = self._router.accept_stream(owner, spec.down)
        try:
            sock = _open_socket(spec.address, spec.timeout)
        except BaseException:
            up.close()
            down.close()
            raise
        self._join(sock, up, down)

    def _join(self, sock: socket.socket, up: Stream, down: Stream) -> None:
        """Move ``up`` into ``sock`` and ``sock`` into ``down``, each through its own copy of the fd."""
        sock.setblocking(False)
        with sock:
            reading, writing = os.dup(sock.fileno()), os.dup(sock.fileno())
        with self._lock:
            closed = self._closed
        if closed:  # shutting down: nothing would ever end these
            for fd in (reading, writing):
                os.close(fd)
            up.close()
            down.close()
            raise ConnectionLost("agent is shutting down")

        def end() -> None:
            # The caller's end of ``up``: the peer reads its end; a reset or a lost link: both sides end.
            view = socket.socket(fileno=writing)
            try:
                view.shutdown(socket.SHUT_WR if up.error is None else socket.SHUT_RDWR)
            except OSError:
                pass  # the peer is gone already
            finally:
                view.detach()

        self._io.pump(reading, down)
        FdInput(up, writing, f"socket-{writing}", self._add_writer, end)

    def _add_writer(self, thread: threading.Thread) -> None:
        with self._lock:
            self._writers = [writer for writer in self._writers if writer.is_alive()]
            self._writers.append(thread)

    # --- listeners --------------------------------------------------------

    def listen(self, spec: ListenSpec) -> SocketAddress:
        owner = self._router.caller()
        key = (owner, spec.handle)
        with self._lock:
            if self._closed:
                raise ConnectionLost("agent is shutting down")
            if key in self._listeners:
                raise BadArguments(f"listener handle {spec.handle} is already in use")
        cleanup: List[str] = []
        address = spec.address
        if address is None:
            address = SocketAddress(path=os.fsencode(_runtime_socket(cleanup)))
        _check_address(address, listening=True)
        try:
            sock, bound = _bind(address, spec.mode)
        except OSError as e:
            _remove(cleanup)
            raise _fresh_error(e, address) from None
        if address.path is not None:
            cleanup.insert(0, os.fsdecode(address.path))
        listener = _Listener(owner, spec.handle, sock, cleanup)
        with self._lock:
            taken = self._closed or key in self._listeners
            if not taken:
                self._listeners[key] = listener
        if taken:
            listener.stop(0)
            raise ConnectionLost(f"listener {spec.handle} cannot start: the agent is shutting down, or it ran twice")
        listener.thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"remowt-listen-{spec.handle}", daemon=True
        )
        start(listener.thread)
        return bound

    def unlisten(self, handle: int) -> None:
        with self._lock:
            listener = self._listeners.pop((self._router.caller(), handle), None)
        if listener is not None:
            listener.stop(5.0)

    def _accept_loop(self, listener: _Listener) -> None:
        poller = select.poll()
        poller.register(listener.sock.fileno(), select.POLLIN)
        poller.register(listener.wake_r, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if listener.wake_r in ready:
                return
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:  # out of fds, say: wait for the next one rather than spin
                log.warning("listener %d: accept failed: %s", listener.handle, e)
                if any(fd == listener.wake_r for fd, _ in poller.poll(1000)):
                    return
                continue
            self._announce(listener, sock, peer)

    def _announce(self, listener: _Listener, sock: socket.socket, peer: object) -> None:
        """Open the streams of an accepted connection, tell the caller, then join them to ``sock``."""
        text = peer if isinstance(peer, str) else (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "")
        opened: List[Stream] = []
        try:
            down = self._router.open_stream(listener.owner, one_way=True)
            opened.append(down)
            up = self._router.open_stream(listener.owner)
            opened.append(up)
            proxy(SocketEventsApi, self._router, listener.owner).accepted(listener.handle, up.sid, down.sid, text)
            self._join(sock, up, down)
        except (ConnectionLost, Unreachable) as e:
            log.debug("listener %d: connection from %r dropped: %s", listener.handle, text, e)
            sock.close()
            for stream in opened:
                stream.close()

    # --- the end -------------------------------------------------------------

    def close_listeners(self, timeout: float = 5.0) -> None:
        """Stop every listener and take no new connection (the agent is shutting down)."""
        with self._lock:
            self._closed = True
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            listener.stop(timeout)

    def join(self, timeout: float = 5.0) -> None:
        """After the router closed the streams: stop the loop (closing every socket) and join the writers."""
        self.close_listeners(timeout)
        self._io.stop(timeout)
        with self._lock:
            writers = list(self._writers)
        for writer in writers:
            writer.join(timeout)


def _check_address(address: SocketAddress, listening: bool) -> None:
    if address.path is not None:
        if not address.path or b"\0" in address.path:
            raise BadArguments(f"a unix socket path must be non-empty without NUL bytes, got {address.path!r}")
        return
    if not address.host and not listening:
        raise BadArguments("a TCP address needs a host")
    if not 0 <= address.port < 65536 or (not listening and not address.port):
        raise BadArguments(f"a TCP port must be 1 to 65535{' (or 0: any)' if listening else ''}, got {address.port}")


def _runtime_socket(cleanup: List[str]) -> str:
    """A new socket path in the runtime dir (a private temporary directory noted in ``cleanup`` if there is none)."""
    name = f"remowt-{secrets.token_hex(8)}.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return os.path.join(runtime, name)
    directory = tempfile.mkdtemp(prefix="remowt-")  # 0700
    cleanup.append(directory)
    return os.path.join(directory, name)


def _remove(paths: List[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _bind(address: SocketAddress, mode: Optional[int]) -> Tuple[socket.socket, SocketAddress]:
    """A listening socket at ``address`` and the address it got."""
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.path)
            if mode is not None:
                os.chmod(address.path, mode)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock, address
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, where = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    return sock, SocketAddress(host=host, port=port)
