"""The node faces are typed through: mypy --strict --disallow-any-expr sees no Any in code that uses them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import List

import pytest

import remowt

USER_CODE = textwrap.dedent(
    """
    import remowt
    from remowt.endpoints.control import ControlApi

    conn = remowt.connect_local()
    reveal_type(conn.privileged)
    reveal_type(conn.privileged.check_output(["id", "-u"]))
    reveal_type(conn.check_output(["id"], text=True))
    reveal_type(conn.privileged.run(["true"]).stdout)
    reveal_type(conn.run("echo hi", shell=True, encoding="utf-8").stdout)
    reveal_type(conn.privileged.info().uid)
    reveal_type(conn.privileged.spawn(["true"]).wait())
    reveal_type(conn.privileged.service(ControlApi).ping())
    reveal_type(conn.privileged.cmd("id").arg("-u"))
    """
)
EXPECTED = [
    "remowt.user.privileged.Privileged",
    "bytes",
    "str",
    "bytes",
    "str",
    "int",
    "int",
    "None",
    "remowt.user.command.Command",
]


def revealed(output: str) -> List[str]:
    return [line.split('Revealed type is "', 1)[1].rstrip('"') for line in output.splitlines() if "Revealed" in line]


@pytest.mark.timeout(180)
def test_user_code_sees_precise_types_and_no_any(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "user_code.py")
    with open(path, "w") as f:
        f.write(USER_CODE)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(remowt.__file__)))
    mypy = [sys.executable, "-m", "mypy", "--strict", "--disallow-any-expr", "--follow-imports=silent"]
    checked = subprocess.run(
        [*mypy, "--no-incremental", "--config-file", os.devnull, path],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=repository,
    )
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert errors == [], checked.stdout
    assert revealed(checked.stdout) == EXPECTED, checked.stdout
