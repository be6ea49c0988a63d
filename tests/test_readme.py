"""The README's examples run as they are."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from sshd import SshServer

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", README.read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_example(code: str, request: pytest.FixtureRequest) -> None:
    if '"web1"' in code:
        request.getfixturevalue("web1_home")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.fixture
def web1_home(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home whose ~/.ssh/config makes ``web1`` the test sshd (as its unprivileged user), with its password file."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host web1\n    HostName {sshd.host}\n    Port {sshd.port}\n    User {sshd.test_user}\n"
        f"    IdentityFile {sshd.client_key}\n    UserKnownHostsFile {sshd.known_hosts}\n"
    )
    (tmp_path / ".config").mkdir()
    (tmp_path / ".config" / "web1-password").write_text(sshd.test_password + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.timeout(60)
def test_shell_example_exits_with_the_commands_status() -> None:
    line = next(code for lang, code in BLOCKS if lang == "sh" and "remowt local" in code and "exit 7" in code)
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=50)
    assert out.stdout == "piped in\nexit status 7\n", out.stderr


@pytest.mark.timeout(60)
def test_shell_example_ctrl_c_reaches_the_remote_child() -> None:
    line = next(code for lang, code in BLOCKS if lang == "sh" and "timeout --preserve-status" in code)
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=50)
    assert out.stdout == "exit status 130\n", out.stderr
