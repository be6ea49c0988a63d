"""The README's examples run as they are: the Python ones, and the shell commands but the test command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
from sshd import SshServer

import remowt

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", README.read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
WEB1 = [code for code in PYTHON if '"web1"' in code]
TEST_COMMAND = "bash scripts/test.sh\n"  # what runs this file: not run from it
SHELL = [code for lang, code in BLOCKS if lang == "sh" and code != TEST_COMMAND]
SET_UP = SHELL[0]
assert "venv" in SET_UP, "the first shell block of the README is the set-up command"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_example(code: str, request: pytest.FixtureRequest) -> None:
    if '"web1"' in code:
        request.getfixturevalue("web1_home")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", WEB1, ids=[f"web1-{i}" for i in range(len(WEB1))])
def test_python_example_logged_in_as_root(code: str, web1_root_home: Path) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def write_web1_home(home: Path, sshd: SshServer, user: str) -> None:
    """``home``'s ~/.ssh/config makes ``web1`` the test sshd as ``user``; ~/.config/web1-password holds the password."""
    (home / ".ssh").mkdir()
    (home / ".ssh" / "config").write_text(
        f"Host web1\n    HostName {sshd.host}\n    Port {sshd.port}\n    User {user}\n"
        f"    IdentityFile {sshd.client_key}\n    UserKnownHostsFile {sshd.known_hosts}\n"
    )
    (home / ".config").mkdir()
    (home / ".config" / "web1-password").write_text(sshd.test_password + "\n")


@pytest.fixture
def web1_home(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home whose ~/.ssh/config makes ``web1`` the test sshd as its unprivileged user."""
    write_web1_home(tmp_path, sshd, sshd.test_user)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def web1_root_home(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As ``web1_home``, but ``web1`` logs in as root (a reader who is root)."""
    write_web1_home(tmp_path, sshd, "root")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def run_shell(
    code: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None
) -> subprocess.CompletedProcess[str]:
    """``code`` run by bash with this interpreter's ``remowt`` and ``python3`` first on PATH."""
    bin_dir = os.path.dirname(sys.executable)
    environment = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], **(env or {})}
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=250, env=environment, cwd=cwd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", SHELL[1:], ids=[f"sh-{i}" for i in range(1, len(SHELL))])
def test_shell_example(code: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    env = {"REMOWT_BUNDLE_DIR": str(tmp_path / "bundle")}  # `remowt bundle add` writes there, not to the checkout
    if "web1" in code:
        env["HOME"] = str(request.getfixturevalue("web1_home"))
    out = run_shell(code, env)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(300)
def test_set_up_command_in_a_copy_of_the_checkout(tmp_path: Path) -> None:
    # as written: a venv of its own, remowt installed into it with its dependencies, then run
    copy = tmp_path / "remowt"
    ignored = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", "agent-*.tar.gz")
    shutil.copytree(ROOT, copy, ignore=ignored)
    out = run_shell(SET_UP, {"PYTHONPATH": ""}, cwd=copy)  # the copy's remowt, not the one under test
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"remowt {remowt.__version__}\n" in out.stdout
    assert os.uname().sysname in out.stdout  # uname -a, run through the agent


@pytest.mark.timeout(60)
def test_shell_example_exits_with_the_commands_status() -> None:
    line = next(code for code in SHELL if "remowt local" in code and "exit 7" in code)
    out = run_shell(line)
    assert out.stdout == "piped in\nexit status 7\n", out.stderr


@pytest.mark.timeout(60)
def test_shell_example_ctrl_c_reaches_the_remote_child() -> None:
    line = next(code for code in SHELL if "remowt local -- sleep 100" in code)
    out = run_shell(line)
    assert out.stdout == "exit status 130\n", out.stderr
