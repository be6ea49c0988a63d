"""The real ``subprocess.Popen``, taken before :func:`remowt.patch` can replace it.

remowt starts its own local processes (agents, children on the agent)
through this, so patching ``subprocess`` never makes remowt call itself.
"""

from subprocess import Popen

__all__ = ["Popen"]
