"""``python -m remowt``: the ``remowt`` command."""

from .cli import main

main()
