"""``python -m flstore_core.cli``: the same as the ``flstore`` command."""

from flstore_core.cli import main

main()
