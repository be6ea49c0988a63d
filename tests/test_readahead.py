"""How the ssh transport reads: the read-ahead packet reader (on a socketpair and a real connection), the inbox."""

from __future__ import annotations

import os
import socket
import threading
from typing import Iterator, List, Tuple

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST, MSG_IGNORE
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer
from sshd import SshServer

import remowt
from remowt.transports import readahead
from remowt.transports.readahead import ReadAhead, read_ahead
from remowt.transports.ssh import ChannelTransport, _Inbox

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[Tuple[ReadAhead, socket.socket]]:
    """A read-ahead packetizer on one end of a socketpair (timing out as paramiko's does) and the other end."""
    ours, theirs = socket.socketpair()
    ours.settimeout(0.1)
    packetizer = Packetizer(ours)
    read_ahead(packetizer)
    assert isinstance(packetizer, ReadAhead)
    try:
        yield packetizer, theirs
    finally:
        ours.close()
        theirs.close()


def test_reads_are_served_in_order_across_chunks_and_sends(pair: Tuple[ReadAhead, socket.socket]) -> None:
    packetizer, theirs = pair
    data = os.urandom(3 * readahead.CHUNK + 12345)
    sender = threading.Thread(target=lambda: [theirs.sendall(data[i : i + 777]) for i in range(0, len(data), 777)])
    sender.start()
    sizes = [16, 1, 32768, readahead.CHUNK + 5, 4, 100000]
    got = []
    for size in sizes:
        got.append(packetizer.read_all(size))
        assert len(got[-1]) == size
    got.append(packetizer.read_all(len(data) - sum(sizes)))
    sender.join()
    assert b"".join(got) == data


def test_what_the_banner_reading_left_comes_first(pair: Tuple[ReadAhead, socket.socket]) -> None:
    packetizer, theirs = pair
    packetizer._Packetizer__remainder = b"left"
    theirs.sendall(b"over")
    assert packetizer.read_all(2) == b"le"
    assert packetizer.read_all(6) == b"ftover"


def test_the_end_of_the_connection_is_eoferror(pair: Tuple[ReadAhead, socket.socket]) -> None:
    packetizer, theirs = pair
    theirs.sendall(b"abc")
    theirs.shutdown(socket.SHUT_WR)
    assert packetizer.read_all(2) == b"ab"
    with pytest.raises(EOFError):
        packetizer.read_all(2)


def test_a_huge_length_from_the_peer_is_read_in_chunks_not_allocated(pair: Tuple[ReadAhead, socket.socket]) -> None:
    """A hostile server's packet length of 1 TiB: the reader waits for the bytes, it does not allocate them."""
    packetizer, theirs = pair
    theirs.sendall(b"z" * 1000)
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        packetizer.read_all(1 << 40)


def test_a_closed_packetizer_ends_a_read_that_waits(pair: Tuple[ReadAhead, socket.socket]) -> None:
    packetizer, _ = pair
    closer = threading.Timer(0.2, packetizer.close)
    closer.start()
    with pytest.raises(EOFError):
        packetizer.read_all(1)
    closer.join()


def test_a_pending_rekey_interrupts_a_read_only_before_a_message_starts(
    pair: Tuple[ReadAhead, socket.socket],
) -> None:
    packetizer, theirs = pair
    packetizer._Packetizer__need_rekey = True
    with pytest.raises(NeedRekeyException):
        packetizer.read_all(16, check_rekey=True)
    theirs.sendall(b"x" * 8)
    assert packetizer.read_all(4, check_rekey=True) == b"xxxx"
    sender = threading.Timer(0.3, lambda: theirs.sendall(b"y" * 12))
    sender.start()
    assert packetizer.read_all(16, check_rekey=True) == b"x" * 4 + b"y" * 12  # begun: the message is read whole
    sender.join()


KEY, IV = os.urandom(16), os.urandom(12)


def gcm(packetizer: Packetizer, inbound: bool) -> None:
    """Switch ``packetizer`` to AES-128-GCM one way, as paramiko's transport does after a key exchange."""
    if inbound:
        packetizer.set_inbound_cipher(AESGCM(KEY), 16, None, 16, None, aead=True, iv_in=IV)
    else:
        packetizer.set_outbound_cipher(AESGCM(KEY), 16, None, 16, None, aead=True, iv_out=IV)


def messages() -> List[Message]:
    """Channel data of many sizes (OpenSSH's 32 KiB among them) between messages of other kinds."""
    made = []
    for size in (0, 1, 15, 16, 17, 1000, 32768, 4, 65536, 3):
        data = Message()
        data.add_byte(bytes([MSG_CHANNEL_DATA]))
        data.add_int(7)
        data.add_string(os.urandom(size))
        other = Message()
        other.add_byte(bytes([MSG_CHANNEL_WINDOW_ADJUST if size % 2 else MSG_IGNORE]))
        other.add_int(size)
        other.add_string(b"x" * (size % 50))
        made += [data, other]
    return made


def received(reader: Packetizer, count: int) -> List[Tuple[int, int, bytes, bool, int, int]]:
    """Each message read: its type, sequence number, what a handler reads of it, whether a re-key was asked,
    and paramiko's counts of bytes and packets received (what its re-key rules go by)."""
    got = []
    for _ in range(count):
        cmd, message = reader.read_message()
        if cmd == MSG_CHANNEL_DATA:
            body = message.get_int().to_bytes(4, "big") + message.get_binary()
        else:
            body = message.get_remainder()
        counts = (reader._Packetizer__received_bytes, reader._Packetizer__received_packets)  # type: ignore[attr-defined]
        got.append((cmd, message.seqno, body, reader.need_rekey(), *counts))
    return got


def test_the_lean_gcm_reader_reads_what_paramikos_own_reads() -> None:
    """Under AES-GCM, ReadAhead.read_message gives what paramiko's gives for the same bytes: types, sequence
    numbers, contents (channel data whole, padding unread), and the re-key asked at the same packet."""
    sent = messages()
    stream = []
    for rekey_bytes in (1 << 30, 40000):
        readers = []
        for lean in (False, True):
            ours, theirs = socket.socketpair()
            reader, writer = Packetizer(ours), Packetizer(theirs)
            if lean:
                read_ahead(reader)
            gcm(reader, inbound=True)
            gcm(writer, inbound=False)
            reader.REKEY_BYTES = rekey_bytes
            for message in sent:
                writer.send_message(message)
            readers.append(received(reader, len(sent)))
            ours.close()
            theirs.close()
        plain, ours_read = readers
        assert ours_read == plain
        assert [cmd for cmd, *_ in plain] == [m.asbytes()[0] for m in sent]
        stream.append(any(got[3] for got in plain))
    assert stream == [False, True]


def test_a_forged_gcm_packet_fails_as_in_paramiko(pair: Tuple[ReadAhead, socket.socket]) -> None:
    reader, theirs = pair
    gcm(reader, inbound=True)
    writer_sock, capture = socket.socketpair()
    writer = Packetizer(writer_sock)
    gcm(writer, inbound=False)
    writer.send_message(messages()[2])
    packet = bytearray(capture.recv(1 << 16))
    packet[20] ^= 1
    theirs.sendall(bytes(packet))
    with pytest.raises(InvalidTag):
        reader.read_message()
    writer_sock.close()
    capture.close()


def test_a_connection_reads_ahead_through_rekeys(sshd: SshServer) -> None:
    with remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config) as conn:
        transport = conn.link.transport
        assert isinstance(transport, ChannelTransport)
        session = transport.channel.get_transport()
        assert session is not None and isinstance(session.packetizer, ReadAhead)
        session.packetizer.REKEY_BYTES = 1 << 20
        kex_init, rekeys = session._send_kex_init, []
        session._send_kex_init = lambda: (rekeys.append(1), kex_init())[-1]  # type: ignore[method-assign]
        data = os.urandom(16 << 20)
        assert conn.check_output(["cat"], input=data) == data
        assert len(rekeys) >= 8


def test_the_inbox_keeps_views_of_packets_and_reads_bytes() -> None:
    """Channel data is kept as views of paramiko's packets (no copy); what a read returns is bytes."""
    inbox = _Inbox()
    packet = b"..abcdef.."
    inbox.feed(memoryview(packet)[2:8])
    inbox.feed(b"XY")
    one = inbox.read(3)
    assert one == b"abc" and type(one) is bytes
    two = inbox.read(100)
    assert two == b"defXY" and type(two) is bytes
    inbox.feed(memoryview(packet)[2:4])
    alone = inbox.read(100)
    assert alone == b"ab" and type(alone) is bytes
