"""The ``edge-sdk`` command line. ``main`` is the only place that calls ``sys.exit``."""

from __future__ import annotations

import importlib
import sys

from rich.markup import escape

from ..errors import EdgeSDKError
from .app import State, app, err_console

# Each module registers its commands on `app` at import; heavy imports stay inside commands.
_COMMAND_MODULES = ("profiles", "keys", "convert", "toolchain", "run", "align", "cloud", "daemon", "config")


def _load_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: any :class:`EdgeSDKError` becomes one clear line and exit status 1."""
    _load_commands()
    try:
        # Click's standalone mode handles usage errors (exit 2) and --help itself.
        app(args=argv, standalone_mode=True)
    except EdgeSDKError as exc:
        if State.debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:
        if State.debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (run with --debug for a traceback)",
            highlight=False, soft_wrap=True,
        )
        sys.exit(2)
