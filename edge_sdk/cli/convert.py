"""`edge-sdk convert MODEL.onnx --profile ID ... -o OUT`: the workstation converter."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import ConfigError
from ..profiles import AUTO
from .app import app, console, err_console


@app.command("convert")
def convert_command(
    model: Path = typer.Argument(..., help="The FP32 ONNX model to convert."),
    profile: list[str] = typer.Option([AUTO], "--profile", "-p", help="Device profile id (repeatable); 'auto' detects this machine."),
    output: Path = typer.Option(..., "--output", "-o", help="Release folder to create (must not exist or be empty)."),
    calibration: str = typer.Option(None, "--calibration", "-c", help="Folder/file of .npy/.npz (or images) for INT8 calibration; a held-out part validates (unless --validation); 'random' to opt into random data."),
    validation: str = typer.Option(None, "--validation", help="Folder/file of samples to validate on instead of a held-out part of --calibration."),
    metric: str = typer.Option(None, "--metric", help="Accuracy measure: top1, cosine, f1 (thresholded maps) or module:function (outputs -> float, higher is better). Default: by the output's kind."),
    labels: Path = typer.Option(None, "--labels", help="Class labels of the validation (or calibration) samples (.npy, or 'name,label' lines): top-1 accuracy as the metric."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="NAME=D1,D2,... for a dynamic input (repeatable)."),
    constant_input: list[str] = typer.Option([], "--constant-input", help="NAME=VALUE: an input the device always feeds this value (e.g. sr=16000); it is folded in, and the Ifs it decides are inlined (repeatable)."),
    state: list[str] = typer.Option([], "--state", help="INPUT=OUTPUT: a recurrent state the output feeds back next step (repeatable); samples are then consecutive steps, validated streaming."),
    prune: str = typer.Option(None, "--prune", help="METHOD:AMOUNT, e.g. magnitude:0.5 or channel:0.3."),
    targets: list[str] = typer.Option([], "--targets", "-t", help="Only these export targets: a comma list and/or repeated, e.g. onnx,tflite,ncnn,openvino (default: the profiles' targets)."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Points of task metric (else top-1 agreement, else cosine x100) a variant may lose."),
    calibration_method: str = typer.Option("minmax", "--calibration-method", help="minmax, entropy or percentile."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="Per-tensor INT8 weights instead of per-channel."),
    sign_key: Path = typer.Option(None, "--sign-key", help="Ed25519 private key (edge-sdk keys generate) to sign the manifest."),
    version: int = typer.Option(1, "--version", "--release-version", help="Release version (monotonic integer)."),
    model_name: str = typer.Option(None, "--name", help="Model name in the manifest (default: the file name)."),
    latency_runs: int = typer.Option(50, "--latency-runs", help="Runs per latency median."),
    image_mean: str = typer.Option(None, "--image-mean", help="Image calibration: per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406."),
    image_std: str = typer.Option(None, "--image-std", help="Image calibration: per-channel std, e.g. 0.229,0.224,0.225."),
    image_layout: str = typer.Option(None, "--image-layout", help="Image calibration: nchw or nhwc (default: where the input has 3 channels)."),
    image_bgr: bool = typer.Option(False, "--image-bgr", help="Image calibration: feed channels as BGR."),
    speed_gate: bool = typer.Option(True, "--speed-gate/--no-speed-gate", help="Reject variants slower than FP32 here; turn off when this machine is unlike the device (cross-build, emulation)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Check, prune, quantize, export, validate and write a release folder."""
    from ..converters import config as cc
    from ..converters.pipeline import run

    profiles, notes = cc.resolve_profiles(profile)
    config = cc.ConvertConfig(
        model=model, profiles=profiles, notes=tuple(notes),
        targets=cc.resolve_targets(",".join(targets)) if targets else None,
        intake=cc.IntakeConfig(input_shapes=input_shape, constant_inputs=constant_input, prune=prune,
                               image_options=_image_options(image_mean, image_std, image_layout, image_bgr)),
        quantization=cc.QuantizationConfig(calibration=calibration, method=calibration_method, per_channel=not per_tensor),
        validation=cc.ValidationConfig(data=validation, labels=labels, metric=metric, max_accuracy_drop=max_accuracy_drop,
                                       latency_runs=latency_runs, speed_gate=speed_gate, state=state),
        release=cc.ReleaseConfig(output=output, version=version, model_name=model_name, sign_key=sign_key),
    )
    # The bar writes to its own copy of stderr: the converter captures fds 1/2 while tools run.
    with _terminal_stderr() as terminal, \
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=Console(file=terminal, stderr=True), transient=True, disable=as_json) as bar:
        task = bar.add_task("converting", total=1)

        def progress(step: str, done: int, total: int) -> None:
            bar.update(task, description=escape(step), completed=done, total=total)

        manifest = run(config, progress)
    rows = report_rows(manifest)
    if as_json:
        payload = {"output": str(output), "model": manifest.model, "version": manifest.version,
                   "defaults": manifest.defaults, "variants": rows, "report": manifest.report.model_dump(mode="json")}
        console.print_json(json.dumps(payload, default=str))
        return
    reference = manifest.report.reference
    table = Table(title=f"{manifest.model} v{manifest.version} -> {output}",
                  caption=f"×fp32: ratio to the FP32 ONNX source model ({_size(reference.size_bytes)}, "
                          f"{_num(reference.latency_ms, 3)} ms); metric: {manifest.report.metric or '-'}")
    table.add_column("variant", no_wrap=True)
    for column in ("recipe", "size (×fp32)", "ms (×fp32)", "max err", "cosine", "top-1", "metric", "status"):
        table.add_column(column)
    reasons: list[str] = []
    for row in rows:
        if row["status"] == "ok":
            status = "[green]ok[/]" + (" [bold]*[/]" if row["default_for"] else "")
            if row["speed"] == "inconclusive":
                status += " [yellow]speed?[/]"
        else:
            # Reasons are long: footnotes below the table keep the columns readable.
            first = (row["reason"] or "").strip().splitlines()[0] if row["reason"] else ""
            more = " (full reason in manifest.json)" if (row["reason"] or "").strip().count("\n") else ""
            reasons.append(f"[{len(reasons) + 1}] {row['id']}: {first[:300]}{more}")
            status = f"[red]rejected[/] [{len(reasons)}]"
        table.add_row(row["id"], row["recipe"] or "-", f"{_size(row['size_bytes'])} ({_ratio(row['size_ratio'])})",
                      f"{_num(row['latency_ms'], 3)} ({_ratio(row['latency_ratio'])})", _num(row["max_abs_error"], 4),
                      _num(row["cosine"], 4), _pct(row["top1_agreement"]), _metric(row), status)
    console.print(table)
    console.print("* = default of a profile; speed? = latency ratio inconclusive (kept, never a default)", highlight=False)
    for line in reasons:
        console.print(escape(line), highlight=False, soft_wrap=True)
    for profile_id in manifest.report.profiles:
        console.print(f"profile {profile_id}: default {manifest.defaults.get(profile_id, '[red]none[/] (no variant passed)')}",
                      highlight=False)
    for warning in manifest.report.warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    for note in manifest.report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    pruned = manifest.report.prune
    if pruned:
        console.print(f"pruned ({pruned.method}): params {pruned.params_before} -> {pruned.params_after} "
                      f"(non-zero {pruned.nonzero_before} -> {pruned.nonzero_after}), FLOPs "
                      f"{pruned.flops_before} -> {pruned.flops_after}; skipped: {len(pruned.skipped)}", highlight=False)
    if manifest.report.logs:
        console.print(f"tool logs: {output}/{next(iter(manifest.report.logs.values())).rpartition('/')[0]}/", highlight=False)
    signed = " (signed)" if sign_key else ""
    console.print(f"release written to {output}{signed}", highlight=False)


def report_rows(manifest) -> list[dict]:
    """One dict per variant with size and latency ratios to the FP32 ONNX reference (the source model)."""
    reference = manifest.report.reference
    default_for: dict[str, list[str]] = {}
    for profile_id, variant_id in manifest.defaults.items():
        default_for.setdefault(variant_id, []).append(profile_id)
    rows = []
    for v in manifest.variants:
        val = v.validation
        rows.append({
            "id": v.id, "profiles": v.profiles, "target": v.target.value, "precision": v.precision.value,
            "size_bytes": v.size_bytes,
            "size_ratio": v.size_bytes / reference.size_bytes if v.size_bytes else None,
            "latency_ms": v.latency_ms,
            "latency_ratio": v.latency_ms / reference.latency_ms if v.latency_ms and reference.latency_ms else None,
            "max_abs_error": val.max_abs_error, "cosine": val.cosine_similarity, "top1_agreement": val.top1_agreement,
            "metric_name": val.metric_name, "metric": val.metric, "metric_fp32": val.metric_fp32,
            "nodes_kept_fp32": val.nodes_kept_fp32, "status": v.status, "reason": v.reason, "recipe": val.recipe,
            "speed": val.speed.value if val.speed else None, "latency_ratio_ci": val.latency_ratio_ci,
            "default_for": default_for.get(v.id, []),
        })
    return rows


@contextlib.contextmanager
def _terminal_stderr() -> Iterator[TextIO]:
    try:
        stream = os.fdopen(os.dup(2), "w", buffering=1)
    except OSError:  # no stderr at all
        stream = open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        yield stream
    finally:
        stream.close()


def _size(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit[0]}"
        n /= 1024
    return str(n)  # pragma: no cover


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _num(x: float | None, digits: int) -> str:
    if x is None:
        return "-"
    return f"{x:.2g}" if x and abs(x) < 10 ** -digits else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _metric(row: dict) -> str:
    if row["metric"] is None:
        return "-"
    return f"{row['metric']:.4f} (fp32 {row['metric_fp32']:.4f})"


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _image_options(mean: str | None, std: str | None, layout: str | None, bgr: bool):
    """The image flags as typed :class:`ImageOptions` (defaults where a flag is not given)."""
    from ..converters.calibration import ImageOptions, Layout

    defaults = ImageOptions()
    try:
        layout_value = Layout(layout.lower()) if layout else None
    except ValueError:
        raise ConfigError(f"--image-layout {layout!r}: expected nchw or nhwc") from None
    return ImageOptions(mean=_floats(mean, "--image-mean") or defaults.mean, std=_floats(std, "--image-std") or defaults.std,
                        layout=layout_value, bgr=bgr)
