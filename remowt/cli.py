"""The ``remowt`` command line."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import List, Optional

from . import client
from .errors import RemowtError

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remowt",
        description="Run processes on another machine (or this one) through a remowt agent.",
    )
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
    return parser


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_attached(connection: client.Remowt, argv: List[str]) -> int:
    """Run ``argv`` with this process's stdio wired through; return the shell-style exit status."""
    with connection.Popen(argv) as process:

        def forward(signum: int, frame: Optional[FrameType]) -> None:
            process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
        try:
            return exit_status(process.wait())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    argv: List[str] = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        parser.error(f"{args.command}: give the command to run after --")
    return argv


def main(argv: Optional[List[str]] = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    command = _argv(args, parser)
    try:
        with client.connect_local() as connection:
            status = run_attached(connection, command)
    except FileNotFoundError as e:
        print(f"remowt: {command[0]}: {e.strerror}", file=sys.stderr)
        status = 127
    except PermissionError as e:
        print(f"remowt: {command[0]}: {e.strerror}", file=sys.stderr)
        status = 126
    except RemowtError as e:
        print(f"remowt: {e}", file=sys.stderr)
        status = 255
    sys.exit(status)
