"""The ``flstore`` command line (typer + rich).

The CLI is one of ``flstore_core``'s two faces: it may compose the layers (start the local stack,
run a pipeline), and nothing else in ``flstore_core`` imports it.
"""

from __future__ import annotations

import typer

from flstore_core import __version__

app = typer.Typer(
    name="flstore",
    help="FLStore: serverless storage and compute for federated-learning metadata.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print FLStore's version."""
    typer.echo(__version__)


@app.command()
def demo(
    rounds: int = typer.Option(5, min=1, help="Rounds of the synthetic job."),
    clients: int = typer.Option(10, min=1, help="Clients per round."),
    precision: str = typer.Option("float32", help="Storage precision: float32, bfloat16, float16."),
) -> None:
    """Run the main job on the embedded local stack and print what it measured."""
    from flstore_core.cli.demo import run_demo

    run_demo(rounds=rounds, clients=clients, precision=precision)


def main() -> None:
    """Console-script entry point."""
    app()
