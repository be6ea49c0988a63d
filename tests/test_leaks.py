"""Many connect/close cycles leave no threads, file descriptors or child processes behind."""

from __future__ import annotations

import gc
import os
import threading

import pytest
from _util import TRANSPORTS, children_of, fd_count, make_connection, thread_names, wait_until

from remowt import PIPE

CYCLES = 200


def one_cycle(kind: str) -> None:
    with make_connection(kind) as conn:
        assert conn.ping() < 5
        proc = conn.spawn(["echo", "cycle"], stdout=PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readall(timeout=10) == b"cycle\n"
        assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_connect_close_cycles_leak_nothing(kind: str) -> None:
    one_cycle(kind)  # whatever is made once and kept (imports, caches) is made now
    gc.collect()
    threads = threading.active_count()
    names = thread_names()
    fds = fd_count()
    children = children_of(os.getpid())

    for _ in range(CYCLES):
        one_cycle(kind)

    assert wait_until(lambda: threading.active_count() <= threads, 10), (
        f"{threading.active_count() - threads} threads more than before: {sorted(set(thread_names()) - set(names))}"
    )
    assert threading.active_count() == threads

    def fds_back() -> bool:
        gc.collect()
        return fd_count() <= fds

    assert wait_until(fds_back, 10), f"{fd_count() - fds} file descriptors more than before"
    assert fd_count() == fds
    assert wait_until(lambda: children_of(os.getpid()) <= children, 10), (
        f"children left: {sorted(children_of(os.getpid()) - children)}"
    )
