"""Terminals: children on a pty (``pty=True``, ``open_shell``) and ``remowt ssh HOST`` / ``remowt local`` as a login
shell, driven in tmux as a person drives them: keys typed with ``send-keys``, the screen read with ``capture-pane``.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
from typing import Iterator, List

import pytest
from _util import wait_until
from sshd import SshServer
from tmuxpane import Pane

import remowt
from remowt.errors import BadArguments

pytestmark = pytest.mark.timeout(90)

TEST_PASSWORD = "remowt-test-password"  # scripts/setup-test-host.sh


# --- the Python face ----------------------------------------------------------------------


def test_a_child_on_a_terminal(any_conn: remowt.Remowt) -> None:
    result = any_conn.run(["sh", "-c", "tty; stty size; echo $TERM; echo to-stderr >&2"], pty=True, capture_output=True)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and result.stderr is None
    assert lines[0].startswith("/dev/pts/"), lines
    assert lines[3] == "to-stderr", lines  # stderr is the terminal too
    sized = any_conn.run(["stty", "size"], pty=remowt.Terminal(term="vt100", cols=132, rows=43), capture_output=True)
    assert sized.stdout == b"43 132\r\n"
    assert any_conn.check_output(["sh", "-c", "echo $TERM"], pty=remowt.Terminal(term="vt100")) == b"vt100\r\n"


def test_a_terminal_child_leads_its_session_and_gets_sigwinch(any_conn: remowt.Remowt) -> None:
    script = "trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done"
    process = any_conn.Popen(["bash", "-c", script], pty=remowt.Terminal(cols=80, rows=24), stdout=remowt.PIPE)
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == b"ready\r\n"
        process.resize(120, 50)
        assert process.stdout.readline() == b"50 120\r\n"
        session = any_conn.check_output(["ps", "-o", "sid=,tty=", "-p", str(process.pid)], text=True).split()
        assert session[0] == str(process.pid) and session[1].startswith("pts/"), session
    finally:
        process.kill()
        process.wait(timeout=20)


def test_open_shell_is_the_login_shell(any_conn: remowt.Remowt) -> None:
    shell = any_conn.open_shell(cols=90, rows=20)
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(b"echo $0 $((6*7)); stty size; pwd; exit 3\n")
    shell.stdin.flush()
    out = shell.stdout.read().decode(errors="replace")
    assert shell.wait(timeout=20) == 3
    home = any_conn.check_output(["sh", "-c", "echo $HOME"], text=True).strip()
    assert "-bash 42" in out and "20 90" in out and f"\n{home}\r" in out.replace("\r\n", "\r\n\n"), out


def test_terminal_arguments_are_checked(any_conn: remowt.Remowt) -> None:
    with pytest.raises(ValueError, match="stderr goes to the terminal"):
        any_conn.Popen(["true"], pty=True, stderr=remowt.PIPE)
    with pytest.raises(ValueError, match="output must be read"):
        any_conn.Popen(["true"], pty=True, stdout=remowt.DEVNULL)
    with pytest.raises(BadArguments, match="0x24 characters"):
        any_conn.run(["true"], pty=remowt.Terminal(cols=0), capture_output=True)
    process = any_conn.Popen(["sleep", "30"])
    try:
        with pytest.raises(BadArguments, match="has no terminal"):
            process.resize(80, 24)
    finally:
        process.kill()
        process.wait(timeout=20)


# --- the command line in a real terminal -------------------------------------------------------


@pytest.fixture(params=["local", "ssh"])
def login(request: pytest.FixtureRequest) -> List[str]:
    """The command line that opens a login shell there."""
    if request.param == "local":
        return ["remowt", "local"]
    sshd: SshServer = request.getfixturevalue("sshd")
    return ["remowt", "ssh", "-F", sshd.ssh_config, "remowt-test-host"]


def outer_shell(editor: str = "vi") -> Iterator[Pane]:
    """A tmux pane running a plain bash (prompt ``outer$``) with this test's PYTHONPATH and ``EDITOR``."""
    terminal = Pane()
    environment = f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} EDITOR={shlex.quote(editor)}"
    try:
        terminal.start(f"env -u VISUAL {environment} PS1='outer$ ' bash --norc --noprofile")
        terminal.wait_for("outer$")
        yield terminal
    finally:
        terminal.close()


@pytest.fixture
def pane() -> Iterator[Pane]:
    yield from outer_shell()


def shell_in(pane: Pane, argv: List[str]) -> None:
    """Start the login shell of ``argv`` in ``pane`` and wait for it to answer."""
    pane.line(
        "stty -g > /tmp/remowt-stty-before-$$; " + " ".join(shlex.quote(word) for word in argv) + "; echo exit=$?"
    )
    answer(pane, "echo hello-$((6*7))", "hello-42")


def answer(pane: Pane, line: str, expected: str) -> str:
    pane.line(line)
    return pane.wait_for(expected)


def test_login_shell_tty_and_size(pane: Pane, login: List[str]) -> None:
    shell_in(pane, login)
    answer(pane, "echo shell=$0; tty", "shell=-bash")
    assert "/dev/pts/" in pane.wait_for("/dev/pts/")
    answer(pane, "stty size", "30 100")
    pane.resize(90, 25)
    answer(pane, "stty size", "25 90")
    answer(pane, "exit 7", "exit=7")


def test_top_and_vi(pane: Pane, login: List[str]) -> None:
    shell_in(pane, login)
    pane.line("top -d 0.5")
    pane.wait_for("load average")
    pane.type("q")
    pane.wait_until(lambda screen: "load average" not in screen, "the shell back")  # what is typed ahead may go
    answer(pane, "echo after-top-$((1+1))", "after-top-2")
    pane.line("cd; rm -f remowt-vi.txt; vi remowt-vi.txt")
    pane.wait_for('"remowt-vi.txt" [New')  # vi's status line: it reads keys now
    pane.type("iwritten in vi")
    pane.keys("Escape")
    pane.type(":wq")
    pane.keys("Enter")
    pane.wait_until(lambda screen: "[New" not in screen, "the shell back")
    answer(pane, "cat remowt-vi.txt; echo; echo end-$((2+2))", "end-4")
    assert "\nwritten in vi\n" in pane.screen()
    answer(pane, "exit", "exit=0")


def _in_the_foreground(argv: List[str]) -> bool:
    """Whether a process running ``argv`` is its terminal's foreground job (keys typed now reach it, not the shell)."""
    wanted = "\0".join(argv) + "\0"
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline") as f:
                if f.read() != wanted:
                    continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if fields[2] == fields[5]:  # pgrp == tpgid: its group has the terminal
            return True
    return False


def test_job_control_and_ctrl_c(pane: Pane, login: List[str]) -> None:
    shell_in(pane, login)
    pane.line("sleep 4713")
    # Typed before the shell gave sleep the terminal, Ctrl-Z would go to the shell (which ignores it).
    assert wait_until(lambda: _in_the_foreground(["sleep", "4713"]), 10)
    pane.keys("C-z")
    pane.wait_for("Stopped")
    answer(pane, "bg", "sleep 4713 &")
    pane.line("fg")
    assert wait_until(lambda: _in_the_foreground(["sleep", "4713"]), 10)
    pane.keys("C-c")
    answer(pane, "echo status-$?", "status-130")
    pane.line("python3 -q")
    pane.wait_for(">>>")
    pane.line("while True: pass")
    pane.keys("Enter")
    pane.keys("C-c")
    pane.wait_for("KeyboardInterrupt")
    answer(pane, "print(6 * 7 + 1000)", "1042")
    pane.keys("C-d")
    answer(pane, "exit", "exit=0")


def test_terminal_restored_after_the_remote_shell_is_killed(pane: Pane, login: List[str]) -> None:
    shell_in(pane, login)
    pane.line("kill -KILL $$")
    pane.wait_for(f"exit={128 + signal.SIGKILL}")
    answer(pane, "stty -g | cmp - /tmp/remowt-stty-before-$$ && echo same-$((3+3))", "same-6")
    pane.line("rm /tmp/remowt-stty-before-$$")


def test_sudo_on_the_remote_terminal_does_not_echo(pane: Pane, sshd: SshServer) -> None:
    shell_in(pane, ["remowt", "ssh", "-F", sshd.ssh_config, "remowt-test-host"])
    pane.line("sudo -k; sudo id -u")
    pane.wait_for("password for remowt-test")
    pane.type(TEST_PASSWORD)
    pane.keys("Enter")
    screen = pane.wait_until(lambda screen: "\n0\n" in screen, "uid 0")  # sudo flushes what is typed ahead
    assert TEST_PASSWORD not in screen, screen
    answer(pane, "exit", "exit=0")


def test_sudo_option_opens_a_root_shell(pane: Pane, sshd: SshServer) -> None:
    pane.line(f"remowt ssh --sudo -F {shlex.quote(sshd.ssh_config)} remowt-test-host; echo exit=$?")
    pane.wait_for("assword")
    pane.type(TEST_PASSWORD)
    pane.keys("Enter")
    answer(pane, "echo uid-$(id -u) $0", "uid-0 -")
    assert TEST_PASSWORD not in pane.screen()
    answer(pane, "exit", "exit=0")


# --- the command line's words, as ssh takes them -------------------------------------------------------


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["remowt", *args], input=stdin, capture_output=True, timeout=60)


def test_ssh_command_words(sshd: SshServer) -> None:
    host = ["ssh", "-F", sshd.ssh_config, "remowt-test-host"]
    line = cli(*host, "echo $HOME; printf '%s|' a b | wc -c")
    assert (line.returncode, line.stdout, line.stderr) == (0, b"/home/remowt-test\n4\n", b"")
    assert cli(*host, "ls", "-ld", "/").stdout.startswith(b"dr")  # -l is ls's, not the login
    argv = cli(*host, "--", "printf", "%s|", "a b", "$HOME")
    assert argv.stdout == b"a b|$HOME|"  # after --: no shell
    assert cli(*host, "-n", "cat", stdin=b"not read\n").stdout == b""
    assert cli(*host, "exit 9").returncode == 9
    shell = cli(*host, stdin=b"echo from-stdin $0\n")  # no terminal here: a login shell reading stdin
    assert (shell.returncode, shell.stdout) == (0, b"from-stdin -bash\n"), shell


def test_sudo_as_root_locally() -> None:
    assert cli("local", "--sudo", "--", "id", "-u").stdout == b"0\n"


# --- the caller's editor for the target's files --------------------------------------------------------

SCRIPTED_EDITOR = """#!/bin/sh
# An editor as a test types into one: a line first, then the file as it was.
{ echo "edited here"; cat "$1"; } > "$1.new" && mv "$1.new" "$1"
"""


@pytest.fixture
def editor_pane(tmp_path: pathlib.Path) -> Iterator[Pane]:
    """A pane whose EDITOR (on the caller's side) is a scripted editor that puts "edited here" first."""
    script = tmp_path / "editor"
    script.write_text(SCRIPTED_EDITOR)
    script.chmod(0o755)
    yield from outer_shell(str(script))


def test_a_remote_git_commit_opens_the_callers_editor(editor_pane: Pane, login: List[str]) -> None:
    shell_in(editor_pane, login)
    editor_pane.line("rm -rf ~/remowt-repo && git init -q ~/remowt-repo && cd ~/remowt-repo")
    commit = "git -c user.name=t -c user.email=t@example.com commit -q --allow-empty"
    answer(editor_pane, f"{commit} && git log -1 --format=subject=%s", "subject=edited here")
    answer(editor_pane, "exit", "exit=0")


def test_edit_a_root_owned_file_with_sudo(editor_pane: Pane, sshd: SshServer, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "root-owned.conf"
    path.write_text("setting = 1\n")
    path.chmod(0o640)
    os.chown(path, 0, 0)
    tmp_path.chmod(0o755)
    before = path.stat()
    editor_pane.line(f"remowt edit --sudo -F {shlex.quote(sshd.ssh_config)} remowt-test-host:{path}; echo exit=$?")
    editor_pane.wait_for("assword")
    editor_pane.type(TEST_PASSWORD)
    editor_pane.keys("Enter")
    editor_pane.wait_for("exit=0")
    after = path.stat()
    assert path.read_text() == "edited here\nsetting = 1\n"
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, 0, 0)
    assert after.st_ino != before.st_ino  # replaced whole, not rewritten in place


def test_an_unchanged_file_is_not_rewritten(pane: Pane, sshd: SshServer) -> None:
    path = "/home/remowt-test/remowt-unchanged.txt"
    subprocess.run(["runuser", "-u", "remowt-test", "--", "sh", "-c", f"echo as it was > {path}"], check=True)
    before = os.stat(path)
    pane.line(f"EDITOR=true remowt edit -F {shlex.quote(sshd.ssh_config)} remowt-test-host:{path}; echo exit=$?")
    pane.wait_for("exit=0")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
