"""The ssh transport: paramiko sessions, and a channel as a remowt :class:`Transport`.

:class:`SshSession` opens one authenticated ssh connection (through
ProxyJump hops or a ProxyCommand when the config says so), checks the host
key, and runs commands on channels. :class:`ChannelTransport` carries the
framed protocol over one channel.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import select
import socket
import struct
import threading
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple, Union, cast

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.common import MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_REQUEST, cMSG_CHANNEL_REQUEST

from ..errors import AuthenticationError, SshError
from ..runtime import interrupts
from ..runtime.deadline import Deadline
from . import hostkeys
from .base import Transport
from .readahead import read_ahead
from .sshconfig import SshTarget, jump_target

log = logging.getLogger("remowt.ssh")

Prompter = Callable[[str], str]
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
WINDOW_SIZE = 8 * 1024 * 1024
MAX_EXPECT = WINDOW_SIZE // 4  # a reader waits for at most this much: the window must let the peer send it
MAX_PACKET_SIZE = 32768
SMALL_WRITE = 4096  # a write this small is sent whole or not at all, with signals held off (see ChannelTransport)
STDERR_TAIL = 8192
CLOSE_TIMEOUT = 5.0
# What paramiko raises when the connection under a channel has gone.
_SESSION_ENDED = (OSError, EOFError, paramiko.SSHException)
TCP_QUICKACK: Optional[int] = getattr(socket, "TCP_QUICKACK", None)
_MAIN_THREAD = threading.main_thread().ident


def _deferred_during_kex(handler: Callable[[paramiko.Channel, paramiko.Message], None]) -> Any:
    """Wrap a channel handler that may send: during a key exchange, run it off the transport thread.

    paramiko runs channel handlers on its transport thread; a handler that
    sends (a channel close answers with a close) waits for the key exchange
    to finish, but only that thread can finish it, so the connection stalls
    (paramiko issue 822). Deferred handlers run in arrival order.
    """

    def handle(channel: paramiko.Channel, message: paramiko.Message) -> None:
        transport = channel.transport
        assert isinstance(transport, ParamikoTransport)
        transport.run_handler(handler, channel, message)

    return handle


def _feed_data(channel: paramiko.Channel, message: paramiko.Message) -> None:
    """A channel's data, for an :class:`_Inbox`, as a view of the packet paramiko decrypted (not a copy of it).

    paramiko's own handler copies the data out of the message (``get_binary``); the inbox joins the packets
    of a frame anyway, so that copy of every byte received was one too many.
    """
    inbox = channel.in_buffer
    if not isinstance(inbox, _Inbox):
        vars(paramiko.Channel)["_feed"](channel, message)
        return
    packet = message.packet
    whole = packet.getvalue()  # the payload paramiko made, itself: the buffer is not copied while shared
    start = packet.tell() + 4
    (size,) = struct.unpack_from(">I", whole, start - 4)
    inbox.feed(memoryview(whole)[start : start + size])


class ParamikoTransport(paramiko.Transport):
    """paramiko's Transport with three changes: re-keying safety, no delayed ACKs after a request, and reading
    ahead (:mod:`remowt.transports.readahead`) on a real socket.

    sshd leaves Nagle's algorithm on for sessions without a pty, so an answer
    it sends while an earlier packet of its own is unacknowledged waits for
    our ACK, which Linux delays by 40 ms when it thinks the connection is
    interactive (opening a channel right after logging in paid exactly
    that). After each message we send, the socket is put back in quick-ACK
    mode, so the next packet from the server is acknowledged at once.
    """

    _channel_handler_table = {
        **vars(paramiko.Transport)["_channel_handler_table"],
        MSG_CHANNEL_DATA: _feed_data,
        MSG_CHANNEL_CLOSE: _deferred_during_kex(vars(paramiko.Channel)["_handle_close"]),
        MSG_CHANNEL_REQUEST: _deferred_during_kex(vars(paramiko.Channel)["_handle_request"]),
    }

    def start(self) -> None:
        """Start paramiko's thread with the asynchronous signals blocked in it (:mod:`remowt.runtime.interrupts`)."""
        interrupts.without_interrupts(super().start)

    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        self._deferred: Deque[Tuple[Callable[..., None], paramiko.Channel, paramiko.Message]] = collections.deque()
        self._deferred_lock = threading.Lock()
        self._deferred_running = False
        self._quick_ack = sock if isinstance(sock, socket.socket) and TCP_QUICKACK is not None else None
        self._quick_ack_option = TCP_QUICKACK or 0
        self._poller: Optional[select.poll] = None
        if isinstance(sock, socket.socket):
            self._poller = select.poll()
            self._poller.register(sock, select.POLLOUT)
            read_ahead(self.packetizer)

    def _send_user_message(self, data: Any) -> None:
        vars(paramiko.Transport)["_send_user_message"](self, data)
        if self._quick_ack is not None:
            with contextlib.suppress(OSError):
                self._quick_ack.setsockopt(socket.IPPROTO_TCP, self._quick_ack_option, 1)

    def takes_bytes_now(self) -> bool:
        """Whether a small message goes out without waiting: a real socket with room (poll says writable)."""
        if self._poller is None:
            return False
        return bool(self._poller.poll(0))

    def run_handler(self, handler: Callable[..., None], channel: paramiko.Channel, message: Any) -> None:
        with self._deferred_lock:
            direct = not self._deferred_running and self.clear_to_send.is_set()
            if not direct:
                self._deferred.append((handler, channel, message))
                start, self._deferred_running = not self._deferred_running, True
        if direct:
            handler(channel, message)
        elif start:
            interrupts.start(threading.Thread(target=self._run_deferred, name="remowt-ssh-deferred", daemon=True))

    def _run_deferred(self) -> None:
        while True:
            with self._deferred_lock:
                if not self._deferred:
                    self._deferred_running = False
                    return
                handler, channel, message = self._deferred.popleft()
            try:
                handler(channel, message)
            except Exception:
                log.exception("deferred ssh channel message failed")


class _Inbox:
    """A channel's input buffer (in place of paramiko's): packets kept as they came, a reader woken when enough are.

    paramiko's buffer copies every byte three times (into an array, a slice of
    it, bytes of the slice) and wakes its reader for every packet (32 KiB from
    OpenSSH). Here a packet is kept as a view of the payload paramiko
    decrypted (:func:`_feed_data`); a read takes them (joined when there are
    several, copied when one), and :meth:`wait` sleeps until
    ``want`` bytes are there, so a reader gathering a large frame wakes once
    for it, not once per packet. Better still, paramiko's thread reads and
    dispatches them itself through ``read_here`` when the link's reader is
    idle (:meth:`Transport.on_arrival`), saving the thread switch. It offers
    what ``paramiko.Channel`` uses of its ``in_buffer``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._parts: Deque[Union[bytes, memoryview]] = collections.deque()
        self._size = 0
        self._closed = False
        self._kicked = False
        self.want = 1
        self.read_here: Optional[Callable[[], Optional[bool]]] = None

    def feed(self, data: Union[bytes, memoryview]) -> None:
        """Take a packet (on paramiko's thread); when enough is there, read it here or wake the reader."""
        with self._cond:
            self._parts.append(data)
            self._size += len(data)
            if self._size < self.want:
                return
            read_here = self.read_here
            if read_here is None:
                self._cond.notify_all()
                return
        going_on = read_here()
        with self._cond:
            if going_on is False:
                self._kicked = True
            if self._kicked or self._size >= self.want or self._closed:
                self._cond.notify_all()

    def read_ready(self) -> bool:
        return self._size > 0

    def read(self, nbytes: int, timeout: Optional[float] = None) -> bytes:
        """Up to ``nbytes``, waiting for some as paramiko's buffer does (``PipeTimeout`` after ``timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._size or self._closed, timeout):
                raise PipeTimeout()
            parts = self._parts
            if self._size <= nbytes:
                taken = list(parts)
                parts.clear()
            else:
                taken = []
                left = nbytes
                while left:
                    part = parts.popleft()
                    if len(part) > left:
                        parts.appendleft(part[left:])
                        part = part[:left]
                    taken.append(part)
                    left -= len(part)
            data = bytes(taken[0]) if len(taken) == 1 else b"".join(taken)
            self._size -= len(data)
            return data

    def empty(self) -> bytes:
        with self._cond:
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            return data

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def kick(self) -> None:
        """Make the current (or next) :meth:`wait` return at once."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def wait(self, timeout: Optional[float]) -> bool:
        """Wait until ``want`` bytes are there, the channel ended, or a kick; False after ``timeout``."""
        with self._cond:
            ready = self._cond.wait_for(lambda: self._size >= self.want or self._closed or self._kicked, timeout)
            self._kicked = False
            return ready

    def __len__(self) -> int:
        return self._size


class ChannelTransport(Transport):
    """A paramiko channel (an exec'd command's stdin and stdout) as a byte transport.

    The command's stderr is drained by a thread into the log, and its tail is
    kept for error messages (an unread stderr would stall the channel's window).
    """

    name = "ssh"
    atomic_write = SMALL_WRITE
    small_reads = True  # a read takes views of the packets in the inbox: what it leaves stays where it is
    caller_spin = 0.0004  # a call's round trip through sshd and the agent takes 100-200 µs here

    def __init__(self, channel: paramiko.Channel, description: str) -> None:
        """Take over ``channel``'s input: call before its command runs, while nothing was received."""
        self.channel = channel
        self.description = description
        self._inbox = _Inbox()
        channel.in_buffer = cast("BufferedPipe[bytes]", self._inbox)
        self._stderr = bytearray()
        self._stderr_lock = threading.Lock()
        self._closed = False
        self._stderr_thread = threading.Thread(target=self._drain_stderr, name="remowt-ssh-stderr", daemon=True)
        interrupts.start(self._stderr_thread)

    def _drain_stderr(self) -> None:
        while True:
            try:
                chunk = self.channel.recv_stderr(65536)
            except _SESSION_ENDED:
                return
            if not chunk:
                return
            with self._stderr_lock:
                self._stderr += chunk
                del self._stderr[:-STDERR_TAIL]
            for line in chunk.decode(errors="replace").splitlines():
                log.info("%s: %s", self.description, line)

    def stderr_tail(self) -> str:
        with self._stderr_lock:
            return self._stderr.decode(errors="replace")

    def on_arrival(self, read_here: Callable[[], Optional[bool]]) -> None:
        self._inbox.read_here = read_here

    def read(self, size: int) -> Optional[bytes]:
        channel = self.channel
        if channel.recv_ready():
            if (
                threading.current_thread() is channel.transport
                and channel.in_window_sofar + min(size, len(self._inbox)) > channel.in_window_threshold
            ):
                return None  # that read owes the window adjustment: sent by the reader, never paramiko's thread
            return channel.recv(size)
        if channel.eof_received or channel.closed or self._closed:
            return channel.recv(size) if channel.recv_ready() else b""
        return None

    def wait_readable(self, timeout: Optional[float]) -> bool:
        if self._closed:
            return True
        return self._inbox.wait(timeout)

    def expect(self, count: int) -> None:
        self._inbox.want = max(1, min(count, MAX_EXPECT))

    def writev(self, buffers: Sequence[memoryview], block: bool) -> int:
        """Small writes whole as one packet (so the main thread may send them, see :meth:`_send_whole`)."""
        if len(buffers) == 1:
            return self.write(buffers[0], block)
        size = sum(len(buffer) for buffer in buffers)
        if size > SMALL_WRITE:
            return self.write(buffers[0], block)
        return self.write(memoryview(b"".join(buffers)), block)

    def write(self, data: memoryview, block: bool) -> int:
        if not block and threading.current_thread() is self.channel.transport:
            return 0  # paramiko's own thread (reading here) never waits to send: the link's writer sends it
        if block or len(data) > SMALL_WRITE or threading.get_ident() != _MAIN_THREAD:
            return self._send(data, block)
        return interrupts.without_interrupts(functools.partial(self._send_whole, data))

    def _send_whole(self, data: memoryview) -> int:
        """Send ``data`` as one packet if that cannot wait now; else 0.

        The main thread sends small frames itself this way (the link's
        ``atomic_write``), with the asynchronous signals held off so that a
        Ctrl-C cannot cut paramiko's packet in two. It must therefore not
        wait: the channel's window must take all of it, no key exchange may
        be under way, and the socket must have room now (checked only when
        it is a real socket, not a ProxyJump channel or a ProxyCommand).
        """
        channel = self.channel
        transport = channel.transport
        if (
            channel.out_window_size >= len(data)
            and len(data) <= channel.out_max_packet_size - 64
            and isinstance(transport, ParamikoTransport)
            and transport.clear_to_send.is_set()
            and transport.takes_bytes_now()
        ):
            return self._send(data, False)
        return 0

    def _send(self, data: memoryview, block: bool) -> int:
        channel = self.channel
        if self._closed or channel.closed or channel.eof_sent:
            raise BrokenPipeError(f"{self.description}: channel is closed")
        try:
            if not block and not channel.send_ready():
                return 0
            sent: int = channel.send(bytes(data[: channel.out_max_packet_size]))
        except _SESSION_ENDED as e:  # paramiko raises EOFError when the connection went mid-send
            raise BrokenPipeError(f"{self.description}: connection lost: {e or type(e).__name__}") from e
        if sent == 0:
            raise BrokenPipeError(f"{self.description}: channel closed")
        return sent

    def exit_status(self, timeout: float) -> Optional[int]:
        """The command's exit status once it has one, else None."""
        if self.channel.status_event.wait(timeout):
            status: int = self.channel.recv_exit_status()
            return status
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(*_SESSION_ENDED):  # closing a channel of a lost connection
            self.channel.close()
        self._inbox.kick()
        if threading.current_thread() is not self._stderr_thread:
            self._stderr_thread.join(CLOSE_TIMEOUT)


class SshSession:
    """One authenticated ssh connection (and the jump hosts it goes through)."""

    def __init__(self, target: SshTarget, transport: ParamikoTransport, hops: List[SshSession]) -> None:
        self.target = target
        self.transport = transport
        self._hops = hops
        self._stop = threading.Event()
        self._keepalive: Optional[threading.Thread] = None
        if target.keepalive_interval > 0:
            self._keepalive = threading.Thread(target=self._send_keepalives, name="remowt-ssh-keepalive", daemon=True)
            interrupts.start(self._keepalive)

    def __repr__(self) -> str:
        return f"<SshSession {self.target}>"

    def _send_keepalives(self) -> None:
        """Send an ignored message every interval, so a dead TCP connection is noticed (TCP_USER_TIMEOUT)."""
        while not self._stop.wait(self.target.keepalive_interval):
            if not self.transport.is_active():
                return
            try:
                self.transport.send_ignore()
            except _SESSION_ENDED:
                return

    def exec(self, command: str, *, description: str = "", deadline: Optional[Deadline] = None) -> ChannelTransport:
        """Run ``command`` (a shell line) on the host; its stdin and stdout are the returned transport.

        Opening the channel and starting the command must be answered by
        ``deadline`` (default: the target's connect timeout), else ``SshError``.
        """
        if deadline is None:
            deadline = Deadline(self.target.connect_timeout)
        try:
            channel = self.transport.open_session(
                window_size=WINDOW_SIZE,
                max_packet_size=MAX_PACKET_SIZE,
                timeout=_left(deadline, self.target, "opening a channel"),
            )
        except _SESSION_ENDED as e:
            _left(deadline, self.target, "opening a channel")  # paramiko's timeout is an SSHException
            raise SshError(f"{self.target}: cannot open a channel to run a command: {e}") from e
        transport = ChannelTransport(channel, description or f"{self.target.alias}")
        try:
            timeout = _left(deadline, self.target, "starting a command")
            if not _exec_command(channel, command, timeout):
                raise SshError(f"{self.target}: no answer to the request to run a command in {timeout:.3g} s")
        except BaseException as e:
            transport.close()
            if isinstance(e, _SESSION_ENDED):
                raise SshError(f"{self.target}: cannot run a command: {e}") from e
            raise
        return transport

    def close(self) -> None:
        self._stop.set()
        self.transport.close()
        if self._keepalive is not None and threading.current_thread() is not self._keepalive:
            self._keepalive.join(CLOSE_TIMEOUT)
        for hop in reversed(self._hops):
            hop.close()


def _exec_command(channel: paramiko.Channel, command: str, timeout: float) -> bool:
    """``channel.exec_command(command)``, waiting ``timeout`` seconds at most; False if the server did not answer.

    paramiko's own waits for ever, so a server that never answers would hang
    the caller; this sends the same request and waits on the same event.
    """
    if channel.closed or not channel.active:
        raise paramiko.SSHException("Channel is not open")
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)
    message.add_string(command)
    cast(Any, channel)._event_pending()
    transport = channel.transport
    assert transport is not None
    cast(Any, transport)._send_user_message(message)
    if not channel.event.wait(timeout):
        return False
    if not channel.event_ready:
        raise transport.get_exception() or paramiko.SSHException("Channel closed.")
    return True


def _left(deadline: Deadline, target: SshTarget, step: str) -> float:
    """Seconds for ``step``: what is left, at most the connect timeout (ssh steps always have a limit).

    ``SshError`` when none are left.
    """
    try:
        return deadline.shorter(float(target.connect_timeout))
    except TimeoutError:
        raise SshError(f"{target}: {step} timed out (connect timeout {deadline.timeout:g} s)") from None


def open_session(
    target: SshTarget,
    config: paramiko.SSHConfig,
    *,
    password: Optional[str] = None,
    prompter: Optional[Prompter] = None,
    deadline: Optional[Deadline] = None,
) -> SshSession:
    """Connect to ``target``, check its host key and authenticate, all by ``deadline``.

    The default deadline is the target's connect timeout from now; the time
    ``prompter`` takes to answer is not counted.
    """
    if deadline is None:
        deadline = Deadline(target.connect_timeout)
    hops: List[SshSession] = []
    try:
        sock = _open_socket(target, config, hops, prompter, deadline)
        transport = ParamikoTransport(sock)
        try:
            _negotiate(transport, target, deadline)
            _authenticate(transport, target, password, prompter, deadline)
        except BaseException:
            transport.close()
            raise
        return SshSession(target, transport, hops)
    except BaseException:
        for hop in reversed(hops):
            hop.close()
        raise


def _open_socket(
    target: SshTarget,
    config: paramiko.SSHConfig,
    hops: List[SshSession],
    prompter: Optional[Prompter],
    deadline: Deadline,
) -> Any:
    if target.proxy_jump:
        hop = open_session(jump_target(target, config), config, prompter=prompter, deadline=deadline)
        hops.append(hop)
        try:
            return hop.transport.open_channel(
                "direct-tcpip",
                (target.hostname, target.port),
                ("127.0.0.1", 0),
                timeout=_left(deadline, target, f"opening a tunnel through {hop.target}"),
            )
        except _SESSION_ENDED as e:
            _left(deadline, target, f"opening a tunnel through {hop.target}")
            raise SshError(f"jump host {hop.target} cannot reach {target.hostname}:{target.port}: {e}") from e
    if target.proxy_command:
        try:
            return paramiko.ProxyCommand(target.proxy_command)
        except (OSError, paramiko.SSHException) as e:
            raise SshError(f"ProxyCommand {target.proxy_command!r} for {target.alias} failed: {e}") from e
    try:
        sock = socket.create_connection(
            (target.hostname, target.port), timeout=_left(deadline, target, "the TCP connection")
        )
    except socket.gaierror as e:
        raise SshError(f"cannot resolve host name {target.hostname!r}: {e.strerror}") from e
    except socket.timeout:
        raise SshError(
            f"connecting to {target.hostname}:{target.port} timed out after {target.connect_timeout:g} s"
        ) from None
    except OSError as e:
        raise SshError(f"cannot connect to {target.hostname}:{target.port}: {e.strerror or e}") from e
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.keepalive_interval > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(target.keepalive_interval * 1000))
    return sock


def _negotiate(transport: ParamikoTransport, target: SshTarget, deadline: Deadline) -> None:
    options = transport.get_security_options()
    options.ciphers = PREFERRED_CIPHERS + tuple(c for c in options.ciphers if c not in PREFERRED_CIPHERS)
    known = hostkeys.lookup(target.known_hosts_name, target.known_hosts)
    recorded = known.algorithms()
    options.key_types = tuple(t for t in options.key_types if t in recorded) + tuple(
        t for t in options.key_types if t not in recorded
    )
    left = _left(deadline, target, "the ssh handshake")
    transport.banner_timeout = transport.handshake_timeout = left
    try:
        transport.start_client(timeout=left)
    except _SESSION_ENDED as e:
        raise SshError(f"ssh handshake with {target.hostname}:{target.port} failed: {e}") from e
    if not transport.initial_kex_done:
        raise SshError(
            f"ssh handshake with {target.hostname}:{target.port} timed out after {target.connect_timeout:g} s"
        )
    key = transport.get_remote_server_key()
    added = hostkeys.check(known, key, target.host_key_policy, hash_names=target.hash_known_hosts)
    if added:
        log.warning("%s: added %s key %s to %s", target.alias, key.get_name(), hostkeys.fingerprint(key), added)


def _authenticate(
    transport: ParamikoTransport,
    target: SshTarget,
    password: Optional[str],
    prompter: Optional[Prompter],
    deadline: Deadline,
) -> None:
    """Try ssh-agent keys, then key files, then the password; raise :class:`AuthenticationError` naming all.

    The keys go first, without asking the server which methods it allows: sshd
    answers the ``none`` method that asks only after its failed-authentication
    delay (5-9 ms), so that question is put only when no key got in.
    """
    tried: List[str] = []
    allowed: Optional[List[str]] = None  # the server's list, once it has said it
    if prompter is not None:
        prompter = _unclocked(prompter, deadline)

    def attempt(label: str, method: Callable[[], List[str]]) -> bool:
        nonlocal allowed
        tried.append(label)
        transport.auth_timeout = _left(deadline, target, "authentication")
        try:
            method()
        except paramiko.BadAuthenticationType as e:
            allowed = list(e.allowed_types)
        except paramiko.AuthenticationException:
            _left(deadline, target, "authentication")  # paramiko's own timeout reads as a refusal
        except _SESSION_ENDED as e:
            raise SshError(f"{target}: connection lost during authentication: {e}") from e
        return bool(transport.is_authenticated())

    if not target.identities_only:
        agent = paramiko.Agent()
        try:
            for key in agent.get_keys():
                label = f"ssh-agent key {hostkeys.fingerprint(key)}"
                if attempt(label, functools.partial(transport.auth_publickey, target.user, key)):
                    return
                if allowed is not None and "publickey" not in allowed:
                    break
        finally:
            agent.close()
    for path in target.identity_files:
        if allowed is not None and "publickey" not in allowed:
            break
        loaded = _load_key(path, prompter, tried)
        if loaded is None:
            continue
        if attempt(f"key {path}", functools.partial(transport.auth_publickey, target.user, loaded)):
            return
    if allowed is None:
        transport.auth_timeout = _left(deadline, target, "authentication")
        allowed = _allowed_methods(transport, target.user)
        _left(deadline, target, "authentication")
        if allowed is None:
            return
    if "password" in allowed or "keyboard-interactive" in allowed:
        if password is None and prompter is not None:
            password = _ask(prompter, f"{target.user}@{target.hostname}'s password: ", tried)
        if password is not None:
            secret = password
            if "password" in allowed and attempt("password", lambda: transport.auth_password(target.user, secret)):
                return
            if "keyboard-interactive" in allowed and attempt(
                "keyboard-interactive",
                lambda: transport.auth_interactive(target.user, interactive_answers(secret, prompter, str(target))),
            ):
                return
    raise AuthenticationError(
        f"authentication to {target} failed; tried: {', '.join(tried) or 'nothing'}; "
        f"the server accepts: {', '.join(allowed) or 'nothing'}",
        tried=tuple(tried),
    )


def _unclocked(prompter: Prompter, deadline: Deadline) -> Prompter:
    """``prompter`` with ``deadline`` paused while it asks: the user's time is not the server's."""

    def ask(text: str) -> str:
        with deadline.paused():
            return prompter(text)

    return ask


def _allowed_methods(transport: ParamikoTransport, user: str) -> Optional[List[str]]:
    """The server's allowed methods for ``user``; None if no authentication is needed at all."""
    try:
        transport.auth_none(user)
    except paramiko.BadAuthenticationType as e:
        return list(e.allowed_types)
    except paramiko.AuthenticationException:
        return ["publickey", "password", "keyboard-interactive"]
    return None if transport.is_authenticated() else ["publickey", "password", "keyboard-interactive"]


def _load_key(path: str, prompter: Optional[Prompter], tried: List[str]) -> Optional[paramiko.PKey]:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's "password-protected"
        pass
    except FileNotFoundError:
        tried.append(f"key {path} (missing)")
        return None
    except (OSError, paramiko.SSHException, ValueError) as e:
        tried.append(f"key {path} (unreadable: {e})")
        return None
    if prompter is None:
        tried.append(f"key {path} (encrypted; no prompter to ask its passphrase)")
        return None
    for _ in range(3):
        passphrase = _ask(prompter, f"Enter passphrase for key '{path}': ", tried)
        try:
            return paramiko.PKey.from_path(path, password=cast(Any, passphrase.encode()))  # the stubs say str
        except (paramiko.SSHException, ValueError, TypeError):
            continue
    tried.append(f"key {path} (wrong passphrase)")
    return None


def _ask(prompter: Prompter, text: str, tried: List[str]) -> str:
    try:
        return prompter(text)
    except Exception as e:
        raise AuthenticationError(
            f"authentication cancelled: the prompter raised {type(e).__name__}: {e}", tried=tuple(tried)
        ) from e


def interactive_answers(
    secret: str, prompter: Optional[Prompter], where: str
) -> Callable[[str, str, List[Tuple[str, bool]]], List[str]]:
    """A keyboard-interactive handler: the password answers password prompts only; the prompter answers the rest.

    A one-time code or any other question is the user's to answer (shown with
    ``where`` it comes from), never the password; without a prompter such a
    question fails the method.
    """

    def handler(title: str, instructions: str, prompts: List[Tuple[str, bool]]) -> List[str]:
        answers = []
        for text, echo in prompts:
            if not echo and "password" in text.lower():
                answers.append(secret)
            elif prompter is None:
                raise paramiko.AuthenticationException(f"{where} asks {text.strip()!r}, and there is no prompter")
            else:
                answers.append(prompter(f"{where}: {' '.join(filter(None, [title, instructions, text]))}"))
        return answers

    return handler
