"""The escalation service: the agent starts a privileged copy of itself through run0, sudo or doas.

The privileged agent speaks the framed protocol on its stdin/stdout, like
every agent, and becomes one more link of this agent's router: its address
``agent-privileged`` is announced to the user like any other, and the user
reaches it through this agent. One per agent, started on the first
``elevate`` and reused. A deployed agent's privileged copy runs only code
root copied to a private directory of its own and verified against the
digest the client sent.

Passwords come from the prompt service of whoever asked
(:class:`remowt.endpoints.prompt.PromptApi`) and reach the tool through a pipe (sudo
runs the agent's ``askpass`` mode, which asks this agent over a private unix
socket) or through a pty this agent owns (doas and run0 read from their
controlling terminal): never argv, the environment or a file. The tool's own
limit on attempts applies; nothing here asks again.

The socket answers only a process descended from the sudo this agent started
(its peer credentials, and the parents in ``/proc/<pid>/stat``), once per
token: a token is used up by the first request that shows it, and sudo's next
run of the helper gets a new one. Passwords are held as bytearrays, never as
``str``, and wiped when the attempt ends; meanwhile the agent is not dumpable
(:mod:`remowt.runtime.secret`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shlex
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import msgspec

from ..deploy.local import AGENT, privileged_command, python_command
from ..deploy.tree import clean_stale, locked_dir
from ..errors import BadArguments, ConnectionLost, EscalationError, ProtocolError, RemoteError, Unreachable
from ..protocol import wire
from ..protocol.service import Service, proxy, rpc
from ..rpc.link import Link
from ..rpc.router import Router
from ..runtime.deadline import Deadline, poll_timeout
from ..runtime.real_subprocess import Popen as LocalPopen
from ..runtime.secret import Secrets
from ..transports.stdio import ChildTransport, enlarge_pipe
from .askpass import PASSWORD, REFUSED, SOCKET_ENV, TOKEN_ENV, AskpassRequest, read_message
from .prompt import PromptApi

if TYPE_CHECKING:
    import socket

log = logging.getLogger("remowt.escalate")

#: The tools in the order they are looked for, with the flags they need (as in the seeds).
TOOLS: Dict[str, Tuple[str, ...]] = {"run0": ("--background=", "--pipe"), "sudo": (), "doas": ()}
#: Tools that read the password from their controlling terminal: they get a pty of ours.
TTY_TOOLS = ("run0", "doas")
SUDO_PROMPT = "[sudo] password for %p@%H: "
#: How long the tool may take to start the agent, not counting the time spent answering prompts.
START_TIMEOUT = 60.0
ASKPASS_IO_TIMEOUT = 10.0
#: The private directory of one start (sudo's askpass script and socket); those of killed agents are removed.
WORKDIR_PREFIX = "remowt-escalate-"
_PEERCRED = struct.Struct("3i")
_MAX_DEPTH = 64  # how many parents the peer check climbs before it gives up
_AUTH_FAILED = re.compile(r"authentication fail|incorrect password|sorry, try again", re.IGNORECASE)
_PROMPT_WORD = re.compile(r"password|passphrase|\bpin\b", re.IGNORECASE)
# The implementation imports what only a start needs when it starts: the agent starts faster.
# Run by the tty tools' starter: make the inherited pty slave our controlling terminal, then exec the tool.
_CTTY = (
    "import fcntl, os, sys, termios; fd = int(sys.argv[1]); fcntl.ioctl(fd, termios.TIOCSCTTY, 0); "
    "os.close(fd); os.execv(sys.argv[2], sys.argv[2:])"
)


class EscalateApi(Service, namespace=20):
    """Served by the (unprivileged) agent."""

    @rpc(1)
    def elevate(self, tool: Optional[str]) -> str:
        """Start the privileged agent unless it runs; returns the tool used ("" when already root).

        ``tool`` is one of :data:`TOOLS`, or None to take the first one found.
        Prompts go to the caller's :class:`~remowt.endpoints.prompt.PromptApi`.
        """
        raise NotImplementedError

    @rpc(2)
    def drop(self) -> bool:
        """End the privileged agent (and its children); False if none was running."""
        raise NotImplementedError


class PrivilegedEventsApi(Service, namespace=22):
    """Served by whoever asked for the privileged agent."""

    @rpc(1, inline=True, oneway=True)
    def lost(self, reason: str) -> None:
        """The privileged agent is gone, and its children with it."""
        raise NotImplementedError


def check_tool(tool: Optional[str]) -> Optional[str]:
    """Return ``tool`` if it is None or a known escalation tool, else raise ValueError."""
    if tool is not None and tool not in TOOLS:
        raise ValueError(f"escalation must be one of {', '.join(map(repr, TOOLS))} or None (detect), got {tool!r}")
    return tool


def find_tool(choice: Optional[str]) -> Tuple[str, str]:
    """The name and path of the tool to use: ``choice``, or the first of :data:`TOOLS` that can work here."""
    import platform
    import shutil

    search = os.environ.get("PATH", os.defpath)
    for name in [choice] if choice else list(TOOLS):
        path = shutil.which(name)
        if path is None:
            continue
        if name == "run0" and not os.path.isdir("/run/systemd/system"):
            if choice:
                raise EscalationError(
                    f"run0 needs a running systemd, and {platform.node()} has none (no /run/systemd/system)"
                )
            continue
        return name, path
    looked = choice or ", ".join(TOOLS)
    raise EscalationError(f"no escalation tool on {platform.node()}: looked for {looked} in PATH {search}")


def agent_command(*args: str) -> List[str]:
    """Start this agent's code again with ``args`` (see :func:`~remowt.deploy.local.python_command`)."""
    if not sys.executable:
        raise EscalationError("cannot start the agent again: the path of its Python (sys.executable) is unknown")
    return python_command(AGENT, *args)


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is a parent, grandparent … of process ``pid`` (by the parents in ``/proc/<pid>/stat``)."""
    for _ in range(_MAX_DEPTH):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat.rpartition(b")")[2].split()[1])  # after the name, which may hold anything
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _runtime_dir() -> Optional[str]:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return runtime
    return None


class _Attempt:
    """One try at starting the privileged agent: spawn the tool, answer its prompts, shake hands."""

    def __init__(
        self, router: Router, owner: str, choice: Optional[str], tree: Optional[str], options: Sequence[str] = ()
    ) -> None:
        import secrets

        self.router = router
        self.tree = tree
        self.options = tuple(options)
        self.prompt = proxy(PromptApi, router, owner)
        if os.geteuid() == 0:
            self.tool, self.path = "", ""
        else:
            self.tool, self.path = find_tool(choice)
        self.answers = 0
        self.cancelled: Optional[str] = None
        self.output = bytearray()
        self.master = -1
        self.slave = -1
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._token = secrets.token_urlsafe(32)
        self._script = ""
        self._secrets = Secrets()
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._aborted = False

    @property
    def name(self) -> str:
        return self.tool or "the privileged agent"

    def abort(self) -> None:
        """Stop the attempt from another thread (the agent is shutting down)."""
        with self._lock:
            self._aborted = True
            process = self.process
        if process is not None:
            with contextlib.suppress(OSError):
                process.terminate()

    def run(self) -> Link:
        """Start the tool and return the link to the privileged agent; EscalationError if it did not start."""
        import shutil
        import tempfile

        base = _runtime_dir() or tempfile.gettempdir()
        clean_stale(base, WORKDIR_PREFIX)
        workdir, lock = locked_dir(base, WORKDIR_PREFIX)
        listener: Optional[socket.socket] = None
        transport: Optional[ChildTransport] = None
        watch = -1
        try:
            argv = privileged_command(self.tree, *self.options)
            env: Optional[Dict[str, str]] = None
            pass_fds: Tuple[int, ...] = ()
            if self.tool == "sudo":
                listener, env = self._askpass(workdir)
                argv = [self.path, "-A", "-p", SUDO_PROMPT, "--", *argv]
            elif self.tool in TTY_TOOLS:
                self.master, self.slave = os.openpty()
                pass_fds = (self.slave,)
                argv = [sys.executable, "-I", "-S", "-c", _CTTY, str(self.slave), self.path, *TOOLS[self.tool], "--"]
                argv += privileged_command(self.tree, *self.options)
            process = self._spawn(argv, env, pass_fds)
            assert process.stdout is not None
            watch = os.dup(process.stdout.fileno())
            transport = ChildTransport(process)
            self._answer_until_output(watch, listener)
            return self._handshake(transport)
        except BaseException:
            if transport is not None:
                transport.close()
            self.close_tty()
            raise
        finally:
            self._secrets.clear()
            if watch >= 0:
                os.close(watch)
            if listener is not None:
                listener.close()
            shutil.rmtree(workdir, ignore_errors=True)
            os.close(lock)

    def close_tty(self) -> None:
        """Close the pty (once the tool and the agent it started are gone)."""
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1

    def _askpass(self, workdir: str) -> Tuple[socket.socket, Dict[str, str]]:
        """The private socket and the askpass script for sudo; the environment that names them."""
        import socket

        path = os.path.join(workdir, "askpass.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            listener.setblocking(False)
            self._script = os.path.join(workdir, "askpass")
            self._write_script()
        except BaseException:
            listener.close()
            raise
        env = dict(os.environ, SUDO_ASKPASS=self._script, **{SOCKET_ENV: path})
        env.pop(TOKEN_ENV, None)
        return listener, env

    def _write_script(self) -> None:
        """(Re)write the askpass script sudo runs, with the current token (in its environment, not its argv)."""
        command = " ".join(shlex.quote(arg) for arg in agent_command("askpass"))
        text = f'#!/bin/sh\n{TOKEN_ENV}={shlex.quote(self._token)}\nexport {TOKEN_ENV}\nexec {command} "$@"\n'
        new = self._script + ".new"
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with open(fd, "w") as f:
            f.write(text)
        os.replace(new, self._script)

    def _spawn(
        self, argv: List[str], env: Optional[Dict[str, str]], pass_fds: Tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        # A session of its own: no terminal of the user's, so every prompt comes through us.
        process = LocalPopen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
            bufsize=0,
        )
        assert process.stdin is not None and process.stdout is not None
        enlarge_pipe(process.stdin.fileno())
        enlarge_pipe(process.stdout.fileno())
        with self._lock:
            self.process = process
            aborted = self._aborted
        if aborted:
            process.terminate()
        return process

    def _answer_until_output(self, watch: int, listener: Optional[socket.socket]) -> None:
        """Answer prompts until the child writes to stdout (the agent's hello) or exits."""
        poller = select.poll()
        poller.register(watch, select.POLLIN)
        if listener is not None:
            poller.register(listener.fileno(), select.POLLIN)
        if self.master >= 0:
            poller.register(self.master, select.POLLIN)
        deadline = Deadline(START_TIMEOUT)
        while True:
            if deadline.expired():
                self.abort()
                said = self._tty_text()
                raise EscalationError(
                    f"{self.name} did not start the privileged agent within {START_TIMEOUT:g} s"
                    + (f": {said}" if said else "")
                )
            ready = {fd for fd, _ in poller.poll(poll_timeout(deadline.left()))}
            if watch in ready:
                return
            if listener is not None and listener.fileno() in ready:
                self._serve_askpass(listener)
                deadline = Deadline(START_TIMEOUT)
            if self.master in ready:
                if not self._read_tty():
                    poller.unregister(self.master)
                deadline = Deadline(START_TIMEOUT)

    def _ask(self, prompt: str) -> Optional[bytearray]:
        """The answer to ``prompt``, held until the attempt ends; None (and the reason kept) when there is none."""
        if self.cancelled is None:
            try:
                answer = self._secrets.keep(self.prompt.ask(prompt, self.tool))
            except (RemoteError, ConnectionLost, Unreachable) as e:
                self.cancelled = str(e)
            else:
                if any(c in answer for c in b"\r\n\0"):
                    self.cancelled = "the password contains a line break or NUL, which the tool cannot read"
                else:
                    self.answers += 1
                    return answer
        return None

    def _serve_askpass(self, listener: socket.socket) -> None:
        """Answer one request on the askpass socket, if one waits: only a helper that sudo started, once a token."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        with conn:
            try:
                conn.settimeout(ASKPASS_IO_TIMEOUT)
                request = self._admit(conn)
                if isinstance(request, str):
                    log.warning("askpass: %s", request)
                    conn.sendall(REFUSED + request.encode())
                    return
                password = self._ask(request.prompt)
                if password is None:
                    conn.sendall(REFUSED + (self.cancelled or "no password was given").encode())
                else:
                    conn.sendmsg([PASSWORD, password])
            except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("askpass: bad request: %s", e)

    def _admit(self, conn: socket.socket) -> Union[AskpassRequest, str]:
        """The request on ``conn`` if it may be answered, else why not.

        The peer must descend from the sudo we started; its token, ours.
        Ours is used up by any request that gets this far, whatever it
        showed: the script sudo runs next has a new one.
        """
        import hmac
        import secrets
        import socket

        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.getuid():
            return f"refused pid {pid}: it runs as uid {uid}, not {os.getuid()}"
        message = read_message(conn)  # all of it, even to refuse: a close with unread bytes would lose our reply
        assert self.process is not None
        if not descends_from(pid, self.process.pid):
            return f"refused pid {pid}: the {self.tool} this agent started (pid {self.process.pid}) did not start it"
        request = msgspec.json.decode(message, type=AskpassRequest)
        expected, self._token = self._token, secrets.token_urlsafe(32)
        self._write_script()
        if not hmac.compare_digest(request.token, expected):
            return f"refused pid {pid}: its token was used already, or was never ours"
        return request

    def _read_tty(self) -> bool:
        """Read what the tool wrote on the pty and answer a prompt; False once the pty has ended."""
        try:
            data = os.read(self.master, 4096)
        except OSError:
            data = b""
        if not data:
            return False
        self.output += data
        del self.output[:-8192]
        self._pending += data
        line = re.split(rb"[\r\n]", bytes(self._pending))[-1].decode("utf-8", "replace").strip()
        if line.endswith(":") and _PROMPT_WORD.search(line):
            self._pending.clear()
            password = self._ask(line + " ")
            if password is None:
                self.abort()
            else:
                os.writev(self.master, [password, b"\n"])
        return True

    def _tty_text(self) -> str:
        """What the tool wrote on the pty, without any password, for error messages."""
        output = self.output
        for secret in self._secrets:  # in bytes: a password never becomes a str
            output = output.replace(secret, b"***")
        text = output.decode("utf-8", "replace")
        return "\n".join(line.strip() for line in text.splitlines() if line.strip())

    def _handshake(self, transport: ChildTransport) -> Link:
        try:
            link = self.router.add_link(transport, name=wire.AGENT_PRIVILEGED)
        except (ConnectionLost, ProtocolError) as e:
            transport.close()
            raise EscalationError(self._failure(transport, e)) from None
        if link.peer != wire.AGENT_PRIVILEGED:
            link.close()
            raise EscalationError(f"{self.name} started a node that calls itself {link.peer!r}, not agent-privileged")
        return link

    def _failure(self, transport: ChildTransport, error: BaseException) -> str:
        said = "\n".join(part for part in (self._tty_text(), transport.stderr_tail().strip()) if part)
        if self.cancelled is not None:
            return f"{self.name} was not given a password: {self.cancelled}"
        if self.answers and _AUTH_FAILED.search(said):
            attempts = f"{self.answers} attempt{'s' if self.answers != 1 else ''}"
            return f"{self.name}: authentication failed after {attempts}: {said}"
        status = transport.process.returncode
        return f"{self.name} could not start the privileged agent (exit status {status}): {said or error}"


class _Privileged:
    """The running privileged agent: its link, the attempt that started it, who asked."""

    def __init__(self, link: Link, attempt: _Attempt, owner: str) -> None:
        self.link = link
        self.attempt = attempt
        self.owner = owner


class Escalator(EscalateApi):
    """The agent's implementation: at most one privileged agent, started on demand.

    ``tree``: the digest of the deployed tree this agent runs from, which root
    verifies its own copy against (:func:`~remowt.deploy.local.privileged_command`); ``options``: more
    of the privileged agent's ``real-agent`` options (a local agent's ``--plugins=DIR``).
    """

    def __init__(self, router: Router, tree: Optional[str] = None, options: Sequence[str] = ()) -> None:
        self._router = router
        self._tree = tree
        self._options = tuple(options)
        self._start = threading.Lock()
        self._lock = threading.Lock()
        self._privileged: Optional[_Privileged] = None
        self._attempt: Optional[_Attempt] = None
        self._closed = False
        router.on_link_closed(self._link_closed)

    def elevate(self, tool: Optional[str]) -> str:
        try:
            check_tool(tool)
        except ValueError as e:
            raise BadArguments(str(e)) from None
        owner = self._router.caller()
        with self._start:
            with self._lock:
                if self._closed:
                    raise ConnectionLost("the agent is shutting down")
                if self._privileged is not None:
                    return self._privileged.attempt.tool
                attempt = self._attempt = _Attempt(self._router, owner, tool, self._tree, self._options)
            try:
                link = attempt.run()
            finally:
                with self._lock:
                    self._attempt = None
            with self._lock:
                self._privileged = _Privileged(link, attempt, owner)
            if link.closed:
                self._gone(link, None)
            log.info("privileged agent started through %s", attempt.name)
            return attempt.tool

    def drop(self) -> bool:
        with self._lock:
            privileged = self._privileged
        if privileged is None:
            return False
        privileged.link.close()
        privileged.link.join(START_TIMEOUT)
        return True

    def close(self) -> None:
        """Stop a start in progress (the agent is shutting down); the router closes a running one."""
        with self._lock:
            self._closed = True
            attempt = self._attempt
        if attempt is not None:
            attempt.abort()

    def _link_closed(self, link: Link, reason: Optional[BaseException]) -> None:
        self._gone(link, reason)

    def _gone(self, link: Link, reason: Optional[BaseException]) -> None:
        with self._lock:
            privileged = self._privileged
            if privileged is None or privileged.link is not link:
                return
            self._privileged = None
        privileged.attempt.close_tty()
        why = "its link closed" + (f": {reason}" if reason else "")
        log.info("privileged agent gone: %s", why)
        with contextlib.suppress(ConnectionLost, Unreachable):
            proxy(PrivilegedEventsApi, self._router, privileged.owner).lost(why)
