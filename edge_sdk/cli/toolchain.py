"""`edge-sdk toolchain install|list`: the isolated converter environments."""

from __future__ import annotations

import json
import time

import typer
from rich.markup import escape
from rich.table import Table

from ..converters import toolchains
from .app import app, console

toolchain_app = typer.Typer(help="Isolated converter toolchains (onnx2tf, pnnx, OpenVINO).", no_args_is_help=True)
app.add_typer(toolchain_app, name="toolchain")


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


@toolchain_app.command("install")
def install(
    names: list[str] = typer.Argument(..., help=f"Toolchains to install: {', '.join(toolchains.TOOLCHAINS)} or all."),
    force: bool = typer.Option(False, "--force", help="Reinstall even when complete."),
    timeout: float = typer.Option(3600.0, help="Give up after this many seconds per toolchain."),
) -> None:
    """Install toolchains from exact pins (a no-op for those already complete)."""
    wanted = list(toolchains.TOOLCHAINS) if "all" in names else names
    for name in wanted:
        toolchains.get_toolchain(name)  # unknown names fail before anything is installed
    for name in wanted:
        started = time.monotonic()
        with console.status(f"installing toolchain [bold]{name}[/]") as spinner:
            def show(line: str, _name: str = name) -> None:
                if line.strip():
                    spinner.update(f"installing toolchain [bold]{_name}[/]: {escape(line.strip()[:100])}")

            st = toolchains.install(name, on_line=show, force=force, timeout=timeout)
        size = toolchains.status(name, with_size=True).size_bytes
        versions = ", ".join(f"{k} {v}" for k, v in st.versions.items())
        console.print(f"[green]✓[/] {name}: {versions} in {time.monotonic() - started:.0f}s"
                      + (f", {_human(size)} at {st.path}" if st.kind is toolchains.ToolchainKind.VENV else f" ({st.detail})"),
                      highlight=False)


@toolchain_app.command("list")
def list_toolchains(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show each toolchain: installed?, versions, path, size."""
    rows = [toolchains.status(name, with_size=True) for name in toolchains.TOOLCHAINS]
    if as_json:
        console.print_json(json.dumps([
            {"name": r.name, "kind": r.kind.value, "installed": r.installed, "path": str(r.path) if r.path else None,
             "versions": r.versions, "size_bytes": r.size_bytes, "detail": r.detail} for r in rows]))
        return
    table = Table(title=f"toolchains ({toolchains.root_dir()})")
    for col in ("name", "kind", "installed", "versions", "path", "size", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.kind.value, "yes" if r.installed else "no",
                      ", ".join(f"{k} {v}" for k, v in r.versions.items()), str(r.path or "-"),
                      _human(r.size_bytes) if r.kind is toolchains.ToolchainKind.VENV and r.size_bytes else "-", r.detail)
    console.print(table)
