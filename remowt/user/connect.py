"""Ways to reach an agent: :func:`connect` (ssh), :func:`connect_local`, :func:`loopback`, and the seam under them.

A new way in is a few lines on :func:`connect_command` (a command whose
stdio reaches the target: docker exec, kubectl exec, the system ssh client)
or :func:`connect_transport` (any :class:`~remowt.transports.base.Transport`
to a started agent).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Callable, List, Optional, Sequence, Union

from ..agent.main import Agent
from ..deploy import local
from ..deploy.bundle import AgentBundle
from ..deploy.plugins import Source as PluginSource
from ..deploy.plugins import stage, unstage
from ..deploy.remote import remote_start_command, start_agent
from ..endpoints.control import Control, ControlApi
from ..endpoints.escalate import check_tool
from ..endpoints.prompt import Prompter, check_prompter, has_terminal, terminal_prompter
from ..endpoints.subprocess import ProcessEventsApi
from ..errors import ConnectionLost, RemowtError, Unreachable
from ..protocol import wire
from ..rpc import keepalive as _keepalive
from ..rpc.link import Link
from ..rpc.router import HANDSHAKE_TIMEOUT, Router
from ..runtime.deadline import CALL_TIMEOUT, Deadline
from ..runtime.interrupts import start
from ..transports import fdpass
from ..transports import loopback as loopback_transport
from ..transports.base import Transport
from ..transports.stdio import spawn_framed_child
from .connection import Remowt
from .editing import LocalEditor
from .plugins import PluginEvents
from .privileged import serve_user_side

_KEEPALIVE = ControlApi.methods["keepalive"]
DEFAULT_CONNECT_TIMEOUT = 30.0


class _ProcessEvents(ProcessEventsApi):
    def __init__(self, connection: Remowt) -> None:
        self._connection = connection

    def exited(self, handle: int, returncode: int) -> None:
        self._connection.children.exited(self._connection.router.caller(), handle, returncode)

    def output(self, handle: int, name: str, sid: int) -> None:
        router = self._connection.router
        stream = router.accept_stream(router.caller(), sid)
        stream.receive_only()
        process = self._connection.children.get(handle)
        if process is None or not process.output_opened(name, stream):
            stream.close()


def _user_router() -> Router:
    router = Router(wire.USER)
    router.register(Control(wire.USER))
    return router


def connect_transport(
    transport: Transport,
    *,
    description: Optional[str] = None,
    on_close: Sequence[Callable[[], None]] = (),
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    call_timeout: Optional[float] = CALL_TIMEOUT,
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    deadline: Optional[Deadline] = None,
) -> Remowt:
    """A connection over ``transport``, whose other end is an agent that has started (the seam for new ways in).

    Every connector ends here. ``on_close`` hooks run when the connection
    closes (or when the handshake fails): release what carries the
    transport. ``deadline`` bounds the handshake (default 30 s);
    ``prompter``, ``escalation``, ``call_timeout`` and the agent keepalive
    are as for :func:`connect`.
    """
    check_prompter(prompter)
    check_tool(escalation)
    _keepalive.check(agent_keepalive, agent_keepalive_count)
    router = _user_router()
    try:
        timeout = HANDSHAKE_TIMEOUT if deadline is None else deadline.shorter(HANDSHAKE_TIMEOUT)
        link = router.add_link(transport, name=f"user-{transport.name}", timeout=timeout)
    except ConnectionLost as e:
        router.close()
        for hook in on_close:
            hook()
        tail = transport.stderr_tail().strip()
        raise ConnectionLost(f"{e}; the agent's stderr:\n{tail}" if tail else str(e)) from None
    except BaseException:
        router.close()
        for hook in on_close:
            hook()
        raise
    hooks = list(on_close)
    if agent_keepalive > 0:
        sender = _start_keepalives(router, link, agent_keepalive, agent_keepalive_count)
        hooks.insert(0, sender.stop)
    connection = Remowt(
        router,
        link,
        description=description or transport.name,
        on_close=hooks,
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
    )
    router.register(_ProcessEvents(connection))
    router.register(LocalEditor())
    router.register(PluginEvents())
    serve_user_side(router, connection)
    return connection


def connect_command(
    argv: Sequence[str],
    *,
    deploy: bool = True,
    bundle: Optional[AgentBundle] = None,
    python: str = "python3",
    description: Optional[str] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    call_timeout: Optional[float] = CALL_TIMEOUT,
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    plugins: Sequence[PluginSource] = (),
) -> Remowt:
    """A connection to an agent reached by running ``argv`` here, speaking the protocol on its stdin and stdout.

    With ``deploy`` (the default), ``argv`` is a command that runs a POSIX
    shell line given as its last argument on the target, for example
    ``["docker", "exec", "-i", "web", "sh", "-c"]``, ``["kubectl", "exec",
    "-i", "pod", "--", "sh", "-c"]`` or ``["ssh", "web1"]``: the agent
    ``bundle`` (default :meth:`AgentBundle.default`) is deployed there for
    ``python`` if needed and started, as over ssh. Without ``deploy``,
    ``argv`` itself starts an agent. The command ends with the connection.
    ``description`` names it in messages (with the command's pid).
    ``connect_timeout`` bounds starting and deploying; the rest is as for
    :func:`connect` (``plugins`` only with ``deploy``).
    """
    if plugins and not deploy:
        raise ValueError("plugins are shipped with a deployed agent: give them only with deploy=True")
    return _connect_command(
        [str(arg) for arg in argv],
        deploy=deploy,
        bundle=bundle,
        python=python,
        description=description,
        connect_timeout=connect_timeout,
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
        agent_keepalive=agent_keepalive,
        agent_keepalive_count=agent_keepalive_count,
        plugins=plugins,
    )


def _connect_command(
    args: List[str],
    *,
    deploy: bool = True,
    bundle: Optional[AgentBundle] = None,
    python: str = "python3",
    description: Optional[str] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    call_timeout: Optional[float] = CALL_TIMEOUT,
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    fd_socket: Optional[socket.socket] = None,
    plugins: Sequence[PluginSource] = (),
    on_close: Sequence[Callable[[], None]] = (),
) -> Remowt:
    """:func:`connect_command`; ``fd_socket`` is an end of :func:`fdpass.socket_pair` that ``args`` name.

    The command inherits ``fd_socket`` (and this side closes its copy); the connection keeps the other end.
    ``on_close`` hooks run after the command ended (the connection's close, or a failed start).
    """
    if not args:
        raise ValueError("argv must not be empty")
    check_prompter(prompter)
    check_tool(escalation)
    _keepalive.check(agent_keepalive, agent_keepalive_count)
    name = description or f"the agent through {args[0]}"
    deadline = Deadline(connect_timeout, f"starting {name}")
    agent_bundle = None
    if deploy:
        agent_bundle = _shipping(bundle, plugins)
        args.append(remote_start_command(agent_bundle, python))
    try:
        transport = spawn_framed_child(args, pass_fds=() if fd_socket is None else (fd_socket.fileno(),))
    except BaseException:
        for hook in on_close:
            hook()
        raise
    try:
        if agent_bundle is not None:
            start_agent(transport, agent_bundle, timeout=deadline.left() or 0.0)
    except BaseException as e:
        transport.close()
        for hook in on_close:
            hook()
        if isinstance(e, ConnectionLost):
            raise ConnectionLost(f"{name} failed to start: {e}") from None
        raise
    try:
        return connect_transport(
            transport,
            description=f"{name} pid {transport.process.pid}",
            on_close=[transport.close, *on_close],
            prompter=prompter,
            escalation=escalation,
            call_timeout=call_timeout,
            agent_keepalive=agent_keepalive,
            agent_keepalive_count=agent_keepalive_count,
            deadline=deadline,
        )
    except ConnectionLost as e:  # connect_transport ran the hooks
        raise ConnectionLost(f"{name} failed to start: {e}") from None


def _shipping(bundle: Optional[AgentBundle], plugins: Sequence[PluginSource]) -> AgentBundle:
    """The bundle to deploy: ``bundle`` (default :meth:`AgentBundle.default`) with ``plugins`` added."""
    agent_bundle = bundle if bundle is not None else AgentBundle.default()
    return agent_bundle.with_plugins(plugins) if plugins else agent_bundle


def _stage(plugins: Sequence[PluginSource]) -> Optional[str]:
    """A private copy of ``plugins`` for an agent that runs this process's code (None without plugins)."""
    return stage(plugins) if plugins else None


def _unstaging(staged: Optional[str]) -> List[Callable[[], None]]:
    """The hook that removes a staged copy when its agent ended."""
    return [] if staged is None else [lambda: unstage(staged)]


def _start_keepalives(router: Router, link: Link, interval: float, count: int) -> _keepalive.Sender:
    """Keep the agent told that this side is there (:mod:`remowt.rpc.keepalive`); the first notice goes now."""
    args = _KEEPALIVE.encode_args((interval, count), {})
    sender = _keepalive.Sender(
        link, interval, lambda: router.notify(wire.AGENT, ControlApi.namespace, _KEEPALIVE.number, args)
    )
    with contextlib.suppress(ConnectionLost, Unreachable):  # the agent is gone already: the first call says so
        sender.start()
    return sender


def loopback(
    *,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    call_timeout: Optional[float] = CALL_TIMEOUT,
    plugins: Sequence[PluginSource] = (),
) -> Remowt:
    """A connection to an agent running on threads in this process (tests, teaching).

    ``prompter(prompt) -> password`` answers password prompts (default: ask
    on the terminal); ``escalation`` picks the tool for ``conn.privileged``;
    ``call_timeout`` is :attr:`Remowt.call_timeout`; ``plugins`` as for :func:`connect`.
    """
    check_prompter(prompter)
    check_tool(escalation)
    staged = _stage(plugins)
    user_end, agent_end = loopback_transport.pair()
    agent = Agent(plugins=staged)
    failure: List[BaseException] = []

    def serve() -> None:
        try:
            agent.serve(agent_end)
        except BaseException as e:
            failure.append(e)

    thread = start(threading.Thread(target=serve, name="remowt-loopback-agent", daemon=True))
    connection = connect_transport(
        user_end,
        description="loopback",
        on_close=[agent.shutdown, *_unstaging(staged)],
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
        agent_keepalive=0,
    )
    thread.join()
    if failure:
        connection.close()
        raise RemowtError(f"loopback agent failed to start: {failure[0]}")
    return connection


def connect_local(
    python: Optional[str] = None,
    *,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    call_timeout: Optional[float] = CALL_TIMEOUT,
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    plugins: Sequence[PluginSource] = (),
) -> Remowt:
    """Start an agent as a child process on this machine and connect to it.

    ``prompter``, ``escalation`` and ``call_timeout`` are as for :func:`loopback`; ``agent_keepalive``,
    ``agent_keepalive_count`` and ``plugins`` as for :func:`connect`.
    """
    started_env = dict(os.environb)
    staged = _stage(plugins)
    options = [] if staged is None else [f"--plugins={staged}"]
    try:
        ours, theirs = fdpass.socket_pair()
    except BaseException:
        for hook in _unstaging(staged):
            hook()
        raise
    try:
        with theirs:
            connection = _connect_command(
                local.agent_argv(python, f"--fd-socket={theirs.fileno()}", *options),
                deploy=False,
                description="local agent",
                prompter=prompter,
                escalation=escalation,
                call_timeout=call_timeout,
                agent_keepalive=agent_keepalive,
                agent_keepalive_count=agent_keepalive_count,
                fd_socket=theirs,
                on_close=_unstaging(staged),
            )
    except BaseException:
        ours.close()
        raise
    connection.started_env = started_env
    connection.attach_fd_sender(fdpass.FdSender(ours))
    return connection


def connect(
    host: str,
    *,
    port: Optional[int] = None,
    user: Optional[str] = None,
    key_filename: Union[str, Sequence[str], None] = None,
    password: Optional[str] = None,
    ssh_config: Optional[str] = None,
    known_hosts: Union[str, Sequence[str], None] = None,
    host_key_policy: Optional[str] = None,
    connect_timeout: Optional[float] = None,
    keepalive_interval: Optional[float] = None,
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    bundle: Optional[AgentBundle] = None,
    python: str = "python3",
    call_timeout: Optional[float] = CALL_TIMEOUT,
    plugins: Sequence[PluginSource] = (),
) -> Remowt:
    """Connect over ssh to ``host`` (a name or ``~/.ssh/config`` alias), deploy the agent if needed, start it.

    Explicit arguments win over the ssh config (``ssh_config=`` or
    ``~/.ssh/config``): HostName, Port, User, IdentityFile, ProxyJump,
    ProxyCommand, ConnectTimeout, ServerAliveInterval, UserKnownHostsFile and
    StrictHostKeyChecking are honoured. Host keys are checked against
    known_hosts: ``host_key_policy`` is ``"reject"`` (default),
    ``"accept-new"`` (trust on first use) or ``"insecure-accept-any"``.
    Authentication tries ssh-agent keys, key files (asking ``prompter`` for
    an encrypted key's passphrase) and ``password``. ``prompter`` also
    answers password prompts of privilege escalation, and ``escalation``
    picks its tool, as for :func:`loopback`; without a prompter, the
    terminal is asked when there is one. ``bundle`` is what to deploy
    (default :meth:`AgentBundle.default`), ``python`` the target's interpreter.
    ``plugins`` are plugin sources (a package directory, a ``.py`` module, an
    executable file) shipped with the agent for this connection, loaded by
    name with :meth:`~remowt.user.node.Node.load_plugin`.

    ``connect_timeout`` (else ConnectTimeout, else 15 s) bounds all of it:
    TCP, the ssh handshake, authentication (not the time a prompter takes),
    opening the channel, the exec, deploying and starting the agent; past it
    :class:`~remowt.errors.SshError` (or ``DeployError``, ``ConnectionLost``)
    says which step did not answer. ``call_timeout`` is as for :func:`loopback`.

    ``keepalive_interval`` (or ServerAliveInterval) is ssh's own keepalive,
    which lets this side notice a dead network. ``agent_keepalive`` lets the
    agent notice it: the client sends the agent a keepalive after each such
    interval in which it sent nothing else, and an agent that hears nothing
    for ``agent_keepalive_count`` intervals in a row (default: 3 times 15 s) ends
    itself and its children, as if the connection had closed (0: never).
    """
    from ..transports import ssh as ssh_transport
    from ..transports import sshconfig

    check_prompter(prompter)
    check_tool(escalation)
    _keepalive.check(agent_keepalive, agent_keepalive_count)
    config = sshconfig.load_config(ssh_config)
    target = sshconfig.resolve(
        host,
        config,
        port=port,
        user=user,
        key_filename=key_filename,
        known_hosts=known_hosts,
        host_key_policy=host_key_policy,
        connect_timeout=connect_timeout,
        keepalive_interval=keepalive_interval,
    )
    asker = prompter if prompter is not None else terminal_prompter if has_terminal() else None
    agent_bundle = _shipping(bundle, plugins)  # local work: not the target's time
    deadline = Deadline(target.connect_timeout, f"connecting to {target}")
    session = ssh_transport.open_session(target, config, password=password, prompter=asker, deadline=deadline)
    try:
        command = remote_start_command(agent_bundle, python)
        transport = session.exec(command, description=f"agent on {target.alias}", deadline=deadline)
        start_agent(transport, agent_bundle, timeout=deadline.left() or 0.0)
    except BaseException:
        session.close()
        raise
    return connect_transport(
        transport,
        description=f"ssh {target}",
        on_close=[session.close],
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
        agent_keepalive=agent_keepalive,
        agent_keepalive_count=agent_keepalive_count,
        deadline=deadline,
    )
