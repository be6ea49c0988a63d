"""The control service: health and identity of a node."""

from __future__ import annotations

import os
import sys

import msgspec

from ..service import Service, rpc


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


class Control(ControlApi):
    """The implementation every router registers."""

    def __init__(self, address: str) -> None:
        self.address = address

    def ping(self) -> None:
        return None

    def info(self) -> NodeInfo:
        version = ".".join(str(part) for part in sys.version_info[:3])
        return NodeInfo(self.address, os.getpid(), version, os.uname().machine, os.getuid())
