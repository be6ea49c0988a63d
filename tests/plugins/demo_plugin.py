#!/usr/bin/env python3
"""The demo plugin written with remowt's Python SDK: :class:`DemoApi` served on stdio.

Shipped by name (``plugins=[demo_plugin.py, demo_api.py]``: the agent runs it
as a module, with its sibling importable) or loaded by path (executed as it
is: the ``#!`` line's Python, with the agent's code on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

from demo_api import BLOCK, DemoApi, DemoCallerApi

from remowt.plugin import accept_stream, caller_service, serve


class Demo(DemoApi):
    def __init__(self) -> None:
        self._blocks: Dict[int, bytes] = {}

    def noop(self) -> None:
        return None

    def echo(self, data: bytes) -> bytes:
        return data

    def whoami(self) -> Tuple[int, int]:
        return os.getuid(), os.getpid()

    def send_bytes(self, sid: int, size: int) -> None:
        stream = accept_stream(sid)
        try:
            for start in range(0, size, BLOCK):
                number = (start // BLOCK) % 256
                block = self._blocks.get(number)
                if block is None:
                    block = self._blocks[number] = bytes([number]) * BLOCK
                stream.write(block if size - start >= BLOCK else block[: size - start])
            stream.close_write()
        except BaseException:
            stream.close()
            raise

    def ask_caller(self, text: str) -> str:
        return "plugin heard " + caller_service(DemoCallerApi).shout(text)

    def crash(self, status: int) -> None:
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    print(f"demo plugin {os.environ.get('REMOWT_PLUGIN_ADDRESS')} starting", file=sys.stderr, flush=True)
    serve(Demo())
