"""paramiko's packet reader, reading the socket ahead in large chunks.

paramiko reads every packet with two ``recv`` calls (its first block, then
the rest): at OpenSSH's 32 KiB per packet that is ~65,000 system calls per
GiB received, and each gives up the GIL and must take it back from the
threads consuming the data. :class:`ReadAhead` keeps what one ``recv`` of up
to :data:`CHUNK` bytes brought and serves the packets from it: ~4,000 calls
per GiB, and forwarded or copied data moves ~15% faster here.

Only paramiko's thread reads (``Packetizer.read_message``), so the buffer
needs no lock. What paramiko's own ``read_all`` does between reads is kept:
a timed-out ``recv`` (its socket times out every 0.1 s) checks for a closed
packetizer, a pending re-key (only before a message's first byte) and the
keepalive; the handshake's deadline is checked before each ``recv``.

Under AES-GCM (what remowt prefers), :meth:`ReadAhead.read_message` is
paramiko's own made lean: the packet is decrypted from a view of what was
read ahead, and channel data is handed on in the decrypted packet itself.
paramiko's copies every byte five times on the way (slices and joins of the
packet and payload); the counters, re-key rules and sequence numbers are
paramiko's, kept in its own fields.
"""

from __future__ import annotations

import errno
import io
import socket
import struct
import threading
from typing import Any, Callable, List, Optional, Tuple, Union

from paramiko.common import DEBUG, MSG_CHANNEL_DATA
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer
from paramiko.ssh_exception import SSHException

CHUNK = 256 * 1024


class ReadAhead(Packetizer):
    """A ``Packetizer`` whose ``read_all`` serves from what it read ahead; made by :func:`read_ahead`."""

    _ahead: bytes
    _taken: int
    # paramiko's own, private (the stubs do not have them)
    _Packetizer__socket: socket.socket
    _Packetizer__remainder: bytes  # read past the banner line
    _Packetizer__closed: bool
    _Packetizer__need_rekey: bool
    _Packetizer__timer: Optional[threading.Timer]
    _Packetizer__aead_in: bool
    _Packetizer__block_engine_in: Any
    _Packetizer__iv_in: bytes
    _Packetizer__mac_size_in: int
    _Packetizer__dump_packets: bool
    _Packetizer__compress_engine_in: Any
    _Packetizer__sequence_number_in: int
    _Packetizer__received_bytes: int
    _Packetizer__received_packets: int
    _Packetizer__received_bytes_overflow: int
    _Packetizer__received_packets_overflow: int
    _check_keepalive: Callable[[], None]
    _inc_iv_counter: Callable[[bytes], bytes]
    _trigger_rekey: Callable[[], None]
    _log: Callable[[int, str], None]
    _initial_kex_done: bool

    def complete_handshake(self) -> None:
        """paramiko's, then the handshake's timer forgotten: paramiko calls this after every packet it handles,
        and cancelling the long-ended timer each time set an Event (~6% of its thread's time when copying)."""
        super().complete_handshake()
        self._Packetizer__timer = None

    def read_message(self) -> Tuple[int, Message]:
        if (
            not self._Packetizer__aead_in
            or self._Packetizer__dump_packets
            or self._Packetizer__compress_engine_in is not None
        ):
            return super().read_message()
        head = self.read_all(4, check_rekey=True)
        (size,) = struct.unpack(">I", head)
        tag = self._Packetizer__mac_size_in
        iv = self._Packetizer__iv_in
        packet: bytes = self._Packetizer__block_engine_in.decrypt(iv, self._view(size + tag), head)
        self._Packetizer__iv_in = self._inc_iv_counter(iv)
        if size < 2 or packet[0] > size - 2:
            raise SSHException(f"Invalid packet: {size} bytes with {packet[0]} of padding")
        cmd = packet[1]
        if cmd == MSG_CHANNEL_DATA:
            message = Message()  # the whole packet, read from its message: what the padding leaves is never read
            message.packet = io.BytesIO(packet)
            message.packet.seek(2)
        else:
            message = Message(packet[2 : size - packet[0]])
        message.seqno = seqno = self._Packetizer__sequence_number_in
        self._count(seqno, size + tag + 4)
        return cmd, message

    def _count(self, seqno: int, raw_size: int) -> None:
        """paramiko's bookkeeping of a packet received: its sequence number, and whether to re-key."""
        next_seq = (seqno + 1) & 0xFFFFFFFF
        if next_seq == 0 and not self._initial_kex_done:
            raise SSHException("Sequence number rolled over during initial kex!")
        self._Packetizer__sequence_number_in = next_seq
        self._Packetizer__received_bytes += raw_size
        self._Packetizer__received_packets += 1
        if self._Packetizer__need_rekey:
            self._Packetizer__received_bytes_overflow += raw_size
            self._Packetizer__received_packets_overflow += 1
            if (
                self._Packetizer__received_packets_overflow >= self.REKEY_PACKETS_OVERFLOW_MAX
                or self._Packetizer__received_bytes_overflow >= self.REKEY_BYTES_OVERFLOW_MAX
            ):
                raise SSHException("Remote transport is ignoring rekey requests")
        elif (
            self._Packetizer__received_packets >= self.REKEY_PACKETS
            or self._Packetizer__received_bytes >= self.REKEY_BYTES
        ):
            received = (self._Packetizer__received_packets, self._Packetizer__received_bytes)
            self._log(DEBUG, "Rekeying (hit {} packets, {} bytes received)".format(*received))
            self._Packetizer__received_bytes_overflow = 0
            self._Packetizer__received_packets_overflow = 0
            self._trigger_rekey()

    def _view(self, n: int) -> Union[bytes, memoryview]:
        """The next ``n`` bytes, as a view of what was read ahead when it holds them all (no copy)."""
        ahead, taken = self._ahead, self._taken
        if len(ahead) - taken >= n:
            self._taken = taken + n
            return memoryview(ahead)[taken : taken + n]
        return self.read_all(n)

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        ahead, taken = self._ahead, self._taken
        have = len(ahead) - taken
        if have >= n:
            self._taken = taken + n
            return ahead[taken : taken + n]
        parts: List[bytes] = [ahead[taken:]] if have else []
        remainder = self._Packetizer__remainder
        if remainder:
            parts.append(remainder)
            have += len(remainder)
            self._Packetizer__remainder = b""
        sock = self._Packetizer__socket
        while have < n:
            if self.handshake_timed_out():
                raise EOFError()
            try:
                data = sock.recv(CHUNK)  # never more: a packet length is the peer's word, not an allocation
            except socket.timeout:
                data = None
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    if self._Packetizer__closed:
                        raise EOFError() from None
                    raise
                data = None
            if data is None:
                if self._Packetizer__closed:
                    raise EOFError()
                if check_rekey and have == 0 and self._Packetizer__need_rekey:
                    raise NeedRekeyException()
                self._check_keepalive()
                continue
            if not data:
                raise EOFError()
            parts.append(data)
            have += len(data)
        ahead = parts[0] if len(parts) == 1 else b"".join(parts)
        self._ahead, self._taken = ahead, n
        return ahead[:n]


def read_ahead(packetizer: Packetizer) -> None:
    """Make ``packetizer`` (of a transport over a real socket, before its first packet) read ahead."""
    packetizer.__class__ = ReadAhead
    assert isinstance(packetizer, ReadAhead)
    packetizer._ahead = b""
    packetizer._taken = 0
