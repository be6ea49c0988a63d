"""The ``remowt`` command line, run as a separate process."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from typing import List, Tuple

import pytest
from _util import kill_quietly, proc_gone

pytestmark = pytest.mark.timeout(30)


def remowt_command() -> List[str]:
    """The installed console script (next to this Python first), else the entry point through ``-c``."""
    here = os.path.dirname(sys.executable)
    script = shutil.which("remowt", path=here) or shutil.which("remowt")
    if script is not None:
        return [script]
    return [sys.executable, "-c", "from remowt.cli import main; main()"]


REMOWT = remowt_command()


def remowt(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*REMOWT, *args], input=input, capture_output=True, timeout=25)


def test_stdin_stdout_and_exit_code_pass_through() -> None:
    result = remowt("local", "--", "sh", "-c", "cat; echo to-stderr >&2; exit 7", input=b"piped in\n")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"piped in\n", b"to-stderr\n")


def test_version_and_python_dash_m() -> None:
    import remowt as package

    assert remowt("--version").stdout == f"remowt {package.__version__}\n".encode()
    as_module = [sys.executable, "-m", "remowt", "local", "--", "sh", "-c", "echo as a module; exit 3"]
    result = subprocess.run(as_module, capture_output=True, timeout=25)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"as a module\n", b"")


def test_without_double_dash() -> None:
    result = remowt("local", "printf", "%s|", "a b", "--", "-x")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"a b|--|-x|", b"")


def test_large_output() -> None:
    size = 6 << 20
    result = remowt("local", "--", "head", "-c", str(size), "/dev/zero")
    assert (result.returncode, len(result.stdout), result.stdout.count(b"\0"), result.stderr) == (0, size, size, b"")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1], ids=lambda s: s.name)
def test_death_by_signal_is_128_plus_n(sig: signal.Signals) -> None:
    result = remowt("local", "--", "sh", "-c", f"echo before; kill -{int(sig)} $$")
    assert (result.returncode, result.stdout) == (128 + int(sig), b"before\n")


def test_missing_program_is_127() -> None:
    result = remowt("local", "--", "no-such-program-remowt-cli", "arg")
    assert result.returncode == 127
    assert result.stdout == b""
    message = result.stderr.decode()
    assert "no-such-program-remowt-cli" in message
    assert "No such file or directory" in message
    assert "Traceback" not in message


def test_not_executable_is_126(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "not-executable")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho never\n")
    os.chmod(path, 0o644)
    result = remowt("local", "--", path)
    assert result.returncode == 126
    assert "Permission denied" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_help() -> None:
    result = remowt("--help")
    assert result.returncode == 0
    out = result.stdout.decode()
    assert out.startswith("usage: remowt")
    assert "local" in out
    assert "Run processes on another machine" in out


def test_local_help() -> None:
    result = remowt("local", "--help")
    assert result.returncode == 0
    out = result.stdout.decode()
    assert out.startswith("usage: remowt local")
    assert "128+N" in out
    assert "ARGV" in out


def test_local_without_a_command_is_the_login_shell() -> None:
    result = remowt("local", input=b"echo $0; exit 4\n")  # stdin is no terminal: the shell reads it
    assert (result.returncode, result.stdout, result.stderr) == (4, b"-bash\n", b"")


def test_local_with_nothing_after_double_dash_is_a_usage_error() -> None:
    result = remowt("local", "--")
    assert result.returncode == 2
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith("usage: remowt")
    assert "give the command to run" in err


def test_no_subcommand_is_a_usage_error() -> None:
    result = remowt()
    assert result.returncode == 2
    assert result.stderr.decode().startswith("usage: remowt")


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = remowt("elsewhere", "--", "true")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr.decode()


def test_timeout_leaves_no_child() -> None:
    """``timeout`` signals the CLI (and then its process group): the child goes with it."""
    command = ["timeout", "2", *REMOWT, "local", "--", "sh", "-c", "echo $$; exec sleep 100"]
    result = subprocess.run(command, capture_output=True, timeout=25)
    child = int(result.stdout)
    try:
        assert (result.returncode, result.stderr) == (124, b"")
        assert proc_gone(child)
    finally:
        kill_quietly(child)


CLOSING = {"stdin": "<&-", "stdout": ">&-", "stderr": "2>&-", "all": "<&- >&- 2>&-"}
# Which of reading stdin, writing stdout and writing stderr failed ("1"), told in the file "report".
PROBE = "cat >/dev/null 2>&1; r=$?; echo out; o=$?; echo err >&2; e=$?; echo $((r>0)) $((o>0)) $((e>0)) >report; exit 3"


def probe(command: List[str], closing: str, directory: str) -> Tuple[int, bytes, bytes, str]:
    """Run ``command`` + the probe in ``directory`` with stdio closed by ``closing``: its status, output and report."""
    os.mkdir(directory)
    line = " ".join(shlex.quote(word) for word in [*command, "sh", "-c", PROBE])
    result = subprocess.run(
        ["sh", "-c", f"exec {line} {closing}"], stdin=subprocess.DEVNULL, capture_output=True, cwd=directory, timeout=10
    )
    with open(os.path.join(directory, "report")) as f:
        return result.returncode, result.stdout, result.stderr, f.read()


@pytest.mark.parametrize("closed", list(CLOSING))
def test_closed_stdio_is_closed_for_the_child(closed: str, tmp_path: os.PathLike[str]) -> None:
    """A closed fd 0, 1 or 2 does not hang the CLI; reading or writing there fails for the child as for a local one."""
    here = probe([], CLOSING[closed], os.path.join(tmp_path, "local"))
    there = probe([*REMOWT, "local", "--"], CLOSING[closed], os.path.join(tmp_path, "remote"))
    assert there == here


def test_cat_with_stdin_closed() -> None:
    """The issue's ``remowt local -- cat <&-``: cat fails to read (EBADF), as it does locally."""
    line = " ".join(shlex.quote(word) for word in [*REMOWT, "local", "--", "cat"])
    result = subprocess.run(["sh", "-c", f"exec {line} <&-"], capture_output=True, timeout=10)
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"Bad file descriptor" in result.stderr


def test_library_with_stdin_closed_does_not_read_the_agent_pipe() -> None:
    """The local agent's pipes never land on fds 0-2: a closed stdin is not taken for one of them (it stays closed)."""
    program = "import remowt; print(remowt.connect_local().run(['sh', '-c', 'cat; echo ran']).returncode)"
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-c", program], capture_output=True, timeout=10
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ran\n0\n", b"cat: -: Bad file descriptor\n")


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_stdin_the_child_does_not_read_is_left_to_the_next(where: str, request: pytest.FixtureRequest) -> None:
    """``while read l; do remowt local -- echo "$l"; done < file``: each child leaves the rest of the file alone."""
    target = ["local"]
    if where == "ssh":
        target = ["ssh", "-F", request.getfixturevalue("sshd").ssh_config, "remowt-test-host"]
    command = " ".join(shlex.quote(word) for word in [*REMOWT, *target, "--"])
    lines = "".join(f"line{i}\n" for i in range(5))
    result = subprocess.run(
        ["sh", "-c", f'while read l; do {command} echo "$l"; done'],
        input=lines.encode(),
        capture_output=True,
        timeout=25,
    )
    assert result.returncode == 0, result.stderr
    if where == "local":
        assert result.stdout == lines.encode()
    else:  # copied: the first child's copy reads ahead, so the loop ends early, but it ends
        assert lines.encode().startswith(result.stdout) and result.stdout.startswith(b"line0\n")


def test_a_terminal_as_stdin_is_the_childs_terminal() -> None:
    """``remowt local -- tty`` on a terminal names it, as ``tty`` run here does."""
    master, slave = os.openpty()
    try:
        here = subprocess.run(["tty"], stdin=slave, capture_output=True, timeout=10)
        there = subprocess.run([*REMOWT, "local", "--", "tty"], stdin=slave, capture_output=True, timeout=25)
    finally:
        os.close(slave)
        os.close(master)
    assert (there.returncode, there.stdout) == (0, here.stdout)
