"""The client side of a remote child: what ``Remowt.spawn`` returns."""

from __future__ import annotations

import signal
from typing import Callable, Dict, List, Mapping, Optional

from ..endpoints.subprocess import SubprocessApi
from ..errors import ConnectionLost
from ..protocol.service import timed
from ..rpc.streams import Stream
from ..runtime.waiting import Flag, WaitOn, wait_on

OutputHandler = Callable[[Optional[Stream]], None]


class RemoteProcess:
    """A child running where the connection points.

    ``stdin``, ``stdout`` and ``stderr`` are :class:`~remowt.rpc.streams.Stream`
    objects for the pipes that were asked for, else None. ``returncode`` is
    None while the child runs, then its exit status (negative: the signal
    that killed it), as in :mod:`subprocess`.
    """

    def __init__(
        self,
        api: SubprocessApi,
        handle: int,
        args: List[str],
        stdin: Optional[Stream],
        stdout: Optional[Stream],
        stderr: Optional[Stream],
        outputs: Optional[Mapping[str, OutputHandler]] = None,
        wait_for_agent: WaitOn = wait_on,
    ) -> None:
        self.args = args
        self.handle = handle
        self.pid = -1
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: Optional[int] = None
        self._api = api
        self._exited = Flag()
        self._wait_for_agent = wait_for_agent  # how to wait for the exit that the agent's link brings
        self._lost: Optional[ConnectionLost] = None
        self._outputs: Dict[str, OutputHandler] = dict(outputs or {})

    def __repr__(self) -> str:
        return f"<RemoteProcess pid={self.pid} returncode={self.returncode} args={self.args!r}>"

    def output_opened(self, name: str, stream: Stream) -> bool:
        """Give a lazy output's stream to its handler; False if none waits for it."""
        handler = self._outputs.pop(name, None)
        if handler is None:
            return False
        handler(stream)
        return True

    def _end_outputs(self) -> None:
        """Lazy outputs that never opened will not: their handlers get None."""
        outputs, self._outputs = self._outputs, {}
        for handler in outputs.values():
            handler(None)

    def set_exited(self, returncode: int) -> None:
        self._end_outputs()
        self.returncode = returncode
        self._exited.set()

    def set_lost(self, error: ConnectionLost) -> None:
        if not self._exited.is_set():
            self._end_outputs()
            self._lost = error
            self._exited.set()

    def poll(self) -> Optional[int]:
        """The exit status if the child has exited, else None (no round trip)."""
        if self._lost is not None and self.returncode is None:
            raise self._lost
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the child to exit; ``TimeoutError`` after ``timeout`` seconds."""
        if not self._exited.wait(timeout, self._wait_for_agent):
            raise TimeoutError(f"{self.args!r} still running after {timeout} s")
        if self.returncode is None:
            assert self._lost is not None
            raise self._lost
        return self.returncode

    def send_signal(self, signum: int, timeout: Optional[float] = None) -> None:
        """Send ``signum`` to the child; nothing happens if it already exited.

        ``TimeoutError`` if the agent does not confirm within ``timeout``
        seconds (None: the connection's ``call_timeout``); the signal is
        then still delivered if the agent comes back.
        """
        if self.returncode is None:
            api = self._api if timeout is None else timed(self._api, timeout)
            api.send_signal(self.handle, int(signum))

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the child's process group (as a terminal does); nothing happens if it exited."""
        if self.returncode is None:
            self._api.signal_group(self.handle, int(signum))

    def resize(self, cols: int, rows: int) -> None:
        """Set the size of the child's terminal (it gets SIGWINCH); nothing happens if it exited."""
        if self.returncode is None:
            self._api.resize(self.handle, cols, rows)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Close the stdio streams this side holds."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
