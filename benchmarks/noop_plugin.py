"""The benchmarks' plugin: one no-op method, declared and served here (remowt's Python SDK).

Shipped by name with the benchmark's connection (``plugins=[this file]``);
the benchmark imports it for the declaration (``serve`` runs only as ``__main__``).
"""

from __future__ import annotations

from remowt.plugin import serve
from remowt.protocol.service import Service, rpc


class NoopApi(Service, namespace=300):
    @rpc(1)
    def noop(self) -> None:
        """Nothing, in the plugin's worker pool (a typical plugin method)."""
        raise NotImplementedError


class Noop(NoopApi):
    def noop(self) -> None:
        return None


if __name__ == "__main__":
    serve(Noop())
