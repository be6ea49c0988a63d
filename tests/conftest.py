"""Fixtures: ``conn`` is a connection over each transport, closed after the test."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from typing import Dict, Iterator

import pytest

if importlib.util.find_spec("remowt") is None:  # plain ``pytest``: use the checkout these tests belong to
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _util import TRANSPORTS, make_connection
from sshd import ClientKeys, SshdUnavailable, SshServer

import remowt

# A shell starts a background job with SIGINT ignored, and every process the tests start would inherit that:
# the Ctrl-C tests would fail for the way the suite was started. A handler here is reset to the default at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=TRANSPORTS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def conn(transport_kind: str) -> Iterator[remowt.Remowt]:
    connection = make_connection(transport_kind)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def local_conn() -> Iterator[remowt.Remowt]:
    connection = remowt.connect_local()
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture(scope="session")
def ssh_client_keys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    """Client keys (one encrypted) authorized on every test sshd; fails if sshd is not set up."""
    try:
        return ClientKeys(str(tmp_path_factory.mktemp("ssh-client-keys")))
    except SshdUnavailable as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def sshd(ssh_client_keys: ClientKeys) -> Iterator[SshServer]:
    """A real sshd on 127.0.0.1: aliases remowt-test-host (test user) and remowt-test-root."""
    with SshServer(ssh_client_keys, "remowt-test-host", "remowt-test-root") as server:
        yield server


@pytest.fixture(scope="session")
def sshd_jump(sshd: SshServer, ssh_client_keys: ClientKeys) -> Iterator[SshServer]:
    """A second sshd (remowt-test-jump, logging forwards) whose ssh_config reaches ``sshd`` as remowt-behind-jump."""
    with SshServer(ssh_client_keys, "remowt-test-jump", "remowt-test-jump-root", log_level="DEBUG1") as server:
        server.add_behind(sshd, "remowt-behind-jump")
        yield server


@pytest.fixture
def private_sshd(ssh_client_keys: ClientKeys) -> Iterator[SshServer]:
    """An sshd of the test's own (aliases like ``sshd``), for tests that kill its sessions."""
    with SshServer(ssh_client_keys, "remowt-test-host", "remowt-test-root") as server:
        yield server


@pytest.fixture(params=["loopback", "local", "ssh"])
def any_conn(request: pytest.FixtureRequest) -> Iterator[remowt.Remowt]:
    """A connection over each transport, ssh included (to the session's test sshd)."""
    if request.param == "ssh":
        sshd: SshServer = request.getfixturevalue("sshd")
        connection = remowt.connect("remowt-test-host", ssh_config=sshd.ssh_config)
    else:
        connection = make_connection(request.param)
    with connection:
        yield connection


@pytest.fixture(scope="module")
def connections() -> Iterator[Dict[str, remowt.Remowt]]:
    """The connections a module's tests share, by kind (see ``_util.shared_connection``), closed at its end."""
    made: Dict[str, remowt.Remowt] = {}
    try:
        yield made
    finally:
        for connection in made.values():
            connection.close()
