"""Wiping passwords in place: the buffers remowt reads and decodes them into, never what the interpreter shares."""

from __future__ import annotations

import msgspec
import pytest

from remowt.runtime.secret import wipe


@pytest.mark.timeout(10)
def test_wipe_zeroes_writable_and_read_only_buffers_in_place() -> None:
    read = b"".join([b"frame:", b"hunter2", b":end"])  # a fresh bytes object, as a read from a pipe gives
    wipe(memoryview(read)[6:13])
    assert read == b"frame:" + bytes(7) + b":end"
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode([b"hunter2"]), type=msgspec.Raw)
    wipe(raw)
    assert bytes(raw) == bytes(len(raw))
    held = bytearray(b"hunter2")
    wipe(held)
    assert held == bytes(7)


@pytest.mark.timeout(10)
def test_wipe_leaves_the_interpreters_shared_bytes_alone() -> None:
    wipe(b"\xc0")  # one byte: the interpreter's own object, shared by every b"\xc0"
    wipe(b"")
    assert bytes([0xC0]) == b"\xc0" and bytes(0) == b""
