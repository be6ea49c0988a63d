"""The test plugins' service: one declaration that every demo plugin serves, whatever it is written in.

``demo_plugin`` serves it with the Python SDK; ``raw_msgpack_plugin`` serves it
from docs/protocol.md alone. The tests call both through the same proxy, so
the two must answer alike.
"""

from __future__ import annotations

from typing import Tuple

from remowt.protocol.service import Service, rpc

#: Byte ``k`` of what :meth:`DemoApi.send_bytes` sends: its 64 KiB block's number, modulo 256.
BLOCK = 65536


def expected_bytes(size: int) -> bytes:
    """What ``send_bytes(sid, size)`` sends, for checking a small one whole."""
    return b"".join(bytes([(k // BLOCK) % 256]) * min(BLOCK, size - k) for k in range(0, size, BLOCK))


class DemoApi(Service, namespace=100):
    """Served by every demo plugin."""

    @rpc(1)
    def noop(self) -> None:
        """Nothing: the benchmark's call."""
        raise NotImplementedError

    @rpc(2)
    def echo(self, data: bytes) -> bytes:
        """``data`` back."""
        raise NotImplementedError

    @rpc(3)
    def whoami(self) -> Tuple[int, int]:
        """The plugin's ``(os.getuid(), os.getpid())``."""
        raise NotImplementedError

    @rpc(4)
    def send_bytes(self, sid: int, size: int) -> None:
        """Write ``size`` bytes on stream ``sid`` (opened by the caller), then end it; return once all are sent.

        Byte ``k`` is ``(k // 65536) % 256``.
        """
        raise NotImplementedError

    @rpc(5)
    def ask_caller(self, text: str) -> str:
        """Call the caller's :meth:`DemoCallerApi.shout` with ``text``; return ``"plugin heard " + answer``."""
        raise NotImplementedError

    @rpc(6)
    def crash(self, status: int) -> None:
        """Exit the plugin process at once with ``status``; never answers."""
        raise NotImplementedError


class DemoCallerApi(Service, namespace=101):
    """Served by the test on the user's router, for :meth:`DemoApi.ask_caller`."""

    @rpc(1)
    def shout(self, text: str) -> str:
        """``text`` upper-cased."""
        raise NotImplementedError
