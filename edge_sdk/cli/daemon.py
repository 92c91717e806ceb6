"""`edge-sdk daemon --config edge.yaml`: the device daemon."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import EdgeSDKError
from .app import app


@app.command("daemon")
def daemon(config: Path = typer.Option(..., "--config", "-c", help="The daemon config (see `edge-sdk config example`).")) -> None:
    """Serve the configured models over a local KServe v2 API, keep them in sync, report telemetry."""
    from ..daemon.service import run_daemon

    status = run_daemon(config)
    if status:
        raise EdgeSDKError(f"daemon exited with status {status}")
