"""`edge-sdk profiles list|show|detect` and `edge-sdk keys generate` in a real subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import yaml

from edge_sdk.profiles import detect_profile
from edge_sdk.signing import load_private_key, load_public_key, sign, verify

FLEET = {"raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2-w", "jetson-orin-nano", "rk3588", "intel-nuc",
         "generic-x86_64", "generic-aarch64"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    # A wide console: rich wraps and truncates at 80 columns when stdout is not a terminal.
    return subprocess.run([sys.executable, "-m", "edge_sdk", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250"})


def test_profiles_list_json_and_table():
    result = _cli("profiles", "list", "--json")
    assert result.returncode == 0, result.stderr
    profiles = {p["id"]: p for p in json.loads(result.stdout)}
    assert FLEET <= set(profiles)
    assert profiles["rk3588"]["targets"][0] == "ncnn" and profiles["intel-nuc"]["arch"] == "x86_64"
    table = _cli("profiles", "list")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if " rk3588 " in line)
    assert "aarch64" in row and "ncnn,tflite,onnx" in row and "fp32,fp16,int8" in row


def test_profiles_show_prints_the_profile_as_yaml():
    result = _cli("profiles", "show", "rk3588")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["id"] == "rk3588" and shown["cpu"]["cores"] == 8 and shown["cpu"]["big_cores"] == [4, 5, 6, 7]
    missing = _cli("profiles", "show", "atari-2600")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: unknown device profile 'atari-2600'") and "Traceback" not in missing.stderr


def test_profiles_detect_says_which_and_why():
    result = _cli("profiles", "detect")
    assert result.returncode == 0, result.stderr
    detection = detect_profile()
    assert result.stdout.strip() == detection.explain()
    assert result.stdout.startswith(f"picked profile '{detection.profile.id}': arch ")


def test_keys_generate_writes_a_working_private_0600_pair_and_never_overwrites(tmp_path):
    private = tmp_path / "release.key"
    result = _cli("keys", "generate", str(private))
    assert result.returncode == 0, result.stderr
    public = tmp_path / "release.pub"
    assert f"private key: {private}" in result.stdout and f"public key:  {public}" in result.stdout
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    verify(b"manifest bytes", sign(b"manifest bytes", load_private_key(private)), load_public_key(public))
    before = private.read_bytes()
    again = _cli("keys", "generate", str(private), "--public", str(tmp_path / "other.pub"))
    assert again.returncode == 1 and "already exists; refusing to overwrite a key" in again.stderr
    assert private.read_bytes() == before and not (tmp_path / "other.pub").exists()
