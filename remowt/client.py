"""The connection: ``remowt.loopback()``, ``remowt.connect_local()`` and what they return."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import msgspec

from . import popen as _popen
from . import wire
from .agent.main import Agent
from .command import Command
from .endpoints.control import Control, ControlApi, NodeInfo
from .endpoints.escalate import check_tool
from .endpoints.subprocess import ProcessEventsApi, SpawnSpec, SubprocessApi
from .errors import ConnectionLost, RemoteError, RemowtError, Unreachable
from .link import Link, held_sends, holding_sends
from .pipes import FdWriter
from .process import OutputHandler, RemoteProcess
from .prompt import Prompter, check_prompter, has_terminal, terminal_prompter
from .router import Router
from .service import proxy
from .streams import Stream
from .transports import local as local_transport
from .transports import loopback as loopback_transport
from .transports.base import Transport

if TYPE_CHECKING:
    from .bundle import AgentBundle
    from .escalation import Privileged

_SPAWN = SubprocessApi.methods["spawn"]
_RELEASE = SubprocessApi.methods["release"]
PIPE = _popen.PIPE
DEVNULL = _popen.DEVNULL
STDOUT = _popen.STDOUT
CLOSED = _popen.CLOSED
STDIO = ("stdin", "stdout", "stderr")


class _ProcessEvents(ProcessEventsApi):
    def __init__(self, connection: Remowt) -> None:
        self._connection = connection

    def exited(self, handle: int, returncode: int) -> None:
        self._connection._process_exited(handle, returncode)

    def output(self, handle: int, name: str, sid: int) -> None:
        self._connection._process_output(handle, name, sid)


class Remowt:
    """A connection to an agent. Use as a context manager, or call :meth:`close`.

    It also has the face of the :mod:`subprocess` module, bound to itself:
    ``conn.Popen``, ``conn.run``, ``conn.check_output`` …, ``conn.PIPE`` and
    the exception classes, so ``subprocess = conn`` works in a script.
    """

    PIPE = _popen.PIPE
    DEVNULL = _popen.DEVNULL
    STDOUT = _popen.STDOUT
    CompletedProcess = _popen.CompletedProcess
    SubprocessError = _popen.SubprocessError
    CalledProcessError = _popen.CalledProcessError
    TimeoutExpired = _popen.TimeoutExpired

    def __init__(
        self,
        router: Router,
        link: Link,
        *,
        description: str,
        on_close: Sequence[Callable[[], None]] = (),
        prompter: Optional[Prompter] = None,
        escalation: Optional[str] = None,
    ) -> None:
        self.router = router
        self.link = link
        self.description = description
        self.agent = wire.AGENT
        self.prompter = prompter
        self.escalation = escalation
        self._privileged: Optional[Privileged] = None
        self._on_close = list(on_close)
        self._handles = itertools.count(1)
        self._lock = threading.Lock()
        self._processes: Dict[int, RemoteProcess] = {}
        self._closed = False
        self._popen_class: Optional[Type[_popen.Popen]] = None
        self._fd_writers: Dict[int, FdWriter] = {}
        self._releases: List[Tuple[str, int]] = []  # exited children (agent, handle) the agents may forget
        self._control = proxy(ControlApi, router, self.agent)
        self._subprocess = proxy(SubprocessApi, router, self.agent)
        router.on_link_closed(self._link_closed)

    def __repr__(self) -> str:
        return f"<Remowt {self.description}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Remowt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- health ---------------------------------------------------------

    def ping(self) -> float:
        """One no-op round trip to the agent; returns how long it took, in seconds."""
        start = time.perf_counter()
        self._control.ping()
        return time.perf_counter() - start

    def info(self) -> NodeInfo:
        """Who the agent is: pid, uid, Python version and machine."""
        return self._control.info()

    @property
    def privileged(self) -> Privileged:
        """This connection with its calls going to the privileged agent (started on first use).

        The agent starts itself again through ``self.escalation`` (run0, sudo
        or doas; None: the first one found on the target); password prompts
        go to ``self.prompter`` (None: the terminal). Both may be changed
        before first use. See :class:`remowt.escalation.Privileged`.
        """
        from .escalation import Privileged

        with self._lock:
            if self._privileged is None:
                self._privileged = Privileged(self)
            return self._privileged

    # --- the subprocess face ---------------------------------------------

    @property
    def Popen(self) -> Type[_popen.Popen]:
        """:class:`remowt.Popen` bound to this connection (a subclass, so isinstance works)."""
        if self._popen_class is None:
            self._popen_class = type("Popen", (_popen.Popen,), {"_bound_connection": self})
        return self._popen_class

    def run(self, *args: Any, **kwargs: Any) -> _popen.CompletedProcess[Any]:
        """:func:`remowt.run` on this connection."""
        return _popen.run(*args, connection=self, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> int:
        """:func:`remowt.call` on this connection."""
        return _popen.call(*args, connection=self, **kwargs)

    def check_call(self, *args: Any, **kwargs: Any) -> int:
        """:func:`remowt.check_call` on this connection."""
        return _popen.check_call(*args, connection=self, **kwargs)

    def check_output(self, *args: Any, **kwargs: Any) -> Any:
        """:func:`remowt.check_output` on this connection."""
        return _popen.check_output(*args, connection=self, **kwargs)

    def getoutput(self, cmd: Any, **kwargs: Any) -> str:
        """:func:`remowt.getoutput` on this connection."""
        return _popen.getoutput(cmd, connection=self, **kwargs)

    def getstatusoutput(self, cmd: Any, **kwargs: Any) -> Tuple[int, str]:
        """:func:`remowt.getstatusoutput` on this connection."""
        return _popen.getstatusoutput(cmd, connection=self, **kwargs)

    def fd_writer(self, fd: int) -> FdWriter:
        """The writer that copies children's output to local fd ``fd`` (for inherited stdio)."""
        with self._lock:
            writer = self._fd_writers.get(fd)
            if writer is None:
                writer = self._fd_writers[fd] = FdWriter(fd)
            return writer

    def cmd(self, program: str) -> Command:
        """A :class:`~remowt.command.Command` builder for ``program`` on this connection."""
        return Command(self, program)

    # --- processes ------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        executable: Optional[str] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        stdin: int = DEVNULL,
        stdout: int = DEVNULL,
        stderr: int = DEVNULL,
        start_new_session: bool = False,
        process_group: Optional[int] = None,
        umask: int = -1,
        restore_signals: bool = True,
        user: Union[int, str, None] = None,
        group: Union[int, str, None] = None,
        extra_groups: Optional[Sequence[Union[int, str]]] = None,
        keep_on_disconnect: bool = False,
        outputs: Optional[Mapping[str, OutputHandler]] = None,
    ) -> RemoteProcess:
        """Start ``argv`` on the target.

        ``env`` replaces the agent's environment (as in :mod:`subprocess`),
        ``extra_env`` extends it. Each of ``stdin``/``stdout``/``stderr`` is
        ``PIPE`` (a :class:`~remowt.streams.Stream` on the result),
        ``DEVNULL`` or ``CLOSED`` (see :data:`remowt.popen.CLOSED`); ``stderr``
        may also be ``STDOUT``. Each child gets its own
        process group unless ``start_new_session`` or ``process_group`` say
        otherwise; ``user``, ``group``, ``extra_groups``, ``umask`` and
        ``restore_signals`` are applied on the target as :mod:`subprocess`
        does. Children die with the connection unless ``keep_on_disconnect``.

        ``outputs`` maps ``"stdout"`` or ``"stderr"`` (whose mode is then
        ignored) to a handler of an output opened only when needed: it gets the
        stream once the child writes there, or exits with the pipe still open,
        else None when the child exits. It runs on the thread reading the link,
        before anything arrives on the stream, and must not block.
        """
        args = [str(a) for a in argv]
        if not args:
            raise ValueError("argv must not be empty")
        if env is not None and extra_env is not None:
            raise ValueError("give env (replace) or extra_env (extend), not both")
        _check_mode("stdin", stdin, (PIPE, DEVNULL, CLOSED))
        _check_mode("stdout", stdout, (PIPE, DEVNULL, CLOSED))
        _check_mode("stderr", stderr, (PIPE, DEVNULL, STDOUT, CLOSED))
        lazy = dict(outputs or {})
        if not set(lazy) <= {"stdout", "stderr"}:
            raise ValueError(f"outputs may name stdout and stderr, got {sorted(lazy)}")
        if "stdout" in lazy:
            stdout = DEVNULL
        if "stderr" in lazy:
            stderr = DEVNULL
        opened: List[Stream] = []

        def open_pipe(mode: int, reader: bool) -> Optional[Stream]:
            if mode != PIPE:
                return None
            stream = self.router.open_stream(self.agent)
            opened.append(stream)
            if reader:
                stream.close_write()
            return stream

        handle = next(self._handles)
        if holding_sends():  # the call must leave before its answer is awaited
            raise RuntimeError("Remowt.spawn cannot be called inside held_sends()")
        try:
            with held_sends():  # releases, stream opens and the call leave in one write
                self._send_releases()
                streams = (open_pipe(stdin, False), open_pipe(stdout, True), open_pipe(stderr, True))
                process = RemoteProcess(self, self._subprocess, handle, args, *streams, lazy)
                with self._lock:
                    if self._closed:
                        raise ConnectionLost(f"{self!r} is closed")
                    self._processes[handle] = process
                spec = SpawnSpec(
                    handle=handle,
                    argv=args,
                    executable=executable,
                    cwd=None if cwd is None else str(cwd),
                    env=dict(env if env is not None else extra_env or {}) or None,
                    replace_env=env is not None,
                    stdin=None if streams[0] is None else streams[0].sid,
                    stdout=None if streams[1] is None else streams[1].sid,
                    stderr=None if streams[2] is None else streams[2].sid,
                    stderr_to_stdout=stderr == STDOUT,
                    start_new_session=start_new_session,
                    process_group=process_group,
                    umask=umask,
                    restore_signals=restore_signals,
                    user=user,
                    group=group,
                    extra_groups=None if extra_groups is None else list(extra_groups),
                    keep_on_disconnect=keep_on_disconnect,
                    lazy_stdout="stdout" in lazy,
                    lazy_stderr="stderr" in lazy,
                    closed=[name for name, mode in zip(STDIO, (stdin, stdout, stderr)) if mode == CLOSED],
                )
                pending = self.router.call(
                    self.agent, SubprocessApi.namespace, _SPAWN.number, _SPAWN.encode_args((spec,), {})
                )
            try:
                process.pid = _SPAWN.decode_result(pending.result())
            except msgspec.ValidationError as e:
                raise RemoteError(f"{_SPAWN.name} returned a malformed result: {e}") from None
        except BaseException:
            with self._lock:
                self._processes.pop(handle, None)
            for stream in opened:
                stream.close()
            raise
        return process

    def _send_releases(self) -> None:
        """Let the agents forget the children whose exits arrived (sent with the next spawn, off the exit path)."""
        with self._lock:  # in place: the privileged view shares the connection's list
            releases = list(self._releases)
            self._releases.clear()
        for agent, handle in releases:
            with contextlib.suppress(ConnectionLost, Unreachable):  # else that agent is gone, its children too
                self.router.notify(agent, SubprocessApi.namespace, _RELEASE.number, _RELEASE.encode_args((handle,), {}))

    def _process_exited(self, handle: int, returncode: int) -> None:
        with self._lock:
            process = self._processes.pop(handle, None)
            closed = self._closed
        if process is not None:
            process._set_exited(returncode)
            if not closed:  # else the agent forgets its children by itself when the connection goes
                with self._lock:
                    self._releases.append((process.connection.agent, handle))  # the agent that ran it

    def _process_output(self, handle: int, name: str, sid: int) -> None:
        stream = self.router.accept_stream(self.router.caller(), sid)
        stream.receive_only()
        with self._lock:
            process = self._processes.get(handle)
        if process is None or not process._output_opened(name, stream):
            stream.close()

    def _link_closed(self, link: Link, reason: Optional[BaseException]) -> None:
        if link is not self.link:
            return
        with self._lock:
            processes = list(self._processes.values())
            self._processes.clear()
        for process in processes:
            process._set_lost(
                ConnectionLost(f"connection to {self.description} lost" + (f": {reason}" if reason else ""))
            )

    # --- lifetime -------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the connection: its agent, the agent's children, and every thread it started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.router.close()
        for hook in self._on_close:
            hook()
        for writer in list(self._fd_writers.values()):
            writer.close()


def _check_mode(name: str, mode: int, allowed: Sequence[int]) -> None:
    if mode not in allowed:
        names = {PIPE: "PIPE", DEVNULL: "DEVNULL", STDOUT: "STDOUT", CLOSED: "CLOSED"}
        raise ValueError(f"{name} must be one of {', '.join(names[m] for m in allowed)}, got {mode!r}")


def _user_router() -> Router:
    router = Router(wire.USER)
    router.register(Control(wire.USER))
    return router


def _connect(
    router: Router,
    transport: Transport,
    description: str,
    on_close: Sequence[Callable[[], None]],
    *,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
) -> Remowt:
    try:
        link = router.add_link(transport, name=f"user-{transport.name}")
    except BaseException:
        router.close()
        for hook in on_close:
            hook()
        raise
    connection = Remowt(
        router, link, description=description, on_close=on_close, prompter=prompter, escalation=escalation
    )
    router.register(_ProcessEvents(connection))
    from .escalation import serve_user_side

    serve_user_side(router, connection)
    return connection


def loopback(*, prompter: Optional[Prompter] = None, escalation: Optional[str] = None) -> Remowt:
    """A connection to an agent running on threads in this process (tests, teaching).

    ``prompter(prompt) -> password`` answers password prompts (default: ask
    on the terminal); ``escalation`` picks the tool for ``conn.privileged``.
    """
    check_prompter(prompter)
    check_tool(escalation)
    user_end, agent_end = loopback_transport.pair()
    agent = Agent()
    failure: List[BaseException] = []

    def serve() -> None:
        try:
            agent.serve(agent_end)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=serve, name="remowt-loopback-agent", daemon=True)
    thread.start()
    connection = _connect(
        _user_router(), user_end, "loopback", [agent.shutdown], prompter=prompter, escalation=escalation
    )
    thread.join()
    if failure:
        connection.close()
        raise RemowtError(f"loopback agent failed to start: {failure[0]}")
    return connection


def connect_local(
    python: Optional[str] = None, *, prompter: Optional[Prompter] = None, escalation: Optional[str] = None
) -> Remowt:
    """Start an agent as a child process on this machine and connect to it.

    ``prompter`` and ``escalation`` are as for :func:`loopback`.
    """
    check_prompter(prompter)
    check_tool(escalation)
    transport = local_transport.start_local_agent(python)
    try:
        description = f"local agent pid {transport.process.pid}"
        return _connect(_user_router(), transport, description, [], prompter=prompter, escalation=escalation)
    except ConnectionLost as e:
        raise ConnectionLost(f"local agent failed to start: {e}\n{transport.stderr_tail()}") from None


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
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    bundle: Optional[AgentBundle] = None,
    python: str = "python3",
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
    """
    from . import sshconfig
    from .bundle import AgentBundle
    from .deploy import remote_start_command, start_agent
    from .transports import ssh as ssh_transport

    check_prompter(prompter)
    check_tool(escalation)
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
    session = ssh_transport.open_session(target, config, password=password, prompter=asker)
    try:
        agent_bundle = bundle if bundle is not None else AgentBundle.default()
        transport = session.exec(remote_start_command(agent_bundle, python), description=f"agent on {target.alias}")
        start_agent(transport, agent_bundle, timeout=max(target.connect_timeout, 30.0))
    except BaseException:
        session.close()
        raise
    return _connect(
        _user_router(), transport, f"ssh {target}", [session.close], prompter=prompter, escalation=escalation
    )
