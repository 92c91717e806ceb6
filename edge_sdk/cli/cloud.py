"""`edge-sdk cloud publish|desire|gc|ingest|status|rollout`: the cloud side of fleet sync."""

from __future__ import annotations

import typer

from .app import app

cloud_app = typer.Typer(help="Cloud side: publish releases, set desired state, ingest telemetry, see the fleet, roll out.",
                        no_args_is_help=True)
app.add_typer(cloud_app, name="cloud")

# Commands are added below by the modules' owners: publish/desire/gc (releases), ingest (telemetry).

# --- releases: publish / desire / gc, and the device-side one-shot `edge-sdk sync` (H6) ---------
import json as _json  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn  # noqa: E402

from ..runtime.sync.stores.base import DEFAULT_MAX_MESSAGE_BYTES  # noqa: E402
from .app import console  # noqa: E402

_BROKER = typer.Option(..., "--broker", help="mqtt://[user:pass@]host[:port] or mqtts://…")
_FLEET = typer.Option(..., "--fleet", help="Fleet name (topic prefix edge/<fleet>).")
_PREFIX = typer.Option("", "--prefix", help="Topic prefix instead of edge/<fleet>.")
_CA = typer.Option(None, "--ca", help="CA certificate for mqtts:// brokers.")
_CERT = typer.Option(None, "--cert", help="Client certificate (PEM) for brokers that require one; needs --ca.")
_KEY = typer.Option(None, "--key", help="Private key (PEM) of --cert, if not in the same file.")


def _tls(ca: Path | None, cert: Path | None = None, key: Path | None = None):
    from ..errors import ConfigError
    from ..runtime.sync.transport import TlsConfig

    if key is not None and cert is None:
        raise ConfigError("--key is the private key of a client certificate: give --cert as well")
    if cert is not None and ca is None:
        raise ConfigError("--cert is for TLS (mqtts://): give the broker's CA with --ca as well")
    return TlsConfig(ca=ca, cert=cert, key=key) if ca else None


def _bytes_bar(description: str) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


@cloud_app.command("publish")
def publish(
    release: Path = typer.Argument(..., help="Release folder (manifest.json + artifacts)."),
    broker: str = _BROKER,
    fleet: str = _FLEET,
    sign_key: Path = typer.Option(None, "--sign-key", help="Ed25519 private key (PEM) to sign the manifest with."),
    trust: Path = typer.Option(None, "--trust", help="The fleet's trust root (root.json or PEM public key, as devices "
                               "pin it): retained manifests that do not verify are ignored. Default: --sign-key's "
                               "public key."),
    force: bool = typer.Option(False, "--force", help="Publish every chunk, even those already in the store."),
    store: str = typer.Option("mqtt", "--store", help="Where chunks go: mqtt (retained on the broker), "
                              "s3://bucket/prefix (AWS credentials/endpoint from the environment), "
                              "http(s)://base (PUT), or file:///dir (a folder a web server or CDN serves)."),
    store_ca: Path = typer.Option(None, "--store-ca", help="CA certificate of an https:// store or S3 endpoint."),
    max_message_bytes: int = typer.Option(DEFAULT_MAX_MESSAGE_BYTES, "--max-message-bytes", min=1024,
                                          help="Largest MQTT message the broker takes (mqtt store)."),
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Publish a release: chunks the store lacks, then the signed manifest (retained on the broker)."""
    from ..cloud.publish import publish_release
    from ..runtime.sync.stores import StoreOptions

    with _bytes_bar(f"publishing {release.name}") as bar:
        task = bar.add_task(f"publishing {release.name}", total=None)
        report = publish_release(release, broker, fleet, prefix=prefix, sign_key=sign_key, trust=trust, force=force,
                                 tls=_tls(ca, cert, key), store=store,
                                 store_options=StoreOptions(ca_certs=store_ca, max_message_bytes=max_message_bytes),
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        console.print_json(_json.dumps(report.to_dict()))
        return
    console.print(f"{report.model} v{report.version} → {report.manifest_topic} ({'signed' if report.signed else 'UNSIGNED'}): "
                  f"{report.chunks_published} chunks / {report.bytes_published} bytes published, "
                  f"{report.chunks_skipped} chunks already in {report.store}"
                  + (f" ({report.chunks_repaired} missing or corrupt there, sent again)" if report.chunks_repaired else ""),
                  highlight=False)
    for topic, why in report.ignored_manifests.items():
        console.print(f"ignored retained manifest {topic}: {why}", highlight=False)


@cloud_app.command("desire")
def desire(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    device: str = typer.Option(None, "--device", help="One device (default: the whole fleet)."),
    model: str = typer.Option(None, "--model", help="Model whose desired release to set (others are kept)."),
    version: int = typer.Option(None, "--version", min=1, help="Desired release version of --model."),
    store: str = typer.Option(None, "--store", help="Where devices fetch --model's chunks: mqtt, s3://bucket/prefix, "
                              "http(s)://base (a web server or CDN serving <base>/<sha256>)."),
    remove: bool = typer.Option(False, "--remove", help="Take --model out of the desired state at this level."),
    set_: list[str] = typer.Option([], "--set", help="Runtime policy key=value (JSON-typed), repeatable."),
    clear: bool = typer.Option(False, "--clear", help="Remove the desired state at this level."),
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
) -> None:
    """Change the desired state (retained) of a fleet or one device: one model's release and store,
    or the policy; the other models are kept. The device level wins."""
    from ..cloud.desire import build_desired, read_desired, write_desired
    from ..errors import ConfigError
    from ..runtime.sync.twin import parse_set

    if clear and (model or version or set_ or store or remove):
        raise ConfigError("--clear takes no --model/--version/--store/--remove/--set")
    if remove and (model is None or version is not None or store is not None):
        raise ConfigError("--remove takes --model and no --version/--store")
    tls = _tls(ca, cert, key)
    state = None
    if not clear:
        current = read_desired(broker, fleet, device=device, prefix=prefix, tls=tls)
        if remove:
            state = (current or build_desired()).without_model(model)
        else:
            state = build_desired(model, version, parse_set(set_), store=store, base=current)
    topic = write_desired(broker, fleet, state, device=device, prefix=prefix, tls=tls)
    console.print(f"{topic}: {'cleared' if state is None else state.to_payload().decode()}", highlight=False)


@cloud_app.command("gc")
def gc(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    keep: int = typer.Option(None, "--keep", min=1, help="Keep only the newest N versions per model (and desired ones)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    store: str = typer.Option("mqtt", "--store", help="The chunk store to collect: mqtt, s3://bucket/prefix or file:///dir."),
    store_ca: Path = typer.Option(None, "--store-ca", help="CA certificate of the S3 endpoint."),
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Remove chunks no remaining release references from the chunk store (and old manifests with --keep)."""
    from rich.progress import MofNCompleteColumn

    from ..cloud.gc import collect_garbage
    from ..runtime.sync.stores import StoreOptions

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("clearing unreferenced chunks", total=None)
        report = collect_garbage(broker, fleet, prefix=prefix, keep=keep, dry_run=dry_run, tls=_tls(ca, cert, key),
                                 store=store, store_options=StoreOptions(ca_certs=store_ca),
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        console.print_json(_json.dumps(report.to_dict()))
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.manifests_removed)} manifests and {report.blobs_removed} of {report.blobs_seen} chunks "
                  f"({report.bytes_freed} bytes)", highlight=False)


@app.command("sync")
def sync(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    device: str = typer.Option(..., "--device", help="This device's id."),
    root: Path = typer.Option(..., "--root", help="Device state folder (chunks, releases, current)."),
    public_key: Path = typer.Option(None, "--public-key", help="Ed25519 public key releases must be signed with."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Accept unsigned releases (no --public-key)."),
    profile: str = typer.Option(None, "--profile", help="Device profile id (default: keep every ok variant)."),
    model: str = typer.Option(None, "--model", help="Release to sync (default: the desired state's)."),
    version: int = typer.Option(None, "--version", min=1),
    self_test: bool = typer.Option(True, "--self-test/--no-self-test", help="Self-test through EdgeModel before activating."),
    fetch_window: int = typer.Option(32, "--fetch-window", min=1, help="Chunks requested at once."),
    store: str = typer.Option(None, "--store", help="Where the chunks come from (default: the desired state's, "
                              "else mqtt): mqtt, s3://bucket/prefix, http(s)://base."),
    store_ca: Path = typer.Option(None, "--store-ca", help="CA certificate of an https:// store (default: --ca)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Give up after this many seconds."),
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
) -> None:
    """Device side, one shot: bring this device to its desired (or the given) release, print JSON."""
    import time

    from ..errors import SyncError
    from ..runtime.sync.client import SyncClient, SyncConfig
    from ..types import SyncStatus

    config = SyncConfig(broker=broker, fleet=fleet, device=device, root=root, profile=profile, public_key=public_key,
                        allow_unsigned=allow_unsigned, prefix=prefix, tls=_tls(ca, cert, key), self_test=self_test,
                        fetch_window=fetch_window, sync_timeout_s=timeout, store_ca=store_ca)
    client = SyncClient(config)
    if model is None or version is None:
        client.subscribe_desired()
    client.transport.start()
    try:
        if not client.transport.wait_connected(min(timeout, 30.0)):
            raise SyncError(f"cannot reach the broker at {broker}")
        if model is None or version is None:
            deadline = time.monotonic() + min(timeout, 10.0)
            while time.monotonic() < deadline and not client.desired().wanted:
                time.sleep(0.05)
            wanted = client.desired().wanted
            if len(wanted) != 1:
                raise SyncError(f"device {device} in fleet {fleet} should run {len(wanted)} models "
                                f"({', '.join(sorted(wanted)) or 'none'}); pass --model/--version")
            (model, entry), = wanted.items()
            version, store = entry.version, store or entry.store
        result = client.sync(model, version, timeout=timeout, store=store)
    finally:
        client.transport.stop()
    typer.echo(_json.dumps(result.to_dict()))
    if result.status in (SyncStatus.REJECTED, SyncStatus.ROLLED_BACK):
        from ..errors import IntegrityError

        raise IntegrityError(result.reason or result.status)


# --- telemetry: `edge-sdk cloud ingest` ---------------------------------------------------------
@cloud_app.command("ingest")
def ingest(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    db: str = typer.Option(..., "--db", help="SQLite file (created if missing) or postgresql://user@host/db URL."),
    group: str = typer.Option("ingest", "--group", help="Shared-subscription group; workers of one group split the load."),
    prefix: str = _PREFIX,
    client_id: str = typer.Option(None, "--client-id", help="MQTT client id (default: ingest-<group>-<host>-<pid>)."),
    retention_days: float = typer.Option(None, "--retention-days", min=0.0, help="Delete records older than this."),
    max_record_kb: int = typer.Option(512, "--max-record-kb", min=1, help="Refuse (ack as rejected) larger records."),
    max_batch_kb: int = typer.Option(1088, "--max-batch-kb", min=1, max=1088, help="Refuse (ack as rejected) larger batches."),
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
    report_every: float = typer.Option(10.0, "--report-every", help="Seconds between progress lines (0: none)."),
) -> None:
    """Commit device telemetry (duplicates dropped), ack each device after commit; runs until SIGINT/SIGTERM."""
    import signal
    import threading

    from ..cloud.ingest import IngestLimits, run_ingest

    limits = IngestLimits(max_record_bytes=max_record_kb * 1024, max_batch_bytes=max_batch_kb * 1024)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def line(w) -> None:
        console.print(f"ingest: {w.batches} batches, {w.records} records, {w.duplicates} duplicates, "
                      f"{w.rejected} rejected, {w.malformed} malformed, {w.errors} errors", highlight=False)

    where = db if "://" not in db else db.split("@")[-1]  # never print a password
    console.print(f"ingest: {broker} fleet {fleet} → {where} (group {group})", highlight=False)
    worker = run_ingest(broker, fleet, db, group=group, prefix=prefix, client_id=client_id, tls=_tls(ca, cert, key),
                        limits=limits, retention_s=retention_days * 86400 if retention_days else None,
                        stop=stop, report_every_s=report_every, report=line)
    line(worker)


# --- broker edge: ACLs from the fleet inventory (issue 15) -------------------------------------
@cloud_app.command("acl")
def acl(
    inventory: Path = typer.Argument(..., help="Fleet inventory YAML (see deploy/mosquitto/fleets.yaml)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the acl file here (default: print it)."),
) -> None:
    """Render the Mosquitto acl_file: each device reads and writes only its own topics in its own fleet."""
    from ..cloud.acl import load_inventory, render_acl
    from ..runtime.sync.releases import write_atomic

    text = render_acl(load_inventory(inventory))
    if output is None:
        typer.echo(text, nl=False)
    else:
        write_atomic(output, text.encode())
        console.print(f"acl: {output} (reload Mosquitto with SIGHUP)", highlight=False)


# --- fleet operations: `edge-sdk cloud status`, `edge-sdk cloud rollout …` -------------------------
_GROUP = typer.Option([], "--group", help="Only devices with this label (label=value; profile=… too), repeatable.")


def _print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)


@cloud_app.command("status")
def fleet_status(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    model: str = typer.Option(None, "--model", help="Only devices that report this model."),
    group: list[str] = _GROUP,
    stale_after: float = typer.Option(300.0, "--stale-after", help="Seconds without a report before a device is stale."),
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
    as_json: bool = typer.Option(False, "--json", help="Print devices, summary and garbage as JSON."),
) -> None:
    """The fleet from retained reported state: one row per device and model, a summary per release and profile."""
    from ..cloud.connection import connect
    from ..cloud.fleet import parse_group, read_fleet, report_json
    from ..runtime.sync.topics import Topics

    labels = parse_group(group)
    topics = Topics(fleet, prefix)
    with connect(broker, "status", _tls(ca, cert, key)) as transport:
        view = read_fleet(transport, topics, stale_after_s=stale_after)
    if as_json:
        typer.echo(report_json(view, model, labels))
        return
    rows = view.rows(model, labels)
    for row in rows:
        row["age"] = f"{row['age_s']:.0f}s" if row["age_s"] is not None else None
        row["labels"] = ",".join(f"{k}={v}" for k, v in row["labels"].items()) or None
    _print_table(f"fleet {fleet}: {len({r['device'] for r in rows})} devices", rows,
                 ["device", "model", "version", "backend", "precision", "health", "p50_ms", "outbox_depth", "age",
                  "profile", "labels", "reason"])
    summary = view.summary(model, labels)
    for row in summary:
        row["health"] = ", ".join(f"{k} {v}" for k, v in sorted(row["health"].items()))
        row["backends"] = ", ".join(f"{k} {v}" for k, v in row["backends"].items())
        row["precisions"] = ", ".join(f"{k} {v}" for k, v in row["precisions"].items())
    _print_table("per release and profile", summary,
                 ["model", "version", "profile", "devices", "health", "p50_ms_median", "backends", "precisions"])
    figures = view.figures(model, labels) if model else []
    for row in figures:
        row["verdicts"] = ", ".join(f"{k} {v}" for k, v in sorted(row["verdicts"].items())) or None
    if figures:
        _print_table(f"{model}: measured on the devices vs the build machine", figures,
                     ["version", "profile", "variant", "devices", "used_on", "device_p50_ms", "device_p99_ms",
                      "device_ratio", "build_latency_ms", "build_ratio", "device_footprint_mb", "build_footprint_mb",
                      "verdicts"])
    if view.garbage:
        console.print(f"{len(view.garbage)} devices reported unreadable state (left out): "
                      + "; ".join(f"{d}: {why}" for d, why in sorted(view.garbage.items())[:5]), highlight=False)


rollout_app = typer.Typer(help="Staged rollouts that halt themselves: start, status, pause, resume, abort.",
                          no_args_is_help=True)
cloud_app.add_typer(rollout_app, name="rollout")


def _default_state() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("edge-sdk")) / "rollouts.db"


_STATE = typer.Option(None, "--state", help="Rollout state file (SQLite; default: the user data folder).")
_POLL = typer.Option(2.0, "--poll", min=0.1, help="Seconds between checks of the fleet.")


def _store(state: Path | None):
    from ..cloud.rollout import RolloutStore

    return RolloutStore(state or _default_state())


def _drive(store, transport, rollout_id: str, poll: float) -> None:
    from ..cloud.rollout import RolloutController, RolloutState, rollout_status

    last: list[str] = []

    def tick(_state) -> None:
        events = [e["message"] for e in rollout_status(store, rollout_id)["events"]]
        for message in events[len(last):]:
            console.print(f"rollout {rollout_id}: {message}", highlight=False)
        last[:] = events

    state = RolloutController(store, transport, rollout_id).run(poll_s=poll, on_tick=tick)
    if state in (RolloutState.HALTED, RolloutState.ABORTED):
        from ..errors import SyncError

        raise SyncError(f"rollout {rollout_id} {state.value}: {store.get(rollout_id).reason}")
    if state is RolloutState.PAUSED:
        console.print(f"rollout {rollout_id} paused; continue with `edge-sdk cloud rollout resume {rollout_id}`",
                      highlight=False)


@rollout_app.command("start")
def rollout_start(
    broker: str = _BROKER,
    fleet: str = _FLEET,
    model: str = typer.Option(..., "--model", help="Model to roll out."),
    version: int = typer.Option(..., "--version", min=1, help="Release version (published already)."),
    canary: str = typer.Option(None, "--canary", help="First wave: these devices (comma-separated)."),
    wave: list[str] = typer.Option([], "--wave", help="Next wave: N% (cumulative), label=value, or device ids; repeatable."),
    group: list[str] = _GROUP,
    store_url: str = typer.Option(None, "--store", help="Chunk store of the release (default: each device's own)."),
    max_failure: float = typer.Option(0.0, "--max-failure", help="Halt when more than this share of a wave fails (0-1)."),
    max_error_rate: float = typer.Option(0.05, "--max-error-rate", help="A device with more failed calls fails (0-1)."),
    max_p99_ms: float = typer.Option(None, "--max-p99-ms", help="A device whose measured p99 is higher fails."),
    min_calls: int = typer.Option(0, "--min-calls", min=0, help="Calls a device must serve before it can pass."),
    soak: float = typer.Option(60.0, "--soak", min=0.0, help="Seconds a device must run the release within bounds."),
    wave_timeout: float = typer.Option(900.0, "--wave-timeout", help="A device not through by then fails."),
    rollout_id: str = typer.Option(None, "--id", help="Rollout id (default: <model>-v<version>-<random>)."),
    detach: bool = typer.Option(False, "--detach", help="Only plan and record it; drive it with `rollout resume`."),
    state: Path = _STATE,
    poll: float = _POLL,
    prefix: str = _PREFIX,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
) -> None:
    """Plan a rollout from the fleet view and drive it wave by wave until done, halted or paused."""
    from ..cloud.connection import connect
    from ..cloud.fleet import parse_group
    from ..cloud.rollout import HealthBounds, RolloutSpec, Wave, rollout_status, start_rollout
    from ..errors import ConfigError
    from ..runtime.sync.topics import Topics

    waves = ([Wave.parse(canary)] if canary else []) + [Wave.parse(w) for w in wave]
    if not waves:
        raise ConfigError("give the waves: --canary DEVICES and/or --wave N% | label=value | DEVICES")
    try:
        bounds = HealthBounds(max_error_rate=max_error_rate, max_p99_ms=max_p99_ms, min_calls=min_calls,
                              soak_s=soak, wave_timeout_s=wave_timeout)
    except ValueError as exc:
        from ..config import describe_validation_error

        raise ConfigError(describe_validation_error("rollout bounds", exc)) from None
    spec = RolloutSpec.build(model=model, version=version, waves=waves, group=parse_group(group), store=store_url,
                             max_failure=max_failure, bounds=bounds)
    store = _store(state)
    with connect(broker, "rollout", _tls(ca, cert, key)) as transport:
        rollout = start_rollout(store, transport, Topics(fleet, prefix), spec, rollout_id)
        status = rollout_status(store, rollout.id)
        console.print(f"rollout {rollout.id}: {model} v{version} in {len(status['waves'])} waves "
                      f"({', '.join(str(w['devices']) for w in status['waves'])} devices)", highlight=False)
        if not detach:
            _drive(store, transport, rollout.id, poll)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    broker: str = _BROKER,
    state: Path = _STATE,
    poll: float = _POLL,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
) -> None:
    """Continue a paused rollout, or one whose controller was stopped or killed."""
    from ..cloud.connection import connect
    from ..cloud.rollout import RolloutState

    store = _store(state)
    store.set_state(rollout_id, RolloutState.RUNNING, "resumed", only_from=(RolloutState.PAUSED,))
    with connect(broker, "rollout", _tls(ca, cert, key)) as transport:
        _drive(store, transport, rollout_id, poll)


@rollout_app.command("pause")
def rollout_pause(rollout_id: str = typer.Argument(..., help="Rollout id."), state: Path = _STATE) -> None:
    """Stop advancing (a running controller stops at its next check); devices keep their desired state."""
    from ..cloud.rollout import RolloutState
    from ..errors import ConfigError

    store = _store(state)
    if not store.set_state(rollout_id, RolloutState.PAUSED, "paused by the operator", only_from=(RolloutState.RUNNING,)):
        raise ConfigError(f"rollout {rollout_id} is {store.get(rollout_id).state.value}, not running")
    console.print(f"rollout {rollout_id} paused", highlight=False)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    broker: str = _BROKER,
    state: Path = _STATE,
    ca: Path = _CA,
    cert: Path = _CERT,
    key: Path = _KEY,
) -> None:
    """End the rollout and set every device it touched back to its previous release."""
    from ..cloud.connection import connect
    from ..cloud.rollout import RolloutController, RolloutState
    from ..errors import ConfigError

    store = _store(state)
    if not store.set_state(rollout_id, RolloutState.ABORTED, "aborted by the operator",
                           only_from=(RolloutState.RUNNING, RolloutState.PAUSED)):
        raise ConfigError(f"rollout {rollout_id} is already {store.get(rollout_id).state.value}")
    with connect(broker, "rollout", _tls(ca, cert, key)) as transport:
        RolloutController(store, transport, rollout_id).step()
    console.print(f"rollout {rollout_id} aborted; touched devices set back", highlight=False)


@rollout_app.command("status")
def rollout_show(
    rollout_id: str = typer.Argument(None, help="Rollout id (default: list every rollout)."),
    state: Path = _STATE,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """A rollout's state, waves, per-device verdicts and history (or the list of rollouts)."""
    from ..cloud.rollout import rollout_status

    store = _store(state)
    if rollout_id is None:
        rows = [{"id": r.id, "model": r.spec.model, "version": r.spec.version, "state": r.state.value,
                 "wave": f"{r.wave + 1}/{r.waves}", "reason": r.reason} for r in store.list()]
        if as_json:
            typer.echo(_json.dumps(rows, indent=2))
        else:
            _print_table("rollouts", rows, ["id", "model", "version", "state", "wave", "reason"])
        return
    status = rollout_status(store, rollout_id)
    if as_json:
        typer.echo(_json.dumps(status, indent=2))
        return
    console.print(f"rollout {status['id']}: {status['model']} v{status['version']} — {status['state']}"
                  + (f" ({status['reason']})" if status["reason"] else ""), highlight=False)
    _print_table("waves", [{**w, "steps": ", ".join(f"{k} {v}" for k, v in w["steps"].items())} for w in status["waves"]],
                 ["wave", "devices", "steps"])
    _print_table("devices", status["devices"], ["device", "wave", "step", "previous_version", "verdict"])
