"""The ``remowt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Dict, List, Mapping, Optional

from .errors import ConnectionLost, RemowtError
from .transports.stdio import pipe_above_stdio
from .user import connect as client
from .user.connection import Remowt
from .user.popen import CLOSED, Popen
from .version import __version__

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remowt",
        description="Run processes on another machine (or this one) through a remowt agent.",
    )
    parser.add_argument("--version", action="version", version=f"remowt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    local = commands.add_parser(
        "local",
        help="run a command through a local agent",
        description=(
            "Start a remowt agent on this machine and run ARGV through it, with this "
            "terminal's stdin, stdout and stderr wired through; exit with its exit code "
            "(128+N if it was killed by signal N, like a shell)."
        ),
    )
    local.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGV", help="the command and its arguments")
    ssh = commands.add_parser(
        "ssh",
        help="run a command on an ssh host through a remowt agent",
        description=(
            "Connect to HOST over ssh (honouring ~/.ssh/config and known_hosts), deploy the agent if the host "
            "does not have it yet, run ARGV there with this terminal's stdin, stdout and stderr wired through, "
            "and exit with its exit code (128+N if it was killed by signal N; 255 if the connection failed)."
        ),
    )
    ssh.add_argument("host", help="host name or ~/.ssh/config alias, optionally user@host")
    ssh.add_argument("-p", "--port", type=int, help="port to connect to")
    ssh.add_argument("-l", "--login", metavar="USER", help="user to log in as")
    ssh.add_argument("-i", "--identity", metavar="KEY", action="append", help="private key file (repeatable)")
    ssh.add_argument("-F", "--config", metavar="FILE", help="ssh config file (default ~/.ssh/config)")
    ssh.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host's key and record it in known_hosts (changed keys are still refused)",
    )
    ssh.add_argument("argv", nargs="*", metavar="-- ARGV", help="the command and its arguments, after --")
    _add_bundle_parser(commands)
    return parser


def _add_bundle_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="build and list the agent bundle deployed to targets",
        description=(
            "The agent bundle holds one artifact per target platform (uname -m + Python tag, e.g. "
            "x86_64-cp311): the remowt package and msgspec built for that platform."
        ),
    )
    actions = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="(re)build the artifact for this interpreter's platform",
        description="Build the artifact for this interpreter's platform from the installed remowt and msgspec.",
    )
    add = actions.add_parser(
        "add",
        help="add a platform from a msgspec wheel fetched with pip",
        description=(
            "Fetch a manylinux msgspec wheel for PLATFORM with pip (the newest release not newer than the "
            "installed one that supports that Python), keep it in the bundle, and build the artifact."
        ),
    )
    add.add_argument("--platform", required=True, help="the target's `uname -m` and Python tag, e.g. aarch64-cp39")
    add.add_argument("--msgspec-version", metavar="VERSION", help="use exactly this msgspec release")
    listing = actions.add_parser(
        "list", help="show the platforms, their sha256 and sources", description="Show the bundle's platforms."
    )
    for action in (build, add, listing):
        action.add_argument(
            "--dir",
            help="the bundle directory (default: $REMOWT_BUNDLE_DIR, else the checkout's agent_bundle/, "
            "else ~/.cache/remowt/bundle)",
        )


def _bundle_main(args: argparse.Namespace) -> int:
    """``remowt bundle build|add|list``: print what was done; exit 1 with the reason when it fails."""
    from .deploy import bundle

    directory = os.path.abspath(args.dir) if args.dir else bundle.default_bundle_dir()
    try:
        if args.bundle_command == "build":
            digest = bundle.build_local(directory)
            print(f"{bundle.local_platform()} {digest} in {directory}")
        elif args.bundle_command == "add":
            added = bundle.add_platform(directory, args.platform, args.msgspec_version)
            print(f"{added.platform} {added.sha256} in {directory} (msgspec {added.msgspec_version})")
        else:
            infos = bundle.describe(directory)
            print(f"agent bundle {directory}:")
            for info in infos:
                state = {True: "current", False: "stale: sources changed", None: "made elsewhere"}[info.current]
                made = f"msgspec {info.msgspec_version} from {info.source}" if info.source else ""
                print(f"{info.platform:<16} {info.sha256}  {state}  {made}".rstrip())
    except bundle.BundleError as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 1
    return 0


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Interrupted(BaseException):
    """The third SIGINT, SIGTERM or SIGHUP: the CLI ends at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class SignalForwarder:
    """What SIGINT, SIGTERM and SIGHUP do to the CLI.

    The work (connect, start the child, wait, close) runs on a thread of its
    own; the main thread waits in ``select`` on a pipe that both the work and
    the signals (``signal.set_wakeup_fd``, whichever thread the kernel picked)
    write to. The handlers only note the signal: they take no lock and call
    nothing, so nothing is ever interrupted half-way. The main thread sends each
    signal on to the child's process group, as a terminal sends it to its
    foreground job (a shell running ``sleep`` waits for it before it dies of a
    SIGINT), and the CLI exits with the child's status: 128+N when the signal
    killed it. A signal that comes while the child is being started waits for
    it (the child may already run, and print). One that comes while connecting,
    or after the child exited, ends the CLI at once with 128+N: the connection
    ends with this process, and the agent kills a child it had started.

    The third signal ends the CLI at once too, after killing the child's group
    (a fourth stops waiting for that). It takes three, not two, because
    ``timeout`` and others signal the CLI and then its whole process group, so
    one request can arrive twice.
    """

    ENOUGH = 3

    def __init__(self) -> None:
        self.process: Optional[Popen] = None
        self.starting = False
        self.received = 0
        self._signals: List[int] = []
        self._status: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._wake_r, self._wake_w = pipe_above_stdio()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __enter__(self) -> SignalForwarder:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in FORWARDED_SIGNALS}
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received += 1
        if self.received >= self.ENOUGH:
            raise Interrupted(signum)
        self._signals.append(signum)

    def wake(self) -> None:
        """Look again: the child was started, or has exited (any thread)."""
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_w, b"w")

    def run(self, work: Callable[[], int]) -> int:
        """Run ``work`` on a thread and handle signals here meanwhile; its status, or 128+N if a signal ended it."""
        threading.Thread(target=self._work, args=(work,), name="remowt-cli", daemon=True).start()
        try:
            return self._serve()
        except Interrupted as e:
            process = self.process
            if process is not None:
                with contextlib.suppress(RemowtError):
                    process.signal_group(signal.SIGKILL)
            return 128 + e.signum

    def _work(self, work: Callable[[], int]) -> None:
        try:
            self._status = work()
        except BaseException as e:
            self._error = e
        finally:
            self.wake()

    def _serve(self) -> int:
        while True:
            select.select([self._wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
            if self._error is not None:
                raise self._error
            if self._status is not None:
                return self._status
            ending = self._forward()
            if ending is not None:
                return 128 + ending

    def _forward(self) -> Optional[int]:
        """Send the signals noted on to the child; the one that ends the CLI (no child to send it to), if any."""
        while self._signals:
            starting = self.starting  # before the process: the work sets the process, then clears starting
            process = self.process
            if process is None:
                return None if starting else self._signals[0]
            with contextlib.suppress(RemowtError):  # a lost connection is the work's to tell
                process.signal_group(self._signals.pop(0))
        return None


def run_attached(connection: Remowt, argv: List[str], signals: SignalForwarder, stdio: Mapping[str, int]) -> int:
    """Run ``argv`` with this process's stdio (or ``stdio``) wired through; return the shell-style exit status."""
    signals.starting = True
    try:
        signals.process = connection.Popen(
            argv, stdin=stdio.get("stdin"), stdout=stdio.get("stdout"), stderr=stdio.get("stderr")
        )
    finally:
        signals.starting = False
        signals.wake()
    try:
        return exit_status(signals.process.wait())
    except ConnectionLost:
        raise
    except OSError as e:  # its output could not be written here, and it exited 0 regardless
        return output_failed(e)
    finally:
        signals.process = None
        signals.wake()


def output_failed(error: OSError) -> int:
    """The exit status when the child's output could not be written here.

    EPIPE is quiet and 128+SIGPIPE, as for a program writing to a pipe nobody
    reads; anything else is said on stderr and is 255, as ssh exits.
    """
    if error.errno == errno.EPIPE:
        return 128 + signal.SIGPIPE
    with contextlib.suppress(OSError):  # stderr may be the file that failed
        print(f"remowt: {error.strerror}", file=sys.stderr)
    return 255


def plug_closed_stdio() -> Dict[str, int]:
    """Open /dev/null on each of fds 0, 1 and 2 that is closed; the child gets that one CLOSED.

    Otherwise the next fd this process opens (an agent's pipe, the ssh socket)
    would land there and be taken for its stdin, stdout or stderr.
    """
    stdio: Dict[str, int] = {}
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            stdio[name] = CLOSED
    return stdio


def _argv(args: argparse.Namespace, parser: argparse.ArgumentParser, after: Optional[List[str]]) -> List[str]:
    argv: List[str] = list(args.argv) if after is None else list(args.argv) + after
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        parser.error(f"{args.command}: give the command to run after --")
    return argv


def _connection(args: argparse.Namespace) -> Remowt:
    if args.command == "local":
        return client.connect_local()
    return client.connect(
        args.host,
        port=args.port,
        user=args.login,
        key_filename=args.identity,
        ssh_config=args.config,
        host_key_policy="accept-new" if args.accept_new_host_key else None,
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = _parser()
    words = sys.argv[1:] if argv is None else list(argv)
    after: Optional[List[str]] = None
    if words[:1] == ["ssh"] and "--" in words:  # ssh's options may follow HOST; ARGV is all after --
        cut = words.index("--")
        words, after = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if args.command == "bundle":
        sys.exit(_bundle_main(args))
    command = _argv(args, parser, after)
    stdio = plug_closed_stdio()
    with SignalForwarder() as signals:
        try:
            status = signals.run(lambda: _run(args, command, signals, stdio))
        except Interrupted as e:  # a fourth signal while the third's kill was on its way
            status = 128 + e.signum
    sys.exit(status)


def _run(args: argparse.Namespace, command: List[str], signals: SignalForwarder, stdio: Mapping[str, int]) -> int:
    """Connect, run ``command`` and return the exit status; errors are told on stderr."""
    try:
        with _connection(args) as connection:
            return run_attached(connection, command, signals, stdio)
    except FileNotFoundError as e:
        print(f"remowt: {command[0]}: {e.strerror}", file=sys.stderr)
        return 127
    except PermissionError as e:
        print(f"remowt: {command[0]}: {e.strerror}", file=sys.stderr)
        return 126
    except RemowtError as e:
        print(f"remowt: {e}", file=sys.stderr)
        return 255
