"""The connection: ``remowt.loopback()``, ``remowt.connect_local()`` and what they return."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import msgspec

from ..agent.main import Agent
from ..deploy import local as local_transport
from ..endpoints.control import Control, ControlApi, NodeInfo
from ..endpoints.escalate import check_tool
from ..endpoints.prompt import Prompter, check_prompter, has_terminal, terminal_prompter
from ..endpoints.subprocess import ProcessEventsApi, SpawnSpec, SubprocessApi
from ..errors import ConnectionLost, MessageTooLarge, RemoteError, RemowtError, Unreachable
from ..protocol import wire
from ..protocol.service import proxy, timed
from ..rpc import keepalive as _keepalive
from ..rpc.link import Link, held_mark, held_sends, held_undo, holding_sends
from ..rpc.router import HANDSHAKE_TIMEOUT, Pending, Router
from ..rpc.streams import Stream
from ..runtime.deadline import CALL_TIMEOUT, Deadline
from ..runtime.interrupts import start
from ..transports import loopback as loopback_transport
from ..transports.base import Transport
from . import popen as _popen
from .command import Command
from .pipes import FdWriter
from .process import OutputHandler, RemoteProcess

if TYPE_CHECKING:
    from ..deploy.bundle import AgentBundle
    from .privileged import Privileged

_SPAWN = SubprocessApi.methods["spawn"]
_KEEPALIVE = ControlApi.methods["keepalive"]
_RELEASE = SubprocessApi.methods["release"]
_SIGNAL = SubprocessApi.methods["send_signal"]
PIPE = _popen.PIPE
DEVNULL = _popen.DEVNULL
STDOUT = _popen.STDOUT
CLOSED = _popen.CLOSED
STDIO = ("stdin", "stdout", "stderr")


class _ProcessEvents(ProcessEventsApi):
    def __init__(self, connection: Remowt) -> None:
        self._connection = connection

    def exited(self, handle: int, returncode: int) -> None:
        self._connection._process_exited(self._connection.router.caller(), handle, returncode)

    def output(self, handle: int, name: str, sid: int) -> None:
        self._connection._process_output(handle, name, sid)


class Remowt:
    """A connection to an agent. Use as a context manager, or call :meth:`close`.

    It also has the face of the :mod:`subprocess` module, bound to itself:
    ``conn.Popen``, ``conn.run``, ``conn.check_output`` …, ``conn.PIPE`` and
    the exception classes, so ``subprocess = conn`` works in a script.

    ``call_timeout`` bounds each call that should answer at once (``ping``,
    ``info``, ``spawn``, signals) when the caller gives no timeout: a stopped
    agent or a dead network is then a ``TimeoutError``, not a hang.
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
        call_timeout: Optional[float] = CALL_TIMEOUT,
    ) -> None:
        self.router = router
        self.link = link
        self.description = description
        self.agent = wire.AGENT
        self.prompter = prompter
        self.escalation = escalation
        self.call_timeout = call_timeout
        self._privileged: Optional[Privileged] = None
        self._on_close = list(on_close)
        self._handles = itertools.count(1)
        self._lock = threading.Lock()
        self._processes: Dict[int, RemoteProcess] = {}
        self._closed = False
        self._popen_class: Optional[Type[_popen.Popen]] = None
        self._fd_writers: Dict[int, FdWriter] = {}
        self._releases: List[Tuple[str, int]] = []  # exited children (agent, handle) the agents may forget
        self._control = proxy(ControlApi, router, self.agent, call_timeout)
        self._subprocess = proxy(SubprocessApi, router, self.agent, call_timeout)
        router.on_link_closed(self._link_closed)

    def __repr__(self) -> str:
        return f"<Remowt {self.description}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Remowt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- health ---------------------------------------------------------

    def ping(self, timeout: Optional[float] = None) -> float:
        """One no-op round trip to the agent; returns how long it took, in seconds.

        ``TimeoutError`` after ``timeout`` seconds (None: :attr:`call_timeout`).
        """
        control = self._control if timeout is None else timed(self._control, timeout)
        start = time.perf_counter()
        control.ping()
        return time.perf_counter() - start

    def info(self, timeout: Optional[float] = None) -> NodeInfo:
        """Who the agent is: pid, uid, Python version and machine (``timeout`` as for :meth:`ping`)."""
        return (self._control if timeout is None else timed(self._control, timeout)).info()

    @property
    def privileged(self) -> Privileged:
        """This connection with its calls going to the privileged agent (started on first use).

        The agent starts itself again through ``self.escalation`` (run0, sudo
        or doas; None: the first one found on the target); password prompts
        go to ``self.prompter`` (None: the terminal). Both may be changed
        before first use. See :class:`remowt.user.privileged.Privileged`.
        """
        from .privileged import Privileged

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
        """A :class:`~remowt.user.command.Command` builder for ``program`` on this connection."""
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
        timeout: Optional[float] = None,
    ) -> RemoteProcess:
        """Start ``argv`` on the target.

        ``env`` replaces the agent's environment (as in :mod:`subprocess`),
        ``extra_env`` extends it. Each of ``stdin``/``stdout``/``stderr`` is
        ``PIPE`` (a :class:`~remowt.rpc.streams.Stream` on the result),
        ``DEVNULL`` or ``CLOSED`` (see :data:`remowt.user.popen.CLOSED`); ``stderr``
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

        Without an answer within ``timeout`` seconds (None: :attr:`call_timeout`)
        it raises ``TimeoutError``; a child the agent starts after that is
        killed as soon as its start is reported.
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
                mark = held_mark()
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
                try:
                    pending = self.router.call(
                        self.agent, SubprocessApi.namespace, _SPAWN.number, _SPAWN.encode_args((spec,), {})
                    )
                except MessageTooLarge as e:
                    _unsend(opened, mark)
                    why = f"the spawn request is {e.size} bytes, over the agent's frame limit of {e.limit}"
                    raise OSError(errno.E2BIG, f"{os.strerror(errno.E2BIG)} ({why})", executable or args[0]) from None
            try:
                process.pid = _SPAWN.decode_result(self._spawned(pending, process, timeout))
            except msgspec.ValidationError as e:
                raise RemoteError(f"{_SPAWN.name} returned a malformed result: {e}") from None
        except BaseException:
            with self._lock:
                self._processes.pop(handle, None)
            for stream in opened:
                stream.close()
            raise
        return process

    def _spawned(self, pending: Pending, process: RemoteProcess, timeout: Optional[float]) -> bytes:
        """The spawn's answer; on a timeout, the call is left to :meth:`_spawned_late` and ``TimeoutError`` raised."""
        timeout = self.call_timeout if timeout is None else timeout
        if pending.wait(timeout) or not pending.abandon(functools.partial(self._spawned_late, process)):
            return pending.result()
        raise TimeoutError(f"{self.agent} did not answer the spawn of {process.args[0]!r} within {timeout:g} s")

    def _spawned_late(self, process: RemoteProcess, result: Optional[bytes], error: Optional[BaseException]) -> None:
        """A spawn answered after its caller gave up: kill the child (its exit, as any, lets the agent forget it)."""
        if error is not None or self._closed:
            return
        with contextlib.suppress(ConnectionLost, Unreachable):
            args = _SIGNAL.encode_args((process.handle, signal.SIGKILL), {})
            self.router.notify(self.agent, SubprocessApi.namespace, _SIGNAL.number, args)

    def _send_releases(self) -> None:
        """Let the agents forget the children whose exits arrived (sent with the next spawn, off the exit path)."""
        with self._lock:  # in place: the privileged view shares the connection's list
            releases = list(self._releases)
            self._releases.clear()
        for agent, handle in releases:
            with contextlib.suppress(ConnectionLost, Unreachable):  # else that agent is gone, its children too
                self.router.notify(agent, SubprocessApi.namespace, _RELEASE.number, _RELEASE.encode_args((handle,), {}))

    def _process_exited(self, agent: str, handle: int, returncode: int) -> None:
        with self._lock:
            process = self._processes.pop(handle, None)
            if not self._closed:  # else the agent forgets its children by itself when the connection goes
                self._releases.append((agent, handle))  # also a child whose spawn timed out
        if process is not None:
            process._set_exited(returncode)

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


def _unsend(streams: List[Stream], mark: Dict[Link, int]) -> None:
    """Close ``streams`` and drop their held opens (and what followed): the peer never hears of them."""
    for stream in streams:
        stream.close()
    streams.clear()
    held_undo(mark)


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
    call_timeout: Optional[float] = CALL_TIMEOUT,
    deadline: Optional[Deadline] = None,
    keepalive: Tuple[float, int] = (0.0, _keepalive.DEFAULT_COUNT),
) -> Remowt:
    try:
        timeout = HANDSHAKE_TIMEOUT if deadline is None else deadline.shorter(HANDSHAKE_TIMEOUT)
        link = router.add_link(transport, name=f"user-{transport.name}", timeout=timeout)
    except BaseException:
        router.close()
        for hook in on_close:
            hook()
        raise
    if keepalive[0] > 0:
        sender = _start_keepalives(router, link, *keepalive)
        on_close = [sender.stop, *on_close]
    connection = Remowt(
        router,
        link,
        description=description,
        on_close=on_close,
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
    )
    router.register(_ProcessEvents(connection))
    from .privileged import serve_user_side

    serve_user_side(router, connection)
    return connection


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
) -> Remowt:
    """A connection to an agent running on threads in this process (tests, teaching).

    ``prompter(prompt) -> password`` answers password prompts (default: ask
    on the terminal); ``escalation`` picks the tool for ``conn.privileged``;
    ``call_timeout`` is :attr:`Remowt.call_timeout`.
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

    thread = start(threading.Thread(target=serve, name="remowt-loopback-agent", daemon=True))
    connection = _connect(
        _user_router(),
        user_end,
        "loopback",
        [agent.shutdown],
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
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
) -> Remowt:
    """Start an agent as a child process on this machine and connect to it.

    ``prompter``, ``escalation`` and ``call_timeout`` are as for :func:`loopback`; ``agent_keepalive`` and
    ``agent_keepalive_count`` as for :func:`connect`.
    """
    check_prompter(prompter)
    check_tool(escalation)
    _keepalive.check(agent_keepalive, agent_keepalive_count)
    transport = local_transport.start_local_agent(python)
    try:
        description = f"local agent pid {transport.process.pid}"
        return _connect(
            _user_router(),
            transport,
            description,
            [],
            prompter=prompter,
            escalation=escalation,
            call_timeout=call_timeout,
            keepalive=(agent_keepalive, agent_keepalive_count),
        )
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
    agent_keepalive: float = _keepalive.DEFAULT_INTERVAL,
    agent_keepalive_count: int = _keepalive.DEFAULT_COUNT,
    prompter: Optional[Prompter] = None,
    escalation: Optional[str] = None,
    bundle: Optional[AgentBundle] = None,
    python: str = "python3",
    call_timeout: Optional[float] = CALL_TIMEOUT,
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
    from ..deploy.bundle import AgentBundle
    from ..deploy.remote import remote_start_command, start_agent
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
    agent_bundle = bundle if bundle is not None else AgentBundle.default()  # local work: not the target's time
    deadline = Deadline(target.connect_timeout, f"connecting to {target}")
    session = ssh_transport.open_session(target, config, password=password, prompter=asker, deadline=deadline)
    try:
        command = remote_start_command(agent_bundle, python)
        transport = session.exec(command, description=f"agent on {target.alias}", deadline=deadline)
        start_agent(transport, agent_bundle, timeout=deadline.left() or 0.0)
    except BaseException:
        session.close()
        raise
    return _connect(
        _user_router(),
        transport,
        f"ssh {target}",
        [session.close],
        prompter=prompter,
        escalation=escalation,
        call_timeout=call_timeout,
        deadline=deadline,
        keepalive=(agent_keepalive, agent_keepalive_count),
    )
