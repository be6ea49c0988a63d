"""A real systemd for tests: PID 1 of new PID, mount, UTS, IPC and cgroup namespaces over a throw-away overlay of /.

PID 1 here need not be systemd: ``SystemdNamespace`` boots the machine's own
``/lib/systemd/systemd`` (Debian 12: systemd 252) as PID 1 of new namespaces.
Its root is an overlay whose lower layer is this machine's ``/`` and whose
upper layer is a tmpfs, so nothing written inside (unit files, the journal,
an agent's cache) reaches the host; ``/proc/sys`` and ``/sys`` are read-only,
so systemd runs in container mode and leaves the host's kernel settings
alone. The network is the host's: units that would serve on it (ssh) are
masked inside.

Readiness is an event, not a poll: systemd, started with ``NOTIFY_SOCKET``
pointing at a datagram socket of ours (bind-mounted inside), sends
``READY=1`` when start-up has finished (``systemctl is-system-running`` then
says ``running`` or ``degraded``); the message's credentials give its host
pid. Stopping sends SIGRTMIN+4 (poweroff: systemd stops its units and
exits, which ends the namespaces and their mounts), waits for the
``unshare`` parent to end, SIGKILLs PID 1 if it did not, and removes the
cgroup it ran in and the temporary directory: no namespace, mount or
process is left. Instances do not meet: each has its cgroup (named by our
pid and a count), its directory and its namespaces.

:meth:`SystemdNamespace.connect` reaches an agent inside through
:func:`remowt.connect_command` on ``nsenter`` (and ``runuser`` for the test
user), so ``conn.privileged`` escalates with the test user's sudo and
password inside the namespace. Needs root and what
``scripts/setup-test-host.sh`` installs (systemd, dbus, the test user).
"""

from __future__ import annotations

import array
import itertools
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, List, Optional

import remowt

TEST_USER = "remowt-test"
TEST_PASSWORD = "remowt-test-password"
SYSTEMD = "/lib/systemd/systemd"
SETUP_HINT = "run `bash scripts/setup-test-host.sh` as root to install it"
START_TIMEOUT = 30.0
#: The checkout whose remowt the tests import (seen at the same path inside).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(remowt.__file__)))
STOP_TIMEOUT = 20.0
#: Units masked inside: they would touch the network, the host's devices or files, or wait for a console.
MASKED = (
    "ssh.service sshd.service postgresql.service getty@tty1.service console-getty.service "
    "systemd-timesyncd.service systemd-journald-audit.socket systemd-pstore.service apt-daily.timer "
    "apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer "
    "man-db.timer remote-fs.target"
)

# PID 1 of the new PID namespace until it execs systemd: builds the overlay root, mounts what systemd needs,
# pivots into it. $BASE: an empty directory for the overlay's parts; $NOTIFY_DIR: the directory holding our
# notify socket, bind-mounted at /run/host-notify; $CHECKOUT: the remowt checkout the tests import.
_INIT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs -o mode=755 remowt-systemd "$BASE"
mkdir -p "$BASE/upper" "$BASE/work" "$BASE/root"
mount -t overlay overlay -o lowerdir=/,upperdir="$BASE/upper",workdir="$BASE/work" "$BASE/root"
R="$BASE/root"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
if [ -e "$R/proc/sysrq-trigger" ]; then
    mount --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
    mount -o remount,bind,ro "$R/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
mount -t mqueue mqueue "$R/dev/mqueue" || true
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
mkdir -p "$R/run/host-notify"
mount --bind "$NOTIFY_DIR" "$R/run/host-notify"
# The checkout the tests run (under /tmp, say, which is a new tmpfs inside), read-only at its own path.
mkdir -p "$R$CHECKOUT"
mount --bind "$CHECKOUT" "$R$CHECKOUT"
mount -o remount,bind,ro "$R$CHECKOUT"
for unit in $MASKED; do ln -sf /dev/null "$R/etc/systemd/system/$unit"; done
echo remowt-systemd > "$R/etc/hostname"
hostname remowt-systemd
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
cd /
export container=other NOTIFY_SOCKET=/run/host-notify/notify
exec "$SYSTEMD" --system --unit=basic.target --show-status=false
"""
UNSHARE = ("unshare", "--pid", "--mount", "--uts", "--ipc", "--fork", "--propagation", "private")
# Moves itself into our cgroup, then unshares the cgroup namespace so that cgroup is its root.
_ENTER_CGROUP = 'echo 0 > "$1/cgroup.procs" && exec unshare --cgroup /bin/sh -c "$2"'


_instances = itertools.count()


class SystemdUnavailable(RuntimeError):
    """This machine lacks what a systemd in namespaces needs (root, systemd, unshare, a cgroup2 hierarchy)."""


def cgroup2_mount() -> str:
    """Where the cgroup2 (unified) hierarchy is mounted: /sys/fs/cgroup on a pure v2 host, else its unified part."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup2":
                return fields[1]
    raise SystemdUnavailable("no cgroup2 hierarchy is mounted (systemd in a cgroup namespace needs one)")


def check_host() -> None:
    """Raise ``SystemdUnavailable`` naming what is missing."""
    if os.geteuid() != 0:
        raise SystemdUnavailable("a systemd in namespaces must be started as root")
    for tool in (SYSTEMD, "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/sbin/runuser", "/usr/bin/systemctl"):
        if not os.access(tool, os.X_OK):
            raise SystemdUnavailable(f"{tool} is not installed: {SETUP_HINT}")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        raise SystemdUnavailable(f"the test user {TEST_USER!r} does not exist: {SETUP_HINT}") from None


class SystemdNamespace:
    """A systemd booted in namespaces of its own; a context manager (see the module docstring)."""

    def __init__(self) -> None:
        check_host()
        self.directory = tempfile.mkdtemp(prefix="remowt-systemd-")
        self.cgroup = os.path.join(cgroup2_mount(), f"remowt-systemd-{os.getpid()}-{next(_instances)}")
        self.log_path = os.path.join(self.directory, "systemd.log")
        self.process: Optional[subprocess.Popen[bytes]] = None
        #: The host pid of the inner systemd (PID 1 inside), once it is ready.
        self.pid = 0
        # Connections made by connect(), closed before systemd stops: an nsenter outside the namespace reaps
        # its child inside, and the namespace ends only once every process in it was reaped.
        self._connections: List[remowt.Remowt] = []

    def __enter__(self) -> SystemdNamespace:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Boot systemd and return once it says start-up finished; a ``RuntimeError`` with its log if it does not."""
        notify_dir = os.path.join(self.directory, "notify")
        base = os.path.join(self.directory, "base")
        os.mkdir(notify_dir)
        os.mkdir(base)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            notify.bind(os.path.join(notify_dir, "notify"))
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            os.chmod(os.path.join(notify_dir, "notify"), 0o600)
            os.mkdir(self.cgroup)
            env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "BASE": base,
                "NOTIFY_DIR": notify_dir,
                "CHECKOUT": CHECKOUT,
            }
            env.update(MASKED=MASKED, SYSTEMD=SYSTEMD)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [*UNSHARE, "/bin/sh", "-c", _ENTER_CGROUP, "sh", self.cgroup, _INIT],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self.pid = self._wait_ready(notify, timeout)
        finally:
            notify.close()

    def _wait_ready(self, notify: socket.socket, timeout: float) -> int:
        """The pid that sent ``READY=1`` on ``notify`` (systemd, at the end of start-up)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        creds_size = array.array("i", [0, 0, 0]).itemsize * 3
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"systemd did not finish starting within {timeout:g} s:\n{self.log_text()}")
            notify.settimeout(min(left, 0.5))  # a bound for noticing that the namespace's init died instead
            try:
                data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except socket.timeout:
                if self.process.poll() is not None:
                    why = f"the namespace's init ended before systemd was ready:\n{self.log_text()}"
                    raise RuntimeError(why) from None
                continue
            if b"READY=1" in data.split(b"\n"):
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        return int(array.array("i", payload[:creds_size])[0])
                raise RuntimeError("systemd's READY=1 came without credentials")

    def log_text(self) -> str:
        """What the namespace's init and systemd wrote."""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def command(self, user: Optional[str] = TEST_USER) -> List[str]:
        """The argv prefix running a command inside, as ``user`` (None: root)."""
        argv = ["nsenter", "-t", str(self.pid), "-a"]
        return argv + (["runuser", "-u", user, "--"] if user else [])

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside as root, text output captured."""
        return subprocess.run([*self.command(None), *args], capture_output=True, text=True, check=check, timeout=60)

    def write_unit(self, name: str, text: str) -> None:
        """Write the unit file ``name`` inside (in /etc/systemd/system, on the overlay) and reload systemd."""
        argv = [*self.command(None), "/bin/sh", "-c", 'cat > "/etc/systemd/system/$1" && systemctl daemon-reload']
        subprocess.run([*argv, "sh", name], input=text, text=True, check=True, timeout=60)

    def connect(self, user: Optional[str] = TEST_USER, **kwargs: Any) -> remowt.Remowt:
        """A connection to an agent deployed and started inside as ``user`` (None: root); sudo's password is known."""
        kwargs.setdefault("prompter", lambda prompt: TEST_PASSWORD)
        kwargs.setdefault("escalation", "sudo")
        kwargs.setdefault("description", f"the agent in systemd's namespace as {user or 'root'}")
        connection = remowt.connect_command([*self.command(user), "/bin/sh", "-c"], **kwargs)
        self._connections.append(connection)
        return connection

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Power systemd off (SIGKILL after ``timeout``), then remove its cgroup and files; nothing is left."""
        for connection in self._connections:
            connection.close()
        process = self.process
        if process is not None and process.poll() is None:
            if self.pid:
                os.kill(self.pid, signal.SIGRTMIN + 4)  # poweroff: systemd stops its units and exits
            try:
                process.wait(timeout if self.pid else 0)
            except subprocess.TimeoutExpired:
                self._kill()
                process.wait(timeout)
        self._remove_cgroup(timeout)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _kill(self) -> None:
        """SIGKILL the unshare parent, PID 1 (the namespace's processes die with it) and whatever is in the cgroup."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
        kill = os.path.join(self.cgroup, "cgroup.kill")  # Linux 5.14 and later
        if os.path.exists(kill):
            with open(kill, "w") as f:
                f.write("1")

    def _remove_cgroup(self, timeout: float) -> None:
        """Wait until the cgroup tree systemd ran in is empty (its killed processes gone), then remove it."""
        if not os.path.isdir(self.cgroup):
            return
        if not _wait_unpopulated(os.path.join(self.cgroup, "cgroup.events"), timeout):
            raise RuntimeError(f"processes are left in {self.cgroup} {timeout:g} s after systemd ended")
        for root, dirs, _ in os.walk(self.cgroup, topdown=False):
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(self.cgroup)


def _wait_unpopulated(events: str, timeout: float) -> bool:
    """Whether the cgroup whose ``cgroup.events`` is ``events`` has no process left in its tree within ``timeout`` s.

    The kernel marks the file changed (POLLPRI) when ``populated`` changes.
    """
    deadline = time.monotonic() + timeout
    fd = os.open(events, os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while True:
            if b"populated 0" in os.pread(fd, 4096, 0).splitlines():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
    finally:
        os.close(fd)
