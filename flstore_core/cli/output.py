"""How the command line prints for humans and for scripts.

Text from users and from FLStore (ids, error messages, workload results) is printed verbatim:
rich reads ``[...]`` in a plain string as markup, so a shape like ``[n, 1, 8, 8]`` in an error
would vanish as an unknown tag. Everything here goes through :class:`rich.text.Text` or
``markup=False``; only fixed labels of the CLI's own carry style. ``--json`` output is plain
JSON on stdout, nothing else.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from flstore_core.cli.state import console
from flstore_core.errors import FLStoreError


def say(text: str, style: str | None = None) -> None:
    """Print ``text`` exactly as it is (no markup, no highlighting, no line breaks added: a
    printed command stays one line to copy)."""
    console.print(Text(text, style=style or ""), highlight=False, soft_wrap=True)


def fail(exc: FLStoreError) -> NoReturn:
    """Print an FLStore error (status, code, message verbatim) and exit 1."""
    console.print(
        Text.assemble(("error", "red"), f" ({exc.status} {exc.code}): {exc.message}"),
        highlight=False,
    )
    raise typer.Exit(1)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON for scripts."""
    typer.echo(json.dumps(data, indent=2, default=str))


def table(title: str | None = None, *, compact: bool = False, **kwargs: Any) -> Table:
    """A table whose title is plain text; ``compact`` drops the cell borders so that many
    numeric columns fit 80 terminal columns."""
    if compact:
        kwargs.setdefault("box", box.SIMPLE_HEAD)
        kwargs.setdefault("pad_edge", False)
        kwargs.setdefault("collapse_padding", True)
    return Table(title=None if title is None else Text(title), **kwargs)


def row(*cells: object) -> list[Text]:
    """Table cells as verbatim text."""
    return [Text(c if isinstance(c, str) else str(c)) for c in cells]
