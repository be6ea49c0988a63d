"""The systemd-in-namespaces fixture: two at once, and nothing left after they stop (a connection open or not)."""

from __future__ import annotations

import os

import pytest
from _util import proc_gone
from systemd_ns import SystemdNamespace, SystemdUnavailable

pytestmark = pytest.mark.timeout(60)


def _mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_two_at_once_and_nothing_left() -> None:
    try:
        first, second = SystemdNamespace(), SystemdNamespace()
    except SystemdUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with first, second:
        assert first.pid != second.pid and first.cgroup != second.cgroup
        for ns in (first, second):
            assert ns.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
            assert ns.run("hostname").stdout == "remowt-systemd\n"
        first.run("systemd-run", "--unit=left-running", "sleep", "infinity")
        first.write_unit("only-in-first.service", "[Service]\nExecStart=/bin/true\n")
        assert second.run("systemctl", "cat", "only-in-first.service", check=False).returncode != 0
        assert not os.path.exists("/etc/systemd/system/only-in-first.service")  # the overlay keeps it inside
        connection = first.connect()  # left open: stop() closes it
        assert connection.check_output(["hostname"]) == b"remowt-systemd\n"
        pids = [first.pid, second.pid]
        directories = [first.directory, second.directory]
        cgroups = [first.cgroup, second.cgroup]
    assert connection.closed
    assert all(proc_gone(pid) for pid in pids)
    assert not any(os.path.exists(path) for path in directories + cgroups)
    mounts = _mounts()
    assert not any(directory in mounts for directory in directories)
