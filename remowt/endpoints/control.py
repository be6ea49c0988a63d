"""The control service: health and identity of a node."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

import msgspec

from ..protocol.service import Service, rpc
from ..rpc.keepalive import check

log = logging.getLogger("remowt.control")


class NodeInfo(msgspec.Struct, frozen=True):
    """Who answered: address, process id, Python and platform."""

    address: str
    pid: int
    python: str
    machine: str
    uid: int


class ControlApi(Service, namespace=1):
    """Served by every node."""

    @rpc(1, inline=True)
    def ping(self) -> None:
        """Do nothing and answer at once (latency and health checks)."""
        raise NotImplementedError

    @rpc(2, inline=True)
    def info(self) -> NodeInfo:
        """Describe this node."""
        raise NotImplementedError

    @rpc(3, inline=True, oneway=True)
    def keepalive(self, interval: float, count: int) -> None:
        """The caller is there, and sends something every ``interval`` seconds at least (:mod:`remowt.rpc.keepalive`).

        An agent ends itself once it heard nothing for ``count`` intervals in a row.
        """
        raise NotImplementedError


class Control(ControlApi):
    """The implementation every router registers."""

    def __init__(self, address: str, on_keepalive: Optional[Callable[[float, int], None]] = None) -> None:
        self.address = address
        self._on_keepalive = on_keepalive

    def ping(self) -> None:
        return None

    def info(self) -> NodeInfo:
        version = ".".join(str(part) for part in sys.version_info[:3])
        return NodeInfo(self.address, os.getpid(), version, os.uname().machine, os.getuid())

    def keepalive(self, interval: float, count: int) -> None:
        if self._on_keepalive is None:
            return
        try:
            check(interval, count)
        except ValueError as e:
            log.warning("ignoring a keepalive setting: %s", e)
            return
        if interval > 0:
            self._on_keepalive(interval, count)
