"""`edge-sdk run` (one inference on a release) and `edge-sdk bench` (latency per variant)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from .app import app, console


def _read_array_file(path: Path) -> dict[str, object] | object:
    import numpy as np

    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--input {path}: not a .npy/.npz file ({exc})") from None
    if hasattr(data, "files"):  # .npz: one array per input name
        with data:
            return {k: data[k] for k in data.files}
    return data


def parse_inputs(specs: list[str], input_names: list[str]) -> dict:
    """``name=file.npy`` pairs, ``.npz`` files keyed by input name, or one bare ``.npy`` for a
    single-input model."""
    inputs: dict = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if sep and name and not Path(spec).exists():
            array = _read_array_file(Path(file))
            if isinstance(array, dict):
                raise ConfigError(f"--input {spec}: name=FILE needs a .npy file, not an .npz")
            inputs[name] = array
            continue
        loaded = _read_array_file(Path(spec))
        if isinstance(loaded, dict):
            inputs.update(loaded)
        elif len(input_names) == 1:
            inputs[input_names[0]] = loaded
        else:
            raise ConfigError(f"--input {spec}: the model has inputs {input_names}; pass NAME=FILE.npy or an .npz keyed by name")
    return inputs


@app.command("run")
def run_command(
    release: Path = typer.Argument(..., help="Release folder (with manifest.json)."),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="NAME=FILE.npy, or FILE.npz keyed by input name, or FILE.npy for a one-input model. Repeatable."),
    precision: str = typer.Option("auto", "--precision", help="fp32, fp16, int8, mixed, or auto."),
    profile: str = typer.Option("auto", "--profile", help="Device profile id or YAML path; auto detects."),
    backend: str = typer.Option(None, "--backend", help="Only this backend's variants (onnxruntime, tflite, openvino, ncnn)."),
    public_key: Path = typer.Option(None, "--public-key", help="Refuse the release unless signed by this key (PEM)."),
    output: Path = typer.Option(None, "--output", "-o", help="Save the outputs to this .npz instead of printing values."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Load a release (verified, self-tested) and run it once on the given inputs."""
    import numpy as np

    from ..runtime.model import EdgeModel

    with EdgeModel.load(release, profile=profile, precision=precision, backend=backend,
                        public_key=public_key, monitor=False) as model:
        names = [s.name for s in model.plan.candidates[model.precision][0].inputs]
        outputs = model.run(parse_inputs(inputs, names))
        info = model.info()
    if output is not None:
        np.savez(output, **outputs)
    summary = {
        "variant": info.variant, "backend": info.backend, "precision": info.precision.value,
        "outputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype), "min": float(a.min()) if a.size else None,
                           "max": float(a.max()) if a.size else None, "mean": float(a.mean()) if a.size else None,
                           **({"argmax": int(a.reshape(a.shape[0], -1)[0].argmax())} if a.ndim >= 2 and a.size else {})}
                    for name, a in outputs.items()},
        "saved_to": str(output) if output else None,
    }
    if as_json:
        console.print_json(json.dumps(summary))
        return
    console.print(f"{info.model} v{info.version}: {info.variant} ({info.backend}, {info.precision})", highlight=False, soft_wrap=True)
    for name, array in outputs.items():
        stats = summary["outputs"][name]
        console.print(f"{name}: shape {stats['shape']} {stats['dtype']} min {stats['min']:.6g} max {stats['max']:.6g} "
                      f"mean {stats['mean']:.6g}" if array.size else f"{name}: empty", highlight=False, soft_wrap=True)
        if output is None and array.size <= 64:
            console.print(np.array2string(array, precision=5, max_line_width=120), highlight=False, soft_wrap=True)
    if output is not None:
        console.print(f"saved outputs to {output}", highlight=False, soft_wrap=True)


@app.command("bench")
def bench_command(
    release: Path = typer.Argument(..., help="Release folder (with manifest.json)."),
    profile: str = typer.Option("auto", "--profile", help="Device profile id or YAML path; auto detects."),
    all_variants: bool = typer.Option(False, "--all-variants", help="Every variant in the release, rejected ones and other profiles' too."),
    runs: int = typer.Option(100, "--runs", min=1, help="Timed calls per variant."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed calls first."),
    threads: int = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the profile's)."),
    public_key: Path = typer.Option(None, "--public-key", help="Refuse the release unless signed by this key (PEM)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Latency table (p50/p95/p99, throughput, RSS) per backend x precision on this machine."""
    import os

    from ..manifest import load_manifest
    from ..profiles import resolve_profile
    from ..runtime.bench import bench_variant
    from ..runtime.model import resolve_public_key
    from ..runtime.selection import plan_variants

    manifest = load_manifest(release, resolve_public_key(public_key))
    choice = resolve_profile(profile)
    device = choice.profile
    if all_variants:
        variants = list(manifest.variants)
    else:
        plan = plan_variants(manifest, device, detected=choice.detected)
        variants = [v for candidates in plan.candidates.values() for v in candidates]
    threads = threads or min(device.threads, os.cpu_count() or 1)
    results = [bench_variant(release, manifest, v, runs=runs, warmup=warmup, threads=threads) for v in variants]
    if as_json:
        console.print_json(json.dumps({"model": manifest.model, "version": manifest.version, "profile": device.id,
                                       "threads": threads, "results": [r.as_dict() for r in results]}))
        return
    table = Table(title=f"{manifest.model} v{manifest.version} on {device.id}: latency ms ({threads} threads, {runs} runs)")
    for col in ("variant", "backend", "precision", "status", "p50", "p95", "p99", "calls/s", "RSS MB"):
        table.add_column(col, justify="right" if col in ("p50", "p95", "p99", "calls/s", "RSS MB") else "left", no_wrap=True)
    for r in results:
        if r.error:
            table.add_row(r.variant, r.backend, r.precision, r.status, f"[red]{escape(r.error)}[/]", "", "", "", "")
        else:
            table.add_row(r.variant, r.backend, r.precision, r.status, f"{r.p50_ms:.3f}", f"{r.p95_ms:.3f}",
                          f"{r.p99_ms:.3f}", f"{r.throughput_per_s:.0f}", f"{r.rss_mb:.1f}")
    # Piped output defaults to 80 columns, too narrow for this table.
    (console if console.is_terminal else Console(width=120)).print(table)
