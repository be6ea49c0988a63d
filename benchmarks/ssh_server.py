"""The one OpenSSH sshd every ssh contender of a run talks to (started on first use, stopped at the end).

It is the tests' fixture (``tests/sshd.py``): ``/usr/sbin/sshd`` on 127.0.0.1 on
a free port with its own host key, client key, known_hosts and ssh_config. All
contenders log in as the unprivileged test user through the alias
``remowt-test-host`` (root's login shell runs slower start-up files; a real host
is a normal user). It needs root and ``bash scripts/setup-test-host.sh``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
ALIAS = "remowt-test-host"

_server: Optional[Any] = None  # tests/sshd.py's SshServer, once started
_keys_dir: Optional[str] = None
_failure = ""


def server() -> Any:
    """The running sshd (an ``SshServer``), started on the first call; raises if it cannot run here."""
    global _server, _keys_dir, _failure
    if _server is not None:
        return _server
    if _failure:
        raise RuntimeError(_failure)
    if TESTS not in sys.path:
        sys.path.append(TESTS)  # after the repository and benchmarks/: nothing there is shadowed
    try:
        import sshd

        _keys_dir = tempfile.mkdtemp(prefix="remowt-bench-keys-")
        keys = sshd.ClientKeys(_keys_dir)
        started = sshd.SshServer(keys, log_level="INFO")
        try:
            started.start()
        except BaseException:
            started.stop()
            raise
    except Exception as e:
        _failure = f"no test sshd: {type(e).__name__}: {e}"
        stop()
        raise RuntimeError(_failure) from None
    _server = started
    print(f"  sshd on {started.host}:{started.port}, logs in {started.log_file}", file=sys.stderr)
    return _server


def unavailable() -> str:
    """Why the sshd cannot run here, or "" once it runs (a contender's availability check)."""
    try:
        server()
    except RuntimeError as e:
        return str(e)
    return ""


def stop() -> None:
    """Stop the sshd (if it runs) and remove its files and the client keys."""
    global _server, _keys_dir
    if _server is not None:
        _server.stop()
        _server = None
    if _keys_dir is not None:
        shutil.rmtree(_keys_dir, ignore_errors=True)
        _keys_dir = None
