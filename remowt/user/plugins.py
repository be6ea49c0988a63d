"""Plugins on the user's side: loading one on a node, the handle that reaches it, and its stderr in the log.

``node.load_plugin(name)`` asks the node's plugin host
(:class:`~remowt.endpoints.plugins.PluginsApi`) to start a plugin as
``plugin(n)`` and returns a :class:`Plugin`: typed proxies of what it serves
(:meth:`Plugin.service`), ``ping``/``info``, and :meth:`Plugin.unload` (also
at the end of a ``with`` block). The number is this process's to choose, one
counter for every connection and node, so two hosts never give the same
address. The route to it is learned from the node's announcement before the
load answers; a plugin that ends takes its route with it, and its calls and
streams fail with ``ConnectionLost``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from types import TracebackType
from typing import TYPE_CHECKING, List, Optional, Type, TypeVar, Union

import msgspec

from ..endpoints.control import ControlApi, NodeInfo
from ..endpoints.plugins import HANDSHAKE_TIMEOUT, PluginEventsApi, PluginInfo, PluginsApi
from ..errors import ConnectionLost, PluginError, RemoteError, Unreachable
from ..protocol.service import MethodSpec, Result, Service, proxy
from ..protocol.wire import plugin as plugin_address
from ..rpc.router import Pending

if TYPE_CHECKING:
    from .node import Node

S = TypeVar("S", bound=Service)
#: How long a load may take by default: the host's own limit on the plugin's start, and some.
LOAD_TIMEOUT = HANDSHAKE_TIMEOUT + 10.0
_LOAD = PluginsApi.methods["load"]
_LOAD_PATH = PluginsApi.methods["load_path"]
_UNLOAD = PluginsApi.methods["unload"]
_numbers = itertools.count(1)
_numbers_lock = threading.Lock()


def _next_number(node: Node) -> int:
    """A plugin number no plugin this process can reach has (numbers go round after 65535)."""
    reachable = node.router.reachable()
    with _numbers_lock:
        while True:
            number = next(_numbers) % 65536
            if plugin_address(number) not in reachable:
                return number


def logger_name(name: str) -> str:
    """The logger a plugin's stderr goes to: ``remowt.plugin.<name>`` (for a path, its file name without ``.py``)."""
    base = os.path.basename(name)
    base = base[:-3] if base.endswith(".py") else base
    return "remowt.plugin." + (base.replace(".", "_") or "unnamed")


class PluginEvents(PluginEventsApi):
    """The user's side of :class:`PluginEventsApi`: a plugin's stderr, a line at a time, as warnings in the log."""

    def stderr(self, address: str, name: str, line: str) -> None:
        logging.getLogger(logger_name(name)).warning("[%s] %s", address, line)


class Plugin:
    """A loaded plugin: its :attr:`address`, proxies of its services, and :meth:`unload` (a context manager)."""

    def __init__(self, host: Node, info: PluginInfo) -> None:
        self.host = host
        self.number = info.number
        self.address = info.address
        self.name = info.name
        self.pid = info.pid
        self._control = proxy(ControlApi, host.router, self.address, host.call_timeout)

    def __repr__(self) -> str:
        return f"<Plugin {self.name} {self.address} pid {self.pid} on {self.host.description}>"

    def service(self, declaration: Type[S], timeout: Optional[float] = None) -> S:
        """A typed proxy of ``declaration`` served by this plugin (``timeout`` per call; None: the node's)."""
        timeout = self.host.call_timeout if timeout is None else timeout
        return proxy(declaration, self.host.router, self.address, timeout)

    def ping(self) -> None:
        """A round trip to the plugin."""
        self._control.ping()

    def info(self) -> NodeInfo:
        """The plugin's address, pid, Python, machine and uid (its :class:`~remowt.endpoints.control.Control`'s)."""
        return self._control.info()

    @property
    def loaded(self) -> bool:
        """Whether the plugin runs: its address is reachable."""
        return self.address in self.host.router.reachable()

    def unload(self, timeout: Optional[float] = None) -> None:
        """End the plugin; once this returns its address is unreachable. ``PluginError`` if it is not loaded."""
        proxy(PluginsApi, self.host.router, self.host.address, LOAD_TIMEOUT if timeout is None else timeout).unload(
            self.number
        )

    def __enter__(self) -> Plugin:
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], value: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        with contextlib.suppress(PluginError, ConnectionLost):  # it ended already, or its host did
            self.unload()


def _host(node: Node, timeout: Optional[float]) -> PluginsApi:
    return proxy(PluginsApi, node.router, node.address, LOAD_TIMEOUT if timeout is None else timeout)


def load(node: Node, name: str, timeout: Optional[float] = None) -> Plugin:
    """Start the plugin ``name`` that was shipped with ``node``'s agent; see :meth:`Node.load_plugin`."""
    return _load(node, _LOAD, name, timeout)


def load_path(node: Node, path: Union[str, bytes, os.PathLike[str]], timeout: Optional[float] = None) -> Plugin:
    """Start the executable ``path`` on ``node``'s machine as a plugin; see :meth:`Node.load_plugin_path`."""
    return _load(node, _LOAD_PATH, os.fsencode(path), timeout)


def _load(node: Node, method: MethodSpec, what: Union[str, bytes], timeout: Optional[float]) -> Plugin:
    """Ask for a load and wait for it; a caller that stops waiting (a timeout, Ctrl-C) leaves no plugin running.

    The answer also goes to a :class:`_GiveUp` registered before the wait
    (``Pending.abandon(late)`` keeps the call known until it answers), which
    unloads the plugin if its caller gave up: after an interrupt the
    ``Pending`` itself cannot tell whether its answer was taken.
    """
    number = _next_number(node)
    timeout = LOAD_TIMEOUT if timeout is None else timeout
    args = method.encode_args((number, what), {})
    outcome = _GiveUp(node, number)
    try:
        pending = node.router.call(node.address, PluginsApi.namespace, method.number, args)
        if not pending.abandon(outcome):  # the answer is here already: nothing was registered
            _take(pending, outcome)
        answered = pending.wait(timeout)
    except BaseException:
        outcome.give_up()
        raise
    if not answered:
        outcome.give_up()
        raise TimeoutError(f"{node.address} did not load plugin {os.fsdecode(what)!r} within {timeout:g} s")
    try:
        info = method.decode_result(pending.result())
    except msgspec.ValidationError as e:
        raise RemoteError(f"{method.name} returned a malformed result: {e}") from None
    return Plugin(node, info)


def _take(pending: Pending, outcome: _GiveUp) -> None:
    """Give ``outcome`` the answer that ``pending`` has."""
    try:
        result = pending.result()
    except Exception as e:
        outcome(None, e)
    else:
        outcome(result, None)


class _GiveUp:
    """The late side of a load: whichever of its answer and its caller giving up comes second unloads the plugin."""

    def __init__(self, node: Node, number: int) -> None:
        self._node = node
        self._number = number
        self._lock = threading.Lock()
        self._loaded: Optional[bool] = None  # None until the answer came
        self._given_up = False

    def __call__(self, result: Optional[Result], error: Optional[BaseException]) -> None:
        """The answer (on the reader thread: must not wait)."""
        with self._lock:
            self._loaded = error is None
            unload = self._given_up and self._loaded
        if unload:
            self._unload()

    def give_up(self) -> None:
        """The caller stopped waiting."""
        with self._lock:
            self._given_up = True
            unload = bool(self._loaded)
        if unload:
            self._unload()

    def _unload(self) -> None:
        """Unload without waiting for the answer (the caller is gone, or this is the reader thread)."""
        if self._node.closed:
            return
        with contextlib.suppress(ConnectionLost, Unreachable):
            args = _UNLOAD.encode_args((self._number,), {})
            self._node.router.call(self._node.address, PluginsApi.namespace, _UNLOAD.number, args).abandon()


def loaded(node: Node) -> List[PluginInfo]:
    """The plugins ``node`` runs."""
    return _host(node, node.call_timeout).loaded()


def available(node: Node) -> List[str]:
    """The names of the plugins shipped with ``node``'s agent."""
    return _host(node, node.call_timeout).available()
