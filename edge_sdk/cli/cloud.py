"""`edge-sdk cloud publish|desire|gc|ingest`: the cloud side of fleet sync."""

from __future__ import annotations

import typer

from .app import app

cloud_app = typer.Typer(help="Cloud side: publish releases, set desired state, ingest telemetry.", no_args_is_help=True)
app.add_typer(cloud_app, name="cloud")

# Commands are added below by the modules' owners: publish/desire/gc (releases), ingest (telemetry).
