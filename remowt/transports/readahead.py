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
"""

from __future__ import annotations

import errno
import socket
from typing import Callable, List

from paramiko.packet import NeedRekeyException, Packetizer

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
    _check_keepalive: Callable[[], None]

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
