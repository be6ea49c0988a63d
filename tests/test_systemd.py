"""conn.systemd against a real systemd: PID 1 of namespaces of its own (``systemd_ns``), the agent inside.

One systemd boots per module; ``conn`` is the test user's agent inside it
(``conn.privileged``: root through sudo and the test user's password), so
refusals are systemd's own. Units are written for each test under names of
their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Iterator, List

import pytest
from _util import children_of, wait_until
from systemd_ns import CHECKOUT, TEST_USER, SystemdNamespace, SystemdUnavailable

import remowt
from remowt.errors import AccessDenied, BadArguments, ConnectionLost, JobFailed, NoSuchUnit, SystemdError
from remowt.user.systemd import Journal, JournalEntry

pytestmark = pytest.mark.timeout(60)
SLEEPER = "[Unit]\nDescription=remowt test sleeper\n[Service]\nExecStart=/bin/sleep infinity\n"
FAILING = "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo failing-unit-says-hello; exit 3'\n"
# Each reload prints the line the test put in /run/<unit>.line: a line written to the unit's journal on demand.
RELOADER = (
    "[Service]\nExecStart=/bin/sleep infinity\n"
    "ExecReload=/bin/sh -c 'cat /run/remowt-test-reloader.line'\n"
    "[Install]\nWantedBy=multi-user.target\n"
)


@pytest.fixture(scope="module")
def ns() -> Iterator[SystemdNamespace]:
    try:
        namespace = SystemdNamespace()
    except SystemdUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    with namespace:
        for name, text in (
            ("remowt-test-sleeper.service", SLEEPER),
            ("remowt-test-failing.service", FAILING),
            ("remowt-test-reloader.service", RELOADER),
        ):
            namespace.write_unit(name, text)
        namespace.run("systemctl", "start", "dbus.service")  # else only the first client of the bus starts it
        yield namespace


@pytest.fixture(scope="module")
def conn(ns: SystemdNamespace) -> Iterator[remowt.Remowt]:
    with ns.connect() as connection:
        yield connection


def entries_until(journal: Journal, text: str) -> List[JournalEntry]:
    """Entries from ``journal`` up to the first whose message is ``text`` (waits for it; the test's timeout bounds)."""
    seen: List[JournalEntry] = []
    while True:
        entry = journal.next_entry()
        assert entry is not None, f"the journal ended before {text!r}; saw {[e.message for e in seen]}"
        seen.append(entry)
        if entry.message == text:
            return seen


def test_the_agent_runs_inside_as_the_test_user(conn: remowt.Remowt) -> None:
    assert conn.check_output(["id", "-un"], text=True).strip() == TEST_USER
    assert conn.check_output(["systemctl", "is-system-running"], text=True).strip() in ("running", "degraded")
    assert conn.privileged.check_output(["id", "-u"], text=True).strip() == "0"


def test_list_units(conn: remowt.Remowt) -> None:
    units = {unit.unit: unit for unit in conn.systemd.units()}
    assert (units["dbus.service"].load, units["dbus.service"].active, units["dbus.service"].sub) == (
        "loaded",
        "active",
        "running",
    )
    conn.privileged.systemd.start("remowt-test-sleeper.service")
    try:
        listed = conn.systemd.units("remowt-test-*")
        assert [(u.unit, u.active, u.sub, u.description) for u in listed] == [
            ("remowt-test-sleeper.service", "active", "running", "remowt test sleeper")
        ]
    finally:
        conn.privileged.systemd.stop("remowt-test-sleeper.service")
    assert conn.systemd.units("no-such-*.service", all=True) == []


def test_properties_and_status(conn: remowt.Remowt) -> None:
    props = conn.systemd.properties("remowt-test-sleeper.service", "Description", "FragmentPath", "ActiveState")
    assert props == {
        "Description": "remowt test sleeper",
        "FragmentPath": "/etc/systemd/system/remowt-test-sleeper.service",
        "ActiveState": props["ActiveState"],
    }
    assert "ExecStart" in conn.systemd.properties("remowt-test-sleeper.service")
    status = conn.systemd.status("dbus.service")
    assert (status.unit, status.load, status.active, status.sub) == ("dbus.service", "loaded", "active", "running")
    assert status.main_pid > 0
    with pytest.raises(NoSuchUnit, match=r"no-such-unit\.service"):
        conn.systemd.status("no-such-unit.service")


def test_start_restart_stop_as_root(conn: remowt.Remowt) -> None:
    systemd = conn.privileged.systemd
    started = systemd.start("remowt-test-sleeper.service")
    assert (started.result, started.active, started.unit_result) == ("done", "active", "success")
    first = systemd.status("remowt-test-sleeper.service").main_pid
    assert conn.privileged.check_output(["cat", f"/proc/{first}/comm"], text=True) == "sleep\n"
    assert systemd.restart("remowt-test-sleeper.service").active == "active"
    second = systemd.status("remowt-test-sleeper.service").main_pid
    assert second not in (0, first)
    stopped = systemd.stop("remowt-test-sleeper.service")
    assert (stopped.result, stopped.active) == ("done", "inactive")
    assert systemd.status("remowt-test-sleeper.service").main_pid == 0


def test_the_unprivileged_agent_is_refused_and_privileged_succeeds(conn: remowt.Remowt) -> None:
    with pytest.raises(AccessDenied, match=r"conn\.privileged") as refused:
        conn.systemd.start("remowt-test-sleeper.service")
    assert "remowt-test-sleeper.service" in str(refused.value)
    assert conn.systemd.status("remowt-test-sleeper.service").active == "inactive"
    assert conn.privileged.systemd.start("remowt-test-sleeper.service").active == "active"
    with pytest.raises(AccessDenied):
        conn.systemd.stop("remowt-test-sleeper.service")
    conn.privileged.systemd.stop("remowt-test-sleeper.service")


def test_a_failing_unit_reports_its_job_result_and_journal(conn: remowt.Remowt) -> None:
    with pytest.raises(JobFailed) as failed:
        conn.privileged.systemd.start("remowt-test-failing.service")
    error = failed.value
    assert (error.unit, error.verb, error.result, error.unit_result) == (
        "remowt-test-failing.service",
        "start",
        "failed",
        "exit-code",
    )
    assert "job failed (unit result exit-code)" in str(error)
    assert conn.systemd.status("remowt-test-failing.service").active == "failed"
    with conn.privileged.systemd.journal("remowt-test-failing.service") as journal:
        messages = [entry.message for entry in journal]
    assert "failing-unit-says-hello" in messages
    assert "remowt-test-failing.service: Failed with result 'exit-code'." in messages
    with conn.privileged.systemd.journal("remowt-test-failing.service", lines=1) as journal:
        assert len(list(journal)) == 1


def test_job_results_other_than_failed(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    with pytest.raises(JobFailed) as failed:
        conn.privileged.systemd.reload("remowt-test-reloader.service")  # not running
    assert (failed.value.result, failed.value.verb) == ("invalid", "reload")
    needs = "remowt-test-failing.service"
    dependent = f"[Unit]\nRequires={needs}\nAfter={needs}\n[Service]\nExecStart=/bin/sleep infinity\n"
    ns.write_unit("remowt-test-dependent.service", dependent)
    with pytest.raises(JobFailed) as failed:
        conn.privileged.systemd.start("remowt-test-dependent.service")
    assert failed.value.result == "dependency"


def test_no_such_unit_for_jobs(conn: remowt.Remowt) -> None:
    with pytest.raises(NoSuchUnit, match=r"no-such-unit\.service"):
        conn.privileged.systemd.start("no-such-unit.service")
    with pytest.raises(NoSuchUnit, match=r"no-such-unit\.service"):
        conn.privileged.systemd.enable("no-such-unit.service")


def test_a_job_past_its_timeout(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    ns.write_unit("remowt-test-slow.service", "[Service]\nType=oneshot\nExecStart=/bin/sleep 600\n")
    systemd = conn.privileged.systemd
    with pytest.raises(TimeoutError, match=r"did not end within 0\.5 s"):
        systemd.start("remowt-test-slow.service", timeout=0.5)
    assert systemd.status("remowt-test-slow.service").active == "activating"  # systemd keeps the job
    stopped = systemd.stop("remowt-test-slow.service")  # the start job is cancelled, its sleep killed
    assert (stopped.result, stopped.active, stopped.unit_result) == ("done", "failed", "signal")


def test_enable_disable_reload_and_daemon_reload(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    systemd = conn.privileged.systemd
    systemd.enable("remowt-test-reloader.service")
    assert systemd.status("remowt-test-reloader.service").unit_file_state == "enabled"
    systemd.disable("remowt-test-reloader.service")
    assert systemd.status("remowt-test-reloader.service").unit_file_state == "disabled"
    with pytest.raises(AccessDenied):
        conn.systemd.enable("remowt-test-reloader.service")
    path = "/etc/systemd/system/remowt-test-edited.service"
    conn.privileged.path(path).write_text("[Unit]\nDescription=first\n[Service]\nExecStart=/bin/true\n")
    systemd.daemon_reload()
    assert systemd.status("remowt-test-edited.service").description == "first"
    conn.privileged.path(path).write_text("[Unit]\nDescription=second\n[Service]\nExecStart=/bin/true\n")
    systemd.daemon_reload()
    assert systemd.status("remowt-test-edited.service").description == "second"


def test_follow_delivers_lines_as_written_and_stops_on_close(conn: remowt.Remowt) -> None:
    systemd = conn.privileged.systemd
    line = conn.privileged.path("/run/remowt-test-reloader.line")
    systemd.start("remowt-test-reloader.service")
    try:
        with systemd.journal("remowt-test-reloader.service", lines=0, follow=True) as journal:
            for n in range(3):
                line.write_text(f"follow-line-{n}\n")
                systemd.reload("remowt-test-reloader.service")
                seen = entries_until(journal, f"follow-line-{n}")
                assert all(not e.message.startswith("follow-line-") for e in seen[:-1])
            assert seen[-1].unit == "remowt-test-reloader.service" and seen[-1].pid > 0
            closer = threading.Timer(0.2, journal.close)  # close while the caller waits for the next line
            closer.start()
            while journal.next_entry() is not None:  # what is left of the last reload's messages, then the end
                pass
            closer.join()
        assert journal.process.returncode is not None
        assert journal.next_entry() is None  # closed: the end, again
        journal.close()
        assert "journalctl" not in conn.privileged.check_output(["ps", "-eo", "comm"], text=True).split()
    finally:
        systemd.stop("remowt-test-reloader.service")


def test_a_lost_link_ends_a_follow(ns: SystemdNamespace) -> None:
    connection = ns.connect()
    with connection:
        journal = connection.privileged.systemd.journal("dbus.service", lines=0, follow=True)
        agent = connection.info().pid  # as the namespace numbers it
        killer = threading.Timer(0.2, ns.run, ("kill", "-KILL", str(agent)))
        killer.start()
        with pytest.raises(ConnectionLost):
            journal.next_entry()
        killer.join()
    # the agent's watchdog kills its children when it dies: no event reaches us for that, so poll
    assert wait_until(lambda: "journalctl" not in ns.run("ps", "-eo", "comm").stdout.split(), 10)


def test_a_transient_unit_outlives_the_connection(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    with ns.connect() as first:
        unit = first.privileged.systemd.run(
            ["/bin/sh", "-c", "echo transient-says-$GREETING; exec sleep infinity"],
            env={"GREETING": "hi"},
            description="remowt transient test",
        )
        pid = first.privileged.systemd.status(unit).main_pid
    assert unit.startswith("remowt-run-") and unit.endswith(".service")
    with ns.connect() as second:
        status = second.privileged.systemd.status(unit)
        assert (status.active, status.main_pid, status.description) == ("active", pid, "remowt transient test")
        assert status.unit in {u.unit for u in second.systemd.units("remowt-run-*")}
        cgroup = second.check_output(["cat", f"/proc/{pid}/cgroup"], text=True)
        assert f"/system.slice/{unit}" in cgroup
        with second.privileged.systemd.journal(unit) as journal:
            assert "transient-says-hi" in [entry.message for entry in journal]
        second.privileged.systemd.stop(unit)
    assert conn.systemd.units(unit, all=True) == []  # a stopped transient unit is gone


def test_a_scope_runs_the_command_in_its_own_cgroup(conn: remowt.Remowt) -> None:
    process = conn.privileged.systemd.scope(["cat", "/proc/self/cgroup"], unit="remowt-test.scope", stdout=remowt.PIPE)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert out.decode().strip().endswith("/remowt-test.scope")


def test_the_user_manager(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    with ns.connect(None) as root, pytest.raises(SystemdError, match="has no --user manager"):
        root.systemd.user.units()  # root has no --user manager running
    uid = conn.info().uid
    ns.run("systemctl", "start", f"user@{uid}.service")
    try:
        user = conn.systemd.user
        unit = user.run(["/bin/sh", "-c", "echo user-unit-here; exec sleep infinity"], unit="remowt-user-test.service")
        assert user.status(unit).active == "active"
        assert user.stop(unit).active == "inactive"
        with pytest.raises(NoSuchUnit):
            user.start("no-such-unit.service")
    finally:
        ns.run("systemctl", "stop", f"user@{uid}.service")


@pytest.mark.parametrize("name", ["", "-x.service", "a/b.service", "a\nb.service", "x" * 300])
def test_bad_unit_names(conn: remowt.Remowt, name: str) -> None:
    with pytest.raises(BadArguments, match="not a unit name"):
        conn.systemd.start(name)
    with pytest.raises(BadArguments, match="not a unit name"):
        conn.systemd.status(name)
    with pytest.raises(BadArguments, match="not a unit name"):
        conn.systemd.journal(name)


def test_bad_arguments(conn: remowt.Remowt) -> None:
    with pytest.raises(BadArguments, match="timeout must be > 0"):
        conn.systemd.start("dbus.service", timeout=0)
    with pytest.raises(BadArguments, match="not a property name"):
        conn.systemd.properties("dbus.service", "Active-State")
    with pytest.raises(BadArguments, match="argv is empty"):
        conn.privileged.systemd.run([])
    with pytest.raises(BadArguments, match="one line each"):
        conn.privileged.systemd.run(["true"], description="two\nlines")
    with pytest.raises(BadArguments, match="no unit"):
        conn.privileged.systemd.enable()
    with pytest.raises(ValueError, match="lines must be >= 0"):
        conn.systemd.journal("dbus.service", lines=-1)
    with pytest.raises(BadArguments):  # not one of the verbs
        conn.systemd.job("kill", "dbus.service")  # type: ignore[arg-type]


def _cli(ns: SystemdNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    """``remowt ARGS`` run inside the namespace as root (this checkout, this Python)."""
    argv = ["env", f"PYTHONPATH={CHECKOUT}", sys.executable, "-m", "remowt", *args]
    return ns.run(*argv, check=False)


def test_cli(ns: SystemdNamespace) -> None:
    status = _cli(ns, "unit", "local", "status", "dbus.service")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("dbus.service - D-Bus System Message Bus\n")
    assert "  Active: active (running), result success\n" in status.stdout
    started = _cli(ns, "unit", "local", "start", "remowt-test-sleeper.service")
    assert (started.returncode, started.stdout) == (0, "start remowt-test-sleeper.service: done (now active)\n")
    assert _cli(ns, "unit", "local", "stop", "remowt-test-sleeper.service").returncode == 0
    assert _cli(ns, "unit", "local", "status", "remowt-test-sleeper.service").returncode == 3
    missing = _cli(ns, "unit", "local", "status", "no-such-unit.service")
    assert (missing.returncode, missing.stdout) == (4, "")
    assert "no-such-unit.service not found" in missing.stderr
    failed = _cli(ns, "unit", "local", "restart", "remowt-test-failing.service")
    assert failed.returncode == 1 and "job failed (unit result exit-code)" in failed.stderr
    logs = _cli(ns, "unit", "local", "logs", "remowt-test-failing.service")
    assert logs.returncode == 0
    assert any(line.endswith("]: failing-unit-says-hello") for line in logs.stdout.splitlines())


def test_cli_logs_follow_ends_on_ctrl_c(ns: SystemdNamespace) -> None:
    argv = ["env", f"PYTHONPATH={CHECKOUT}", sys.executable, "-m", "remowt", "unit", "local", "logs", "-f"]
    follow = subprocess.Popen(
        [*ns.command(None), *argv, "-n", "1", "dbus.service"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert follow.stdout is not None
        assert "dbus" in follow.stdout.readline()  # the last entry: it follows now
        (cli,) = children_of(follow.pid)  # nsenter's child inside: the CLI, as the host numbers it
        os.kill(cli, signal.SIGINT)
        assert follow.wait(timeout=30) == 0, follow.communicate()[1]
    finally:
        follow.kill()
        follow.wait()
    assert wait_until(lambda: "journalctl" not in ns.run("ps", "-eo", "comm").stdout.split(), 10)


def test_without_systemd_the_error_says_so() -> None:
    if os.path.exists("/run/systemd/system"):
        pytest.skip("systemd runs this machine")
    with remowt.connect_local() as conn, pytest.raises(SystemdError, match="not been booted with systemd"):
        conn.systemd.units()


def test_an_interrupted_job_leaves_the_connection_serving(ns: SystemdNamespace, conn: remowt.Remowt) -> None:
    ns.write_unit("remowt-test-interrupted.service", "[Service]\nType=oneshot\nExecStart=/bin/sleep 600\n")
    systemd = conn.privileged.systemd

    def ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # a real signal while the caller waits for the job
        with pytest.raises(KeyboardInterrupt):
            systemd.start("remowt-test-interrupted.service", timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    conn.ping()
    assert systemd.status("remowt-test-interrupted.service").active == "activating"  # the job goes on
    assert systemd.stop("remowt-test-interrupted.service").result == "done"


def test_a_lost_link_during_a_job(ns: SystemdNamespace) -> None:
    ns.write_unit("remowt-test-lost.service", "[Service]\nType=oneshot\nExecStart=/bin/sleep 600\n")
    connection = ns.connect(None)  # root: the job runs in this agent, which is killed outright
    with connection:
        agent = connection.info().pid
        killer = threading.Timer(0.3, ns.run, ("kill", "-KILL", str(agent)))
        killer.start()
        with pytest.raises(ConnectionLost):
            connection.systemd.start("remowt-test-lost.service", timeout=60)
        killer.join()

    def systemctl_gone() -> bool:  # the dead agent's watchdog kills it: no event reaches us for that
        return "systemctl" not in ns.run("ps", "-eo", "comm").stdout.split()

    assert wait_until(systemctl_gone, 10)
    ns.run("systemctl", "stop", "remowt-test-lost.service")
