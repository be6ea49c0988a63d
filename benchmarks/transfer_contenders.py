"""Contenders of the file transfer groups: remowt put/get against scp, sftp, paramiko's SFTP and tar over ssh.

Everyone logs in to :mod:`ssh_server`'s sshd as the test user, as in
:mod:`ssh_contenders`. The files live in one work directory owned by the
test user (this machine is both ends): a big file of random blocks and a tree
of small files, made once per run. Each transfer writes a destination of its
own, removed after the clock stopped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Any, Dict, Iterator, List

import ssh_server
from harness import Factory, Operation, Then
from ssh_contenders import paramiko_client, remowt_connect

_work: Dict[str, str] = {}  # what was made: "dir", and "big-<size>" / "tree-<count>" paths


def _directory() -> str:
    """The run's work directory, owned by the test user (made on first use, removed by :func:`cleanup`)."""
    if "dir" not in _work:
        user = pwd.getpwnam(ssh_server.server().test_user)
        path = tempfile.mkdtemp(prefix="remowt-bench-files-", dir="/var/tmp")
        os.chmod(path, 0o755)
        os.chown(path, user.pw_uid, user.pw_gid)
        _work["dir"] = path
    return _work["dir"]


def _own(path: str) -> None:
    user = pwd.getpwnam(ssh_server.server().test_user)
    for directory, dirs, files in os.walk(path):
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)


def big_file(size: int) -> str:
    """A file of ``size`` bytes of random 1 MiB blocks, readable by the test user."""
    key = f"big-{size}"
    if key not in _work:
        path = os.path.join(_directory(), key)
        block = bytearray(os.urandom(1 << 20))
        with open(path, "wb") as f:
            for n in range(size >> 20):
                block[:8] = n.to_bytes(8, "big")
                f.write(block)
        _own(path)
        _work[key] = path
    return _work[key]


def small_tree(count: int, size: int) -> str:
    """A tree of ``count`` files of ``size`` bytes in 100 directories."""
    key = f"tree-{count}"
    if key not in _work:
        root = os.path.join(_directory(), key)
        for n in range(count):
            directory = os.path.join(root, f"d{n % 100:02}")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"f{n}"), "wb") as f:
                f.write(os.urandom(size))
        _own(root)
        _work[key] = root
    return _work[key]


def cleanup() -> None:
    """Remove the work directory."""
    path = _work.pop("dir", None)
    _work.clear()
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class _Destinations:
    """Fresh destination names in the work directory; each removed after its transfer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return os.path.join(_directory(), f"{self.name}-{self.count}")

    @staticmethod
    def remove(path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def _ssh(*argv: str) -> List[str]:
    return [argv[0], "-q", "-F", ssh_server.server().ssh_config, *argv[1:]]


def _moved(size: int, path: str) -> Then:
    return Then(size, lambda: _Destinations.remove(path))


# --- one big file ---------------------------------------------------------------


def remowt_put(size: int) -> Factory:
    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = big_file(size), _Destinations("remowt-put")
        with remowt_connect() as conn:

            def put() -> Then:
                target = names.next()
                conn.put(source, target)
                return _moved(size, target)

            yield put

    return factory


def remowt_get(size: int) -> Factory:
    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = big_file(size), _Destinations("remowt-get")
        with remowt_connect() as conn:

            def get() -> Then:
                target = names.next()
                conn.get(source, target)
                return _moved(size, target)

            yield get

    return factory


def openssh_scp(size: int, put: bool) -> Factory:
    """``scp -q FILE HOST:PATH`` (or the reverse): a process per transfer, as a user runs it."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = big_file(size), _Destinations("scp")

        def copy() -> Then:
            target = names.next()
            ends = [source, f"{ssh_server.ALIAS}:{target}"] if put else [f"{ssh_server.ALIAS}:{source}", target]
            subprocess.run(_ssh("scp", *ends), check=True, stdin=subprocess.DEVNULL)
            return _moved(size, target)

        yield copy

    return factory


def openssh_sftp(size: int, put: bool) -> Factory:
    """``sftp -b -`` with one ``put`` (or ``get``) command: a process per transfer."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = big_file(size), _Destinations("sftp")

        def copy() -> Then:
            target = names.next()
            command = f"{'put' if put else 'get'} {source} {target}\n".encode()
            subprocess.run(_ssh("sftp", "-b", "-", ssh_server.ALIAS), input=command, check=True, capture_output=True)
            return _moved(size, target)

        yield copy

    return factory


def paramiko_sftp(size: int, put: bool) -> Factory:
    """paramiko ``SFTPClient.put``/``get`` on an open connection."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = big_file(size), _Destinations("paramiko")
        with paramiko_client() as client:
            sftp: Any = client.open_sftp()
            try:

                def copy() -> Then:
                    target = names.next()
                    (sftp.put if put else sftp.get)(source, target)
                    return _moved(size, target)

                yield copy
            finally:
                sftp.close()

    return factory


# --- a tree of small files ------------------------------------------------------------


def remowt_put_tree(count: int, size: int) -> Factory:
    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = small_tree(count, size), _Destinations("remowt-tree")
        with remowt_connect() as conn:

            def put() -> Then:
                target = names.next()
                conn.put(source, target, recursive=True)
                return _moved(count * size, target)

            yield put

    return factory


def tar_over_ssh(count: int, size: int) -> Factory:
    """``tar c -C SRC . | ssh HOST 'mkdir DST && tar x -C DST'``."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        source, names = small_tree(count, size), _Destinations("tar-tree")

        def copy() -> Then:
            target = names.next()
            tar = subprocess.Popen(["tar", "c", "-C", source, "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            try:
                remote = f"mkdir {target} && tar x -C {target}"
                subprocess.run(_ssh("ssh", ssh_server.ALIAS, remote), stdin=tar.stdout, check=True)
            finally:
                tar.stdout.close()
                tar.wait()
            return _moved(count * size, target)

        yield copy

    return factory
