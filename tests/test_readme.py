"""The README's examples run as they are."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", README.read_text(), re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_example(code: str) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.timeout(60)
def test_shell_example_exits_with_the_commands_status() -> None:
    line = next(code for lang, code in BLOCKS if lang == "sh" and "remowt local" in code and "exit 7" in code)
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=50)
    assert out.stdout == "piped in\nexit status 7\n", out.stderr
