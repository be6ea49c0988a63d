"""Agent entry point: ``real-agent [--local] [--privileged] [--tree=DIGEST]``, and ``askpass [PROMPT]``.

The agent speaks the framed protocol on its stdin/stdout, serves its
endpoints, and when its link to the user side is gone (or silent past the
keepalive the user set, :mod:`remowt.rpc.keepalive`) it kills the children it
started and exits. A watchdog process (:mod:`remowt.endpoints.watchdog`) kills
them if the agent is killed before it can. In ``askpass`` mode it is sudo's
password helper for the agent that started sudo (:mod:`remowt.endpoints.askpass`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, List, Optional

from ..deploy.local import default_plugins_dir
from ..endpoints.control import Control
from ..endpoints.parent_signals import stand_in_for_the_caller
from ..endpoints.subprocess import Subprocesses
from ..endpoints.watchdog import Watchdog, start_watchdog
from ..protocol import wire
from ..rpc.keepalive import SilenceWatch
from ..rpc.router import Router
from ..transports.base import Transport
from ..transports.stdio import take_stdio

if TYPE_CHECKING:
    from ..endpoints.escalate import Escalator
    from ..endpoints.fs import Files
    from ..endpoints.plugins import PluginHost
    from ..endpoints.sockets import Sockets
    from ..endpoints.systemd import Systemd
    from ..transports.fdpass import FdReceiver

log = logging.getLogger("remowt.agent")

# The namespaces of the services made at their first call (tests/test_services.py checks them against the
# declarations, which live in the modules that are not imported until then).
ESCALATE, FILE_EDITS, FILES, SOCKETS, PLUGINS, SYSTEMD = 20, 21, 30, 40, 50, 60


class Agent:
    """The agent's router and endpoints, over any transport (the loopback uses this in-process).

    ``watchdog`` (the agent process has one; the loopback, in the user's process, none) is told
    which children to kill should this process die before :meth:`shutdown`. ``fds`` (a local
    agent's fd socket) brings the fds the user hands its children. ``plugins`` is the directory
    of the plugins shipped with it (:mod:`remowt.endpoints.plugins`; None: none), which a
    privileged agent started here gets too unless it runs from a verified ``tree`` (whose own
    plugins it then has).
    """

    def __init__(
        self,
        address: str = wire.AGENT,
        watchdog: Optional[Watchdog] = None,
        tree: Optional[str] = None,
        fds: Optional[FdReceiver] = None,
        plugins: Optional[str] = None,
    ) -> None:
        self.router = Router(address)
        self.silence = SilenceWatch()
        self.router.register(Control(address, on_keepalive=self.silence.arm))
        self.watchdog = watchdog
        self.subprocesses = Subprocesses(self.router, watchdog, fds)
        self.router.register(self.subprocesses)
        # The services few connections use are made, and their modules imported, at their first call: every
        # connect waits for the agent's start-up, which imports ~12 ms less so.
        self._plugins_dir = plugins
        self.files: Optional[Files] = None
        self.sockets: Optional[Sockets] = None
        self.plugins: Optional[PluginHost] = None
        self.systemd: Optional[Systemd] = None
        self.router.register_lazy(FILE_EDITS, self._make_file_edits)
        self.router.register_lazy(FILES, self._make_files)
        self.router.register_lazy(SOCKETS, self._make_sockets)
        self.router.register_lazy(PLUGINS, self._make_plugins)
        self.router.register_lazy(SYSTEMD, self._make_systemd)
        self.escalator: Optional[Escalator] = None
        self._tree = tree
        if address == wire.AGENT:
            self.router.register_lazy(ESCALATE, self._make_escalator)
        self.upstream_lost = threading.Event()
        self._finished = threading.Event()

    def _make_escalator(self) -> object:
        from ..endpoints.escalate import Escalator

        plugins = self._plugins_dir
        options = [f"--plugins={plugins}"] if plugins is not None and self._tree is None else []
        self.escalator = Escalator(self.router, self._tree, options)
        return self.escalator

    @staticmethod
    def _make_file_edits() -> object:
        from ..endpoints.editor import FileEdits

        return FileEdits()

    def _make_files(self) -> object:
        from ..endpoints.fs import Files

        self.files = Files(self.router)
        return self.files

    def _make_sockets(self) -> object:
        from ..endpoints.sockets import Sockets

        self.sockets = Sockets(self.router)
        return self.sockets

    def _make_plugins(self) -> object:
        from ..endpoints.plugins import PluginHost

        self.plugins = PluginHost(self.router, self._plugins_dir, self.watchdog)
        return self.plugins

    def _make_systemd(self) -> object:
        from ..endpoints.systemd import Systemd

        self.systemd = Systemd(self.watchdog)
        return self.systemd

    def serve(self, transport: Transport) -> None:
        """Handshake with the user side over ``transport``; return once the link is up."""
        upstream = self.router.add_link(transport, name=f"{self.router.address}-upstream")
        self.silence.watch(upstream)

        def closed(link: object, reason: Optional[BaseException]) -> None:
            if link is upstream:
                self.upstream_lost.set()

        self.router.on_link_closed(closed)
        if upstream.closed:
            self.upstream_lost.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill the children, close the router, and join every thread."""
        if self._finished.is_set():
            return
        self._finished.set()
        self.router.stop_loading()  # no lazy service is made from here on, so each made is closed below
        self.silence.stop()
        if self.escalator is not None:
            self.escalator.close()
        if self.systemd is not None:
            self.systemd.close()
        self.subprocesses.kill_all(timeout)
        if self.sockets is not None:
            self.sockets.close_listeners(timeout)
        if self.plugins is not None:
            self.plugins.close(timeout)
        self.router.close(timeout)
        self.subprocesses.join(timeout)
        if self.files is not None:
            self.files.join(timeout)
        if self.sockets is not None:
            self.sockets.join(timeout)
        if self.watchdog is not None:
            self.watchdog.close(timeout)


def _inherited_socket(fd: int) -> int:
    """The fd socket the user passed, made close-on-exec (children get only the fds they are given)."""
    os.set_inheritable(fd, False)
    return fd


USAGE = """usage: remowt-agent real-agent [--local] [--privileged] [--tree=DIGEST] [--fd-socket=FD] [--plugins=DIR]
       remowt-agent askpass [PROMPT]
       remowt-agent editor FILE...
real-agent serves the remowt protocol on stdin/stdout (--local: the user side is on this machine;
--privileged: take the address agent-privileged; --tree: the digest of the deployed tree it runs from,
which the privileged agent's copy must have; --fd-socket: the unix socket on which the user sends the fds
its children get as stdio; --plugins: the directory of the plugins loaded by name, by default remowt-plugins
beside the agent's code); askpass is sudo's password helper (sudo -A); editor is the
EDITOR of children on a terminal (the caller edits the file)."""


def main(argv: Optional[List[str]] = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["askpass"]:  # the prompt is sudo's text: no option parsing
        from ..endpoints.askpass import main as askpass

        sys.exit(askpass(args_list[1] if len(args_list) > 1 else "Password: "))
    if args_list[:1] == ["editor"]:  # EDITOR of a child on a terminal: the caller edits
        from ..endpoints.editor import main as editor

        sys.exit(editor(args_list[1:]))
    if args_list[:1] in (["--help"], ["-h"]):
        print(USAGE)
        return
    trees = [option[len("--tree=") :] for option in args_list[1:] if option.startswith("--tree=")]
    sockets = [option[len("--fd-socket=") :] for option in args_list[1:] if option.startswith("--fd-socket=")]
    plugins = [option[len("--plugins=") :] for option in args_list[1:] if option.startswith("--plugins=")]
    options = [option for option in args_list[1:] if not option.startswith(("--tree=", "--fd-socket=", "--plugins="))]
    if (
        args_list[:1] != ["real-agent"]
        or not set(options) <= {"--local", "--privileged"}
        or len(trees) > 1
        or len(sockets) > 1
        or len(plugins) > 1
        or not all(fd.isdigit() for fd in sockets)
    ):
        # argparse would cost the agent's start-up more than this whole function
        sys.exit(f"{USAGE}\nremowt-agent: bad arguments {args_list!r}")
    privileged = "--privileged" in options
    logging.basicConfig(
        level=os.environ.get("REMOWT_AGENT_LOG", "WARNING").upper(),
        format=f"remowt-agent[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    if privileged:
        # doas and run0 leave the unprivileged agent's pty as our controlling terminal: when that
        # agent dies, its hangup must not kill us before we kill our children at end of input.
        # (A handler, not SIG_IGN, so the children get the default back at exec.)
        signal.signal(signal.SIGHUP, lambda signum, frame: None)
    fds = None
    if sockets:  # only a local agent has the fd socket (and needs the socket module)
        from ..transports.fdpass import FdReceiver

        fds = FdReceiver(_inherited_socket(int(sockets[0])))
    stand_in_for_the_caller(None if fds is None else fds.peer_pid())  # a child's signals to its parent
    watchdog = start_watchdog()
    address = wire.AGENT_PRIVILEGED if privileged else wire.AGENT
    agent = Agent(address, watchdog, trees[0] if trees else None, fds, plugins[0] if plugins else default_plugins_dir())
    try:
        agent.serve(take_stdio())
        agent.upstream_lost.wait()
    finally:
        agent.shutdown()
