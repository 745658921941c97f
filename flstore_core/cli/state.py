"""Where the command line finds the local stack (``.flstore/local.json`` in the working
directory, ARCHITECTURE §6) and the console every command prints to."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console()
STATE = Path(".flstore") / "local.json"
