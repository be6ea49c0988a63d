"""The plugin host: programs beside the agent that speak the framed protocol on their stdio, as ``plugin(n)``.

A plugin is a child process whose stdin and stdout are a link of this
agent's router, like the privileged agent's: the link handshake (a
``Hello`` each way, then ``Routes``) makes its address known here, and the
route announcements carry it to the user, who reaches it through this
agent. Nothing is configured: the route is learned, and when the plugin
ends (unloaded, crashed or exited) its link closes, the route is withdrawn,
and every call and stream of it fails with ``ConnectionLost``.

The launch contract (docs/protocol.md relies on it): stdin/stdout are the
link, stderr is the plugin's log (sent line by line to whoever loaded it,
:class:`PluginEventsApi`), ``REMOWT_PLUGIN_ADDRESS`` is its address and
``PYTHONPATH`` starts with the agent's own code (remowt and msgspec). Nothing
else is written on stdio before the handshake.

By name, a plugin is one the client shipped with the agent
(:data:`~remowt.deploy.local.PLUGINS` of its tree, covered by the tree digest,
or the directory a local agent was given): a package (``name/``) or a module
(``name.py``) runs as ``__main__`` with the agent's Python, the agent's code and
the plugins directory importable; any other file is executed as it is. By
path, the file is executed as it is (a ``.py`` file too: by its ``#!`` line).
The user picks the number (one counter per connection, so the agent's and
the privileged agent's plugins never share an address).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Deque, Dict, List, Optional, Tuple

import msgspec

from ..deploy.local import PLUGIN_NAME, PYTHON_PLUGIN_NAME, agent_pythonpath, plugin_command
from ..errors import BadArguments, ConnectionLost, PluginError, ProtocolError, Unreachable
from ..protocol import wire
from ..protocol.service import Service, rpc
from ..rpc.link import Link
from ..rpc.router import Pending, Router
from ..transports.stdio import ChildTransport, spawn_framed_child
from .watchdog import Watchdog

log = logging.getLogger("remowt.plugins")
ADDRESS_ENV = "REMOWT_PLUGIN_ADDRESS"
#: How long a plugin may take from its start to its handshake.
HANDSHAKE_TIMEOUT = 30.0
#: How long an unloaded plugin may take to exit once its stdin ended, before it is killed.
EXIT_TIMEOUT = 2.0
#: A stderr line longer than this is cut (a plugin writing binary garbage must not flood the log).
MAX_LINE = 4096
#: How many stderr lines may wait for the owner's answer; then the plugin's stderr waits.
STDERR_WINDOW = 64
#: How long an unanswered stderr line holds the next ones (an owner that stopped answering).
STDERR_TIMEOUT = 30.0


class PluginInfo(msgspec.Struct, frozen=True):
    """A loaded plugin: its number (address ``plugin(number)``), what was loaded (name or path) and its pid."""

    number: int
    address: str
    name: str
    pid: int


class PluginsApi(Service, namespace=50):
    """Served by the agent and the privileged agent."""

    @rpc(1)
    def load(self, number: int, name: str) -> PluginInfo:
        """Start the plugin ``name`` shipped with the agent as ``plugin(number)``; return once it shook hands."""
        raise NotImplementedError

    @rpc(2)
    def load_path(self, number: int, path: bytes) -> PluginInfo:
        """Start the executable ``path`` (file-system bytes) as ``plugin(number)``, as :meth:`load` does."""
        raise NotImplementedError

    @rpc(3)
    def unload(self, number: int) -> None:
        """End ``plugin(number)``: close its stdio, wait for its exit (killing it after a while); its route is gone."""
        raise NotImplementedError

    @rpc(4)
    def loaded(self) -> List[PluginInfo]:
        """The plugins running here."""
        raise NotImplementedError

    @rpc(5)
    def available(self) -> List[str]:
        """The names of the plugins shipped with the agent."""
        raise NotImplementedError


class PluginEventsApi(Service, namespace=51):
    """Served by whoever loads plugins."""

    @rpc(1, inline=True)
    def stderr(self, address: str, name: str, line: str) -> None:
        """A line the plugin ``name`` at ``address`` wrote to its stderr (a call: the host waits for room)."""
        raise NotImplementedError


_STDERR = PluginEventsApi.methods["stderr"]


class _StderrSender:
    """Sends a plugin's stderr lines to whoever loaded it, at most :data:`STDERR_WINDOW` unanswered.

    Runs on the transport's stderr thread: a plugin that writes faster than
    the owner logs waits on its full stderr pipe, as a program does on a
    slow terminal, and the agent holds a bounded amount for it.
    """

    def __init__(self, router: Router, owner: str, address: str, name: str) -> None:
        self._router = router
        self._owner = owner
        self._address = address
        self._name = name
        self._unanswered: Deque[Pending] = collections.deque()

    def __call__(self, line: str) -> None:
        while len(self._unanswered) >= STDERR_WINDOW:
            oldest = self._unanswered.popleft()
            if not oldest.wait(STDERR_TIMEOUT):
                oldest.abandon()
        args = _STDERR.encode_args((self._address, self._name, line[:MAX_LINE]), {})
        try:
            self._unanswered.append(self._router.call(self._owner, PluginEventsApi.namespace, _STDERR.number, args))
        except (ConnectionLost, Unreachable):
            log.info("%s (%s): %s", self._address, self._name, line)


class _Plugin:
    def __init__(self, info: PluginInfo, link: Link, transport: ChildTransport) -> None:
        self.info = info
        self.link = link
        self.transport = transport


def _ending(status: Optional[int]) -> str:
    """How a plugin process ended, by its return code ("" while it runs)."""
    if status is None:
        return ""
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


def plugin_address(number: int) -> str:
    """``plugin(number)``; ``BadArguments`` for a number no address can hold."""
    try:
        return wire.plugin(number)
    except ValueError as e:
        raise BadArguments(f"{number} is not a plugin number: {e}") from None


def shipped(plugins: Optional[str]) -> Dict[str, Tuple[str, bool]]:
    """The plugins in directory ``plugins``: name → (path, whether it is Python: a package or a module)."""
    found: Dict[str, Tuple[str, bool]] = {}
    if plugins is None:
        return found
    try:
        entries = list(os.scandir(plugins))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name == "__pycache__" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            found[entry.name] = (entry.path, True)
        elif entry.name.endswith(".py"):
            found[entry.name[:-3]] = (entry.path, True)
        else:
            found[entry.name] = (entry.path, False)
    return found


class PluginHost(PluginsApi):
    """The agent's implementation. ``plugins``: the directory of the plugins shipped with the agent (None: none).

    ``watchdog`` kills the plugins' process groups should the agent die
    without closing their links.
    """

    def __init__(self, router: Router, plugins: Optional[str], watchdog: Optional[Watchdog] = None) -> None:
        self._router = router
        self._plugins = plugins
        self._watchdog = watchdog
        self._lock = threading.Lock()
        self._loaded: Dict[int, _Plugin] = {}
        self._starting: Dict[int, str] = {}
        self._closed = False
        router.on_link_closed(self._link_closed)

    def available(self) -> List[str]:
        return sorted(shipped(self._plugins))

    def load(self, number: int, name: str) -> PluginInfo:
        if PLUGIN_NAME.fullmatch(name) is None:
            raise BadArguments(f"{name!r} is not a plugin name (a file name of letters, digits and _ . + -)")
        catalog = shipped(self._plugins)
        if name not in catalog:
            have = ", ".join(sorted(catalog)) or "none"
            raise PluginError(f"no plugin named {name!r} was shipped with {self._router.address} (shipped: {have})")
        path, python = catalog[name]
        if python:
            if PYTHON_PLUGIN_NAME.fullmatch(name) is None:
                raise PluginError(f"the Python plugin {name!r} cannot be imported: its name is not an identifier")
            assert self._plugins is not None
            argv = plugin_command(name, self._plugins)
        else:
            argv = [path]
        return self._start(number, name, argv)

    def load_path(self, number: int, path: bytes) -> PluginInfo:
        if not path or b"\0" in path:
            raise BadArguments(f"{path!r} is not a path")
        text = os.fsdecode(path)
        if not os.path.isabs(text):
            raise BadArguments(f"a plugin's path must be absolute, got {text!r}")
        return self._start(number, text, [text])

    def _start(self, number: int, name: str, argv: List[str]) -> PluginInfo:
        address = plugin_address(number)
        owner = self._router.caller()
        with self._lock:
            if self._closed:
                raise ConnectionLost(f"{self._router.address} is shutting down")
            if number in self._loaded or number in self._starting or address in self._router.reachable():
                raise PluginError(f"{address} is already taken")
            self._starting[number] = name
        try:
            return self._spawn(number, address, name, argv, owner)
        finally:
            with self._lock:
                del self._starting[number]

    def _spawn(self, number: int, address: str, name: str, argv: List[str], owner: str) -> PluginInfo:
        env = dict(os.environ)
        env[ADDRESS_ENV] = address
        env["PYTHONPATH"] = os.pathsep.join([*agent_pythonpath(), *filter(None, [env.get("PYTHONPATH")])])
        stderr = _StderrSender(self._router, owner, address, name)
        transport = spawn_framed_child(argv, env=env, exit_timeout=EXIT_TIMEOUT, on_stderr=stderr)
        pid = transport.process.pid
        if self._watchdog is not None:
            self._watchdog.watch(pid)  # its own session: the group is the plugin's pid
        try:
            link = self._router.add_link(transport, timeout=HANDSHAKE_TIMEOUT, name=address, leaf=True)
        except (ConnectionLost, ProtocolError) as e:
            transport.close()
            self._forget(pid)
            if isinstance(e, ProtocolError):
                how = f"broke the protocol ({e})"
            else:
                how = _ending(transport.process.returncode) or f"failed ({e})"
            tail = transport.stderr_tail().strip()
            raise PluginError(
                f"plugin {name} {how} before its handshake" + (f"; its stderr:\n{tail}" if tail else "")
            ) from None
        except BaseException:  # the agent is closing, an interrupt: no plugin is left behind
            transport.close()
            self._forget(pid)
            raise
        if link.peer != address:
            link.close()
            link.join(EXIT_TIMEOUT)
            self._forget(pid)
            raise PluginError(
                f"plugin {name} said it is {link.peer}, not {address} (it must take the address in ${ADDRESS_ENV})"
            )
        info = PluginInfo(number, address, name, pid)
        with self._lock:
            self._loaded[number] = _Plugin(info, link, transport)
        if link.closed:  # it ended before it was in the table: the hook found nothing to remove
            self._link_closed(link, None)
        log.info("loaded %s as %s (pid %d)", name, address, pid)
        return info

    def unload(self, number: int) -> None:
        with self._lock:
            plugin = self._loaded.pop(number, None)
        if plugin is None:
            raise PluginError(f"plugin({number}) is not loaded on {self._router.address}")
        plugin.link.close()
        plugin.link.join(EXIT_TIMEOUT + 1.0)  # the route is withdrawn before unload answers
        self._forget(plugin.info.pid)

    def loaded(self) -> List[PluginInfo]:
        with self._lock:
            return [plugin.info for _, plugin in sorted(self._loaded.items())]

    def _link_closed(self, link: Link, reason: Optional[BaseException]) -> None:
        with self._lock:
            gone = [number for number, plugin in self._loaded.items() if plugin.link is link]
            plugins = [self._loaded.pop(number) for number in gone]
        for plugin in plugins:
            log.info("%s (%s) %s", plugin.info.address, plugin.info.name, _ending(plugin.transport.process.poll()))
            self._forget(plugin.info.pid)

    def _forget(self, pid: int) -> None:
        if self._watchdog is not None:
            self._watchdog.forget(pid)

    def close(self, timeout: float) -> None:
        """End every plugin (the agent shuts down): close their stdio, wait for them (killing the slow ones)."""
        with self._lock:
            self._closed = True
            plugins = list(self._loaded.values())
            self._loaded.clear()
        for plugin in plugins:
            plugin.link.close()
        for plugin in plugins:
            plugin.link.join(timeout)
            self._forget(plugin.info.pid)
