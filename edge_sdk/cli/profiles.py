"""`edge-sdk profiles list|show|detect`."""

from __future__ import annotations

import json

import typer
import yaml
from rich.table import Table

from ..profiles import builtin_profiles, detect_profile, get_profile
from .app import app, console

profiles_app = typer.Typer(help="Device profiles: what each kind of device is and runs.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("list")
def list_profiles(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in device profiles."""
    profiles = builtin_profiles()
    if as_json:
        console.print_json(json.dumps([p.model_dump(mode="json") for p in profiles.values()]))
        return
    table = Table(title="device profiles")
    table.add_column("id", no_wrap=True)
    for col in ("name", "arch", "cores", "RAM MB", "targets", "precisions"):
        table.add_column(col)
    for p in profiles.values():
        table.add_row(
            p.id, p.name, p.arch.value, str(p.cpu.cores), str(p.ram_mb),
            ",".join(t.value for t in p.targets), ",".join(x.value for x in p.precisions),
        )
    console.print(table)


@profiles_app.command("show")
def show_profile(profile_id: str = typer.Argument(..., help="Profile id, or 'auto'.")) -> None:
    """Show one profile in full."""
    console.print(yaml.safe_dump(get_profile(profile_id).model_dump(mode="json"), sort_keys=False), highlight=False)


@profiles_app.command("detect")
def detect() -> None:
    """Say which profile `--profile auto` picks on this machine, and why."""
    console.print(detect_profile().explain(), highlight=False)
