#!/usr/bin/env python3
"""Run remowt's benchmarks side by side with its peers and print medians, ratios and PASS/MISS.

    python3 benchmarks/run.py            # full run
    python3 benchmarks/run.py --quick    # smoke run, a few seconds
    python3 benchmarks/run.py --only ping --only ssh-ping

See benchmarks/README.md for what each metric means.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import contenders as c
import ssh_contenders as s
import ssh_server
import transfer_contenders as t
from harness import (
    Contender,
    Factory,
    Group,
    GroupResult,
    Target,
    at_stall,
    print_group,
    print_summary,
    run_group,
    settle_allocator,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20


def round_trips(quick: bool) -> Dict[str, Any]:
    """The measuring plan of a round-trip group (microseconds)."""
    return dict(
        kind="latency",
        unit="us",
        scale=1e6,
        iterations=200 if quick else 2000,
        block=20 if quick else 100,
        warmup=20 if quick else 200,
    )


def spawns(quick: bool) -> Dict[str, Any]:
    """The measuring plan of a spawn-and-wait group (milliseconds)."""
    return dict(
        kind="latency",
        unit="ms",
        scale=1e3,
        iterations=30 if quick else 300,
        block=10 if quick else 25,
        warmup=3 if quick else 20,
    )


def ping_group(quick: bool) -> Group:
    return Group(
        name="ping",
        title="no-op call round trip",
        **round_trips(quick),
        contenders=[
            Contender("remowt local ping", c.remowt_local_ping, requires=("remowt",)),
            Contender("execnet popen echo", c.execnet_popen_echo, requires=("execnet",)),
            Contender("mitogen local call", c.mitogen_local_call, requires=("mitogen.master",)),
            Contender("remowt loopback ping", c.remowt_loopback_ping, requires=("remowt",), note="info only"),
        ],
        targets=[Target("remowt local ping", "execnet popen echo", 0.5)],
        detail="remowt: conn.ping(); execnet: channel send+receive of b'ping' on an echo loop; "
        "mitogen: context.call(noop)",
    )


def plugin_group(quick: bool) -> Group:
    return Group(
        name="plugin",
        title="no-op call to a plugin through the agent vs to the agent",
        **round_trips(quick),
        contenders=[
            Contender("remowt local plugin ping", c.remowt_local_plugin_ping, requires=("remowt",)),
            Contender("remowt local ping", c.remowt_local_ping, requires=("remowt",)),
            Contender("remowt local plugin noop", c.remowt_local_plugin_noop, requires=("remowt",), note="info only"),
        ],
        targets=[Target("remowt local plugin ping", "remowt local ping", 1.5)],
        detail="plugin ping: plugin(n).ping(), user → agent → plugin and back; ping: conn.ping() to the agent; "
        "plugin noop: a method of the plugin's own service (its worker pool)",
    )


def spawn_group(quick: bool) -> Group:
    return Group(
        name="spawn",
        title="spawn + wait of `true`",
        **spawns(quick),
        contenders=[
            Contender("remowt local spawn", c.remowt_local_spawn_true, requires=("remowt",)),
            Contender("subprocess.run", c.subprocess_run_true),
        ],
        targets=[Target("remowt local spawn", "subprocess.run", 1.5)],
        detail="remowt: conn.spawn(['true']).wait(); baseline: subprocess.run(['true'])",
    )


def throughput_group(quick: bool) -> Group:
    size = (16 if quick else 256) * MiB
    return Group(
        name="throughput",
        title="child stdout throughput",
        kind="throughput",
        iterations=3 if quick else 5,
        block=1,
        warmup=1,
        contenders=[
            Contender("remowt local stdout", c.remowt_local_stdout(size), requires=("remowt",)),
            Contender("raw pipe os.read", c.raw_pipe_stdout(size)),
        ],
        targets=[Target("remowt local stdout", "raw pipe os.read", 0.4)],
        detail=f"`head -c {size // MiB}MiB /dev/zero`, stdout=PIPE, read in 1 MiB chunks until EOF "
        "(timed from spawn to exit)",
    )


def run_group_(quick: bool) -> Group:
    return Group(
        name="run",
        title="remowt.run(['true']) vs subprocess.run(['true'])",
        **spawns(quick),
        contenders=[
            Contender("remowt.run", c.remowt_run_true, requires=("remowt",)),
            Contender("subprocess.run", c.subprocess_run_true),
        ],
        targets=[Target("remowt.run", "subprocess.run", 1.5)],
        detail="the drop-in on its default connection (a shared local agent), stdio inherited as subprocess does",
    )


def communicate_group(quick: bool) -> Group:
    size = (64 if quick else 1024) * MiB
    return Group(
        name="communicate",
        title="communicate() on a child's stdout",
        kind="throughput",
        iterations=2 if quick else 3,
        block=1,
        warmup=1,
        contenders=[
            Contender("remowt communicate", c.remowt_communicate_stdout(size), requires=("remowt",)),
            Contender("raw pipe os.read", c.raw_pipe_stdout(size)),
            Contender("subprocess communicate", c.subprocess_communicate_stdout(size), note="info only"),
        ],
        targets=[Target("remowt communicate", "raw pipe os.read", 0.4)],
        detail=f"`head -c {size // MiB}MiB /dev/zero`: remowt Popen(stdout=PIPE).communicate() "
        "vs reading the same child's pipe with os.read; subprocess's own communicate() for context",
    )


# --- ssh groups: every contender against the same sshd (ssh_server.py) ------------------

SSH = ("remowt",)  # what a remowt ssh contender needs besides the sshd


def ssh_contender(name: str, factory: Factory, requires: Sequence[str] = SSH, note: str = "") -> Contender:
    """A contender that also needs the run's sshd (skipped, with the reason, when it cannot start)."""
    return Contender(name, factory, requires=requires, note=note, unavailable=ssh_server.unavailable)


def ssh_connect_group(quick: bool) -> Group:
    return Group(
        name="ssh-connect",
        title="ssh: connect until ready",
        kind="latency",
        unit="ms",
        scale=1e3,
        iterations=5 if quick else 30,
        block=1,
        warmup=1,
        contenders=[
            ssh_contender("remowt connect (agent cached)", s.remowt_ssh_connect),
            ssh_contender("paramiko connect + exec true", s.paramiko_connect_exec, requires=("paramiko",)),
            ssh_contender("execnet ssh gateway start", s.execnet_ssh_start, requires=("execnet",), note="info only"),
            ssh_contender("mitogen ssh start", s.mitogen_ssh_start, requires=("mitogen.master",), note="info only"),
        ],
        targets=[Target("remowt connect (agent cached)", "paramiko connect + exec true", 1.5)],
        detail="remowt: remowt.connect() returning a ready connection, the agent already deployed (by the warm-up); "
        "paramiko: SSHClient.connect + exec_command('true') + recv_exit_status; execnet/mitogen: gateway/context "
        "start through the ssh command. Closing is not timed.",
    )


def ssh_spawn_group(quick: bool) -> Group:
    return Group(
        name="ssh-spawn",
        title="ssh: spawn + wait of `true` on an open connection",
        **spawns(quick),
        contenders=[
            ssh_contender("remowt spawn", s.remowt_ssh_spawn_true),
            ssh_contender("remowt conn.run", s.remowt_ssh_run_true),
            ssh_contender("paramiko exec_command", s.paramiko_exec_true_open, requires=("paramiko",)),
        ],
        targets=[
            Target("remowt spawn", "paramiko exec_command", 1.0),
            Target("remowt conn.run", "paramiko exec_command", 1.0),
        ],
        detail="remowt: conn.spawn(['true']).wait() and conn.run(['true'], check=True); "
        "paramiko: exec_command('true') + recv_exit_status() + channel close",
    )


def ssh_ping_group(quick: bool) -> Group:
    return Group(
        name="ssh-ping",
        title="ssh: no-op call round trip",
        **round_trips(quick),
        contenders=[
            ssh_contender("remowt ssh ping", s.remowt_ssh_ping),
            ssh_contender("paramiko cat echo", s.paramiko_cat_echo, requires=("paramiko",)),
            ssh_contender("execnet ssh echo", s.execnet_ssh_echo, requires=("execnet",)),
            ssh_contender("mitogen ssh call", s.mitogen_ssh_call, requires=("mitogen.master",)),
        ],
        targets=[Target("remowt ssh ping", "paramiko cat echo", 1.3)],
        detail="remowt: conn.ping(); paramiko: 16 bytes to an exec'd `cat` and back on one channel; "
        "execnet: channel send+receive of 16 bytes on an echo loop; mitogen: context.call(noop)",
    )


def ssh_plugin_group(quick: bool) -> Group:
    return Group(
        name="ssh-plugin",
        title="ssh: no-op call to a plugin through the agent vs to the agent",
        **round_trips(quick),
        contenders=[
            ssh_contender("remowt ssh plugin ping", s.remowt_ssh_plugin_ping),
            ssh_contender("remowt ssh ping", s.remowt_ssh_ping),
            ssh_contender("remowt ssh plugin noop", s.remowt_ssh_plugin_noop, note="info only"),
        ],
        targets=[Target("remowt ssh plugin ping", "remowt ssh ping", 1.5)],
        detail="as `plugin`, over ssh to the run's sshd",
    )


def ssh_throughput_group(quick: bool) -> Group:
    size = (32 if quick else 256) * MiB
    return Group(
        name="ssh-throughput",
        title="ssh: remote child stdout throughput",
        kind="throughput",
        iterations=3 if quick else 8,
        block=1,
        warmup=1,
        contenders=[
            ssh_contender("remowt ssh stdout", s.remowt_ssh_stdout(size)),
            ssh_contender(
                "paramiko read, 2 MiB window", s.paramiko_channel_read(size, 2 * MiB), requires=("paramiko",)
            ),
            ssh_contender(
                "paramiko read, 8 MiB window", s.paramiko_channel_read(size, 8 * MiB), requires=("paramiko",)
            ),
        ],
        targets=[
            Target("remowt ssh stdout", "paramiko read, 2 MiB window", 0.8, best_of=("paramiko read, 8 MiB window",))
        ],
        detail=f"remote `head -c {size // MiB}MiB /dev/zero`, read in 1 MiB chunks until EOF, timed from "
        "spawn/exec to exit status; aes128-gcm for both; paramiko gets a fresh connection (untimed) per transfer",
    )


def ssh_keystroke_group(quick: bool) -> Group:
    return Group(
        name="ssh-keystroke",
        title="ssh: keystroke echo through a terminal",
        **round_trips(quick),
        contenders=[
            ssh_contender("remowt ssh pty", s.remowt_ssh_keystroke),
            ssh_contender("openssh ssh -tt", s.openssh_tt_keystroke, requires=()),
        ],
        targets=[Target("remowt ssh pty", "openssh ssh -tt", 1.2)],
        detail=f"a key typed, the same key read back, from a remote `{s.ECHO_PROGRAM}` on a pty: remowt: "
        "conn.Popen(pty=True) stdin/stdout; openssh: the ssh client's stdin/stdout pipes",
    )


def ssh_forward_throughput_group(quick: bool) -> Group:
    size = (32 if quick else 256) * MiB
    return Group(
        name="ssh-forward-throughput",
        title="ssh: one forwarded TCP connection's throughput",
        kind="throughput",
        iterations=3 if quick else 8,
        block=1,
        warmup=1,
        contenders=[
            ssh_contender("remowt forward_local", s.forward_read(s.remowt_forward, size)),
            ssh_contender("openssh ssh -L", s.forward_read(s.openssh_forward, size), requires=()),
        ],
        targets=[Target("remowt forward_local", "openssh ssh -L", 0.8)],
        detail=f"a TCP server here sends {size // MiB} MiB of zeros to each connection, reached through a forward "
        "of a local port to it as the test host sees it (the sshd is on this machine); the client reads until EOF",
    )


def ssh_forward_connect_group(quick: bool) -> Group:
    return Group(
        name="ssh-forward-connect",
        title="ssh: connection set-up through a forward",
        kind="latency",
        unit="ms",
        scale=1e3,
        iterations=50 if quick else 300,
        block=1,
        warmup=5 if quick else 20,
        contenders=[
            ssh_contender("remowt forward_local", s.forward_connect(s.remowt_forward)),
            ssh_contender("openssh ssh -L", s.forward_connect(s.openssh_forward), requires=()),
        ],
        targets=[Target("remowt forward_local", "openssh ssh -L", 1.2)],
        detail="connect to the forwarded port until the one byte the server sends on accept arrives, then close",
    )


def _file_group(quick: bool, put: bool) -> Group:
    size = (64 if quick else 1024) * MiB
    way = "put" if put else "get"
    remowt = t.remowt_put(size) if put else t.remowt_get(size)
    return Group(
        name=f"ssh-{way}",
        title=f"ssh: {way} of one {size // MiB} MiB file",
        kind="throughput",
        iterations=2 if quick else 5,
        block=1,
        warmup=1,
        contenders=[
            ssh_contender(f"remowt {way}", remowt),
            ssh_contender(f"openssh scp {way}", t.openssh_scp(size, put), requires=()),
            ssh_contender(f"openssh sftp -b {way}", t.openssh_sftp(size, put), requires=()),
            ssh_contender(f"paramiko sftp {way}", t.paramiko_sftp(size, put), requires=("paramiko",)),
        ],
        targets=[
            Target(f"remowt {way}", f"openssh scp {way}", 1.0),
            Target(f"remowt {way}", f"paramiko sftp {way}", 3.0),
        ],
        detail=f"a file of random blocks to a new name on the same machine, as the test user: remowt conn.{way}() "
        "(atomic: synced and renamed) on an open connection; scp and sftp -b: one process per transfer (connect "
        f"included, as a user runs them); paramiko: SFTPClient.{way} on an open connection",
    )


def ssh_put_group(quick: bool) -> Group:
    return _file_group(quick, put=True)


def ssh_get_group(quick: bool) -> Group:
    return _file_group(quick, put=False)


def ssh_tree_group(quick: bool) -> Group:
    count, size = (2000 if quick else 10000), 4096
    return Group(
        name="ssh-tree",
        title=f"ssh: put of {count} files of 4 KiB",
        kind="throughput",
        iterations=2 if quick else 5,
        block=1,
        warmup=1,
        contenders=[
            ssh_contender("remowt put -r", t.remowt_put_tree(count, size)),
            ssh_contender("tar | ssh tar x", t.tar_over_ssh(count, size), requires=()),
        ],
        targets=[Target("remowt put -r", "tar | ssh tar x", 0.8)],
        detail=f"{count} files in 100 directories: remowt conn.put(recursive=True) on an open connection (each file "
        "synced and renamed into place) vs `tar c | ssh HOST 'mkdir DST && tar x -C DST'` (no syncs)",
    )


GROUPS: Dict[str, Callable[[bool], Group]] = {
    "ping": ping_group,
    "plugin": plugin_group,
    "spawn": spawn_group,
    "throughput": throughput_group,
    "run": run_group_,
    "communicate": communicate_group,
    "ssh-connect": ssh_connect_group,
    "ssh-spawn": ssh_spawn_group,
    "ssh-ping": ssh_ping_group,
    "ssh-plugin": ssh_plugin_group,
    "ssh-throughput": ssh_throughput_group,
    "ssh-keystroke": ssh_keystroke_group,
    "ssh-forward-throughput": ssh_forward_throughput_group,
    "ssh-forward-connect": ssh_forward_connect_group,
    "ssh-put": ssh_put_group,
    "ssh-get": ssh_get_group,
    "ssh-tree": ssh_tree_group,
}


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return "not importable"
    version = getattr(mod, "__version__", "?")
    if isinstance(version, tuple):
        version = ".".join(str(part) for part in version)
    return str(version)


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (modified)' if dirty else ''}" if rev else "unknown"


def print_environment(quick: bool, cold_malloc: bool) -> None:
    print(
        f"remowt benchmarks ({'quick' if quick else 'full'} mode"
        f"{', cold malloc' if cold_malloc else ''}), {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    print(f"  python {platform.python_version()} ({sys.executable}), {platform.platform()}, {os.cpu_count()} CPUs")
    print(
        f"  remowt {_version('remowt')} at {REPO} git {_git_revision()}; "
        f"execnet {_version('execnet')}; mitogen {_version('mitogen')}; paramiko {_version('paramiko')}; "
        f"{_openssh_version()}"
    )


def _openssh_version() -> str:
    """What ``ssh -V`` says (the ssh groups' sshd and the ssh command execnet and mitogen use)."""
    try:
        done = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "no ssh command"
    return (done.stderr or done.stdout).strip().split(",")[0] or "ssh -V said nothing"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations and small transfers (smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(GROUPS),
        metavar="NAME",
        help=f"run only this group (repeatable): {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--cold-malloc",
        action="store_true",
        help="do not settle glibc malloc's mmap threshold first (the raw pipe baseline then reads ~3x slower)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="dump stacks and exit if one setup or block of iterations takes longer (0: never; default 300)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # Benchmark the working tree, not whatever remowt may be installed.
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    if not args.cold_malloc:
        settle_allocator()
    print_environment(args.quick, args.cold_malloc)
    results: List[GroupResult] = []
    at_stall(ssh_server.stop)
    try:
        for name in args.only or list(GROUPS):
            group = GROUPS[name](args.quick)
            print(f"\nrunning {name} ...", file=sys.stderr, flush=True)
            results.append(run_group(group, stall_timeout=args.stall_timeout))
            print_group(results[-1])
            sys.stdout.flush()
    finally:
        t.cleanup()
        ssh_server.stop()
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
