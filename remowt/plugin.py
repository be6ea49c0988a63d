"""Writing a plugin in Python: declare services, implement them, :func:`serve` them on stdio.

A plugin is a module (or a package with a ``__main__``) that the agent
starts (:mod:`remowt.endpoints.plugins`)::

    from remowt.plugin import serve
    from remowt.protocol.service import Service, rpc

    class Greeter(Service, namespace=200):
        @rpc(1)
        def greet(self, name: str) -> str: ...

    class GreeterImpl(Greeter):
        def greet(self, name: str) -> str:
            return f"hello {name}"

    if __name__ == "__main__":
        serve(GreeterImpl())

The client calls it through a proxy of the same declaration:
``conn.load_plugin("greeter").service(Greeter).greet("you")``. A handler
may call back whoever called it (:func:`caller_service`), accept the streams
its caller opened (:func:`accept_stream`) and open its own to it
(:func:`open_stream`; to anyone: :func:`router`'s), as the agent's services do. Handlers
run in the router's worker pool (``inline`` ones on the link's reader
thread); what a handler raises is the caller's error, ``OSError`` with its
errno. What the plugin writes to stderr (the :mod:`logging` module's
default) reaches the client's log, on a logger named for the plugin.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional, Type, TypeVar

from .endpoints.control import Control
from .endpoints.plugins import ADDRESS_ENV
from .errors import RemowtError
from .protocol import wire
from .protocol.service import Service, proxy
from .protocol.streamstate import DEFAULT_WINDOW
from .rpc.router import Router
from .rpc.streams import Stream
from .transports.base import Transport
from .transports.stdio import take_stdio

S = TypeVar("S", bound=Service)
LOG_ENV = "REMOWT_PLUGIN_LOG"
_running: Optional[Router] = None


def router() -> Router:
    """The router of the plugin that :func:`serve` runs in this process."""
    if _running is None:
        raise RuntimeError("no remowt plugin is serving in this process (call remowt.plugin.serve first)")
    return _running


def caller() -> str:
    """The address whose call this thread is handling (``user``, another plugin …)."""
    return router().caller()


def caller_service(declaration: Type[S], timeout: Optional[float] = None) -> S:
    """A typed proxy of ``declaration`` served by whoever made the call this thread is handling."""
    return proxy(declaration, router(), caller(), timeout)


def accept_stream(sid: int) -> Stream:
    """The stream ``sid`` that the caller of the current call opened to this plugin."""
    return router().accept_stream(caller(), sid)


def open_stream(window: int = DEFAULT_WINDOW) -> Stream:
    """A new stream to the caller of the current call; pass its ``sid`` to the caller to accept it."""
    return router().open_stream(caller(), window)


def serve(*implementations: Service, transport: Optional[Transport] = None) -> None:
    """Serve ``implementations`` as the address in ``$REMOWT_PLUGIN_ADDRESS`` until the link ends.

    The link is this process's stdin/stdout (``transport`` for tests). Its
    end is the end of the plugin: when the host unloads it or goes away,
    this returns.
    """
    global _running
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        raise RemowtError(f"${ADDRESS_ENV} is not set: a plugin is started by a remowt agent (conn.load_plugin)")
    try:
        wire.check_address(address)
    except ValueError as e:
        raise RemowtError(f"${ADDRESS_ENV}: {e}") from None
    logging.basicConfig(level=os.environ.get(LOG_ENV, "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s")
    node = Router(address)
    node.register(Control(address))
    for implementation in implementations:
        node.register(implementation)
    ended = threading.Event()
    node.on_link_closed(lambda link, reason: ended.set())
    _running = node
    try:
        node.add_link(transport if transport is not None else take_stdio(), name=f"{address}-upstream")
        ended.wait()
    finally:
        _running = None
        node.close()
