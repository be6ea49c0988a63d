"""A bounded pool of worker threads for incoming calls."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple

from .interrupts import start

log = logging.getLogger("remowt.workers")
Job = Tuple[Callable[..., Any], Tuple[Any, ...]]


class WorkerPool:
    """Runs jobs on at most ``max_workers`` threads, started as they are needed."""

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers
        self.name = name
        self._jobs: Deque[Optional[Job]] = collections.deque()
        self._cond = threading.Condition()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; it runs as soon as a worker is free."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"worker pool {self.name} is shut down")
            self._jobs.append((fn, args))
            if self._idle > len(self._jobs) - 1:
                self._cond.notify()
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                start(thread)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if self._closed:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                job = self._jobs.popleft()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("job %r failed", fn)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop taking jobs, let queued ones finish, and join the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
