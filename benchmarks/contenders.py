"""One small function per contender.

Each function is a context manager: it sets the contender up, yields one
iteration of work as a no-argument callable (see :mod:`harness`), and tears
everything down afterwards. Peers are imported inside the functions so that a
missing peer only skips its own contenders (the runner checks ``requires``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any, Callable, Iterator

from harness import Factory, Operation

CHUNK = 1 << 20


# --- no-op round trips --------------------------------------------------------


@contextlib.contextmanager
def remowt_local_ping() -> Iterator[Operation]:
    """``conn.ping()`` against an agent running as a local child process."""
    import remowt

    with remowt.connect_local() as conn:
        yield conn.ping


@contextlib.contextmanager
def remowt_loopback_ping() -> Iterator[Operation]:
    """``conn.ping()`` against an agent on threads in this process (no pipes, no second process)."""
    import remowt

    with remowt.loopback() as conn:
        yield conn.ping


NOOP_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noop_plugin.py")


@contextlib.contextmanager
def plugin_calls(conn: Any, call: str) -> Iterator[Operation]:
    """On ``conn`` (a connection shipping :data:`NOOP_PLUGIN`): the plugin loaded, and ``call`` of it.

    ``ping``: the plugin's control ping (answered on its link's reader thread,
    as the agent answers its own); ``noop``: a method of its own service (in its worker pool).
    """
    from noop_plugin import NoopApi

    with conn, conn.load_plugin("noop_plugin") as plugin:
        yield plugin.ping if call == "ping" else plugin.service(NoopApi).noop


@contextlib.contextmanager
def remowt_local_plugin_ping() -> Iterator[Operation]:
    """``plugin.ping()``: a no-op call to plugin(n) of a local agent, through the agent."""
    import remowt

    with plugin_calls(remowt.connect_local(plugins=[NOOP_PLUGIN]), "ping") as call:
        yield call


@contextlib.contextmanager
def remowt_local_plugin_noop() -> Iterator[Operation]:
    """``NoopApi.noop()`` of plugin(n) of a local agent, through the agent."""
    import remowt

    with plugin_calls(remowt.connect_local(plugins=[NOOP_PLUGIN]), "noop") as call:
        yield call


ECHO_SOURCE = """
for item in channel:
    channel.send(item)
"""


@contextlib.contextmanager
def execnet_popen_echo() -> Iterator[Operation]:
    """execnet popen gateway; one send + receive of a small object on an echoing channel."""
    with execnet_echo("popen", b"ping") as echo:
        yield echo


@contextlib.contextmanager
def execnet_echo(spec: str, payload: bytes) -> Iterator[Operation]:
    """An execnet gateway made from ``spec``; one send + receive of ``payload`` on an echoing channel."""
    import execnet

    gateway = execnet.makegateway(spec)
    try:
        channel = gateway.remote_exec(ECHO_SOURCE)

        def echo() -> None:
            channel.send(payload)
            if channel.receive() != payload:
                raise RuntimeError("execnet echo returned something else")

        try:
            yield echo
        finally:
            channel.close()
    finally:
        gateway.exit()


@contextlib.contextmanager
def mitogen_local_call() -> Iterator[Operation]:
    """mitogen ``router.local()`` child; ``context.call(noop)`` of an importable module-level function."""
    import mitogen.master
    from mitogen_target import noop

    broker = mitogen.master.Broker()
    try:
        router = mitogen.master.Router(broker)
        context = router.local()

        def call() -> None:
            context.call(noop)

        yield call
    finally:
        broker.shutdown()
        broker.join()


# --- spawn + wait -------------------------------------------------------------


@contextlib.contextmanager
def remowt_local_spawn_true() -> Iterator[Operation]:
    """``conn.spawn(["true"]).wait()`` through a local agent."""
    import remowt

    with remowt.connect_local() as conn:

        def spawn() -> None:
            proc = conn.spawn(["true"])
            if proc.wait(timeout=30) != 0:
                raise RuntimeError(f"true exited {proc.returncode}")

        yield spawn


@contextlib.contextmanager
def subprocess_run_true() -> Iterator[Operation]:
    """``subprocess.run(["true"])`` in this process."""

    def spawn() -> None:
        subprocess.run(["true"], check=True)

    yield spawn


@contextlib.contextmanager
def remowt_run_true() -> Iterator[Operation]:
    """``remowt.run(["true"])``: the subprocess drop-in on its default connection (a local agent)."""
    import remowt

    remowt.default_connection()

    def run() -> None:
        remowt.run(["true"], check=True)

    try:
        yield run
    finally:
        from remowt.user.default import close_default_connection

        close_default_connection()


# --- child stdout throughput --------------------------------------------------


def head_argv(size: int) -> list[str]:
    return ["head", "-c", str(size), "/dev/zero"]


def read_stdout(conn: Any, size: int) -> int:
    """Spawn ``head -c size /dev/zero`` on ``conn`` (a remowt connection), read its stdout in 1 MiB reads."""
    import remowt

    proc = conn.spawn(head_argv(size), stdout=remowt.PIPE)
    stdout = proc.stdout
    if stdout is None:
        raise RuntimeError("spawn gave no stdout stream")
    total = 0
    try:
        while True:
            data = stdout.read(CHUNK)
            if not data:
                break
            total += len(data)
        proc.wait(timeout=60)
    finally:
        proc.close()
    if total != size:
        raise RuntimeError(f"read {total} bytes, expected {size}")
    return total


def remowt_local_stdout(size: int) -> Factory:
    """A factory reading ``size`` bytes of a child's stdout through a local agent."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        import remowt

        with remowt.connect_local() as conn:
            yield lambda: read_stdout(conn, size)

    return factory


def raw_pipe_stdout(size: int) -> Factory:
    """A factory reading ``size`` bytes of the same child via ``subprocess.Popen`` + ``os.read``."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        def read_all() -> int:
            with subprocess.Popen(head_argv(size), stdout=subprocess.PIPE, bufsize=0) as proc:
                if proc.stdout is None:
                    raise RuntimeError("Popen gave no stdout pipe")
                fd = proc.stdout.fileno()
                total = 0
                while True:
                    data = os.read(fd, CHUNK)
                    if not data:
                        break
                    total += len(data)
                proc.wait()
            if total != size:
                raise RuntimeError(f"read {total} bytes, expected {size}")
            return total

        yield read_all

    return factory


def _communicate(popen: Callable[..., Any], size: int) -> int:
    """Collect the stdout of a child writing ``size`` bytes with ``popen(...).communicate()``; the count, checked."""
    with popen(head_argv(size), stdout=subprocess.PIPE) as proc:
        out, _ = proc.communicate()
    if len(out) != size:
        raise RuntimeError(f"communicate gave {len(out)} bytes, expected {size}")
    return len(out)


def remowt_communicate_stdout(size: int) -> Factory:
    """A factory collecting ``size`` bytes of a child's stdout with ``remowt.Popen(...).communicate()``."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        import remowt

        with remowt.connect_local() as conn:
            yield lambda: _communicate(conn.Popen, size)

    return factory


def subprocess_communicate_stdout(size: int) -> Factory:
    """A factory collecting ``size`` bytes of the same child's stdout with CPython's own ``communicate()``."""

    @contextlib.contextmanager
    def factory() -> Iterator[Operation]:
        yield lambda: _communicate(subprocess.Popen, size)

    return factory
