"""`edge-sdk keys generate`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..signing import generate_keypair
from .app import app, console

keys_app = typer.Typer(help="Ed25519 keys for signing releases.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def generate(
    private_key: Path = typer.Argument(..., help="Where to write the private key (PEM, mode 0600)."),
    public_key: Path = typer.Option(None, "--public", help="Public key path (default: PRIVATE_KEY with .pub)."),
) -> None:
    """Generate a signing key pair."""
    priv, pub = generate_keypair(private_key, public_key)
    console.print(f"private key: {priv}\npublic key:  {pub} (give this one to devices)")
