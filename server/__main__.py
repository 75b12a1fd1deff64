"""``python -m server``: the same as the ``sluice`` command."""

from server.cli import main

main()
