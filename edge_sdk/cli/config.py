"""`edge-sdk config check|example`: the daemon's config file."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console

config_app = typer.Typer(help="The daemon's config file (edge.yaml).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def check(path: Path = typer.Argument(..., help="The config file to validate.")) -> None:
    """Validate a daemon config without starting anything; errors name the key and line."""
    from ..daemon.config import load_config

    config = load_config(path)
    models = ", ".join(m.name for m in config.models)
    broker = config.sync.broker or "none (offline)"
    console.print(f"{path}: ok (device {config.device_id}; models: {models}; broker: {broker})", highlight=False,
                  soft_wrap=True)
    for note in config.deprecations:
        console.print(f"{path}: warning: {note}", highlight=False, soft_wrap=True)


@config_app.command("example")
def example() -> None:
    """Print a commented example config that passes `edge-sdk config check`."""
    from ..daemon.config import EXAMPLE_YAML

    typer.echo(EXAMPLE_YAML, nl=False)
