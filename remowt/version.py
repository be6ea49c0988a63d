"""remowt's version (the package's, the command's ``--version``)."""

__version__ = "0.1.0"
