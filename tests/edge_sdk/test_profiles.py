from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.profiles import MachineFacts, builtin_profiles, detect_profile, get_profile, load_profile_file
from edge_sdk.types import Arch, Precision, Target

# From the installed package, not the source tree: the arm64 proof runs these against the wheel.
GOOD = Path(str(resources.files("edge_sdk.device_profiles") / "raspberry-pi-4.yaml"))


def test_builtin_profiles_load_and_cover_the_fleet():
    profiles = builtin_profiles()
    assert len(profiles) >= 8
    for required in ("raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2-w", "jetson-orin-nano",
                     "rk3588", "intel-nuc", "generic-x86_64", "generic-aarch64"):
        assert required in profiles
    rk = profiles["rk3588"]
    assert rk.cpu.big_cores == [4, 5, 6, 7] and rk.cpu.cores == 8
    assert profiles["intel-nuc"].targets[0] is Target.OPENVINO
    assert "avx512_vnni" in profiles["intel-nuc"].cpu.features
    assert profiles["raspberry-pi-4"].policy.thresholds[Precision.FP32].min_free_memory_mb == 1024


def _write(tmp_path: Path, text: str, name: str = "raspberry-pi-4") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_line(tmp_path):
    path = _write(tmp_path, GOOD.read_text().replace("threads: 4", "threads: 4\nturbo: true"))
    with pytest.raises(ConfigError) as err:
        load_profile_file(path)
    msg = str(err.value)
    assert str(path) in msg and "turbo" in msg and "unknown key" in msg and "line" in msg


def test_wrong_type_names_the_key(tmp_path):
    path = _write(tmp_path, GOOD.read_text().replace("ram_mb: 4096", "ram_mb: lots"))
    with pytest.raises(ConfigError, match=r"ram_mb \(line \d+\)"):
        load_profile_file(path)


def test_precision_no_target_can_run_is_rejected(tmp_path):
    text = GOOD.read_text().replace("targets: [tflite, ncnn, onnx]", "targets: [tflite, ncnn]").replace(
        "precisions: [fp32, fp16, int8]", "precisions: [fp32, mixed]").replace(
        "    fp16: {min_free_memory_mb: 512, max_cpu_percent: 92, max_temperature_c: 80}\n", "")
    with pytest.raises(ConfigError, match="can run mixed"):
        load_profile_file(_write(tmp_path, text))


def test_target_without_runtime_for_arch_is_rejected(tmp_path):
    text = GOOD.read_text().replace("arch: aarch64", "arch: armv7l")
    with pytest.raises(ConfigError, match="onnx has no runtime for armv7l"):
        load_profile_file(_write(tmp_path, text))


def test_malformed_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"malformed YAML \(line \d+\)"):
        load_profile_file(_write(tmp_path, "id: x\ncpu: [unclosed\n"))


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown device profile 'nope'.*raspberry-pi-4"):
        get_profile("nope")


def _facts(**kw) -> MachineFacts:
    base = dict(arch="aarch64", cores=4, ram_mb=3800, cpu_model="", features=frozenset({"neon", "asimd", "crc32"}), device_tree_model="")
    base.update(kw)
    return MachineFacts(**base)


def test_detect_uses_device_tree_model():
    det = detect_profile(_facts(device_tree_model="Raspberry Pi 4 Model B Rev 1.5"))
    assert det.profile.id == "raspberry-pi-4"
    assert "Raspberry Pi 4" in det.explain()


def test_detect_rk3588_from_device_tree():
    det = detect_profile(_facts(cores=8, device_tree_model="Orange Pi 5", features=frozenset({"neon", "asimd", "asimddp", "asimdhp", "dotprod", "crc32"})))
    assert det.profile.id == "rk3588"


def test_detect_never_picks_profile_needing_missing_isa_features():
    det = detect_profile(_facts(arch="x86_64", cores=8, ram_mb=16000, features=frozenset({"avx2"})))
    assert det.profile.id == "generic-x86_64"
    det = detect_profile(_facts(arch="x86_64", cores=8, ram_mb=16000, features=frozenset({"avx2", "avx512f", "avx512_vnni"})))
    assert det.profile.id == "intel-nuc"


def test_detect_unknown_arch_is_clear():
    with pytest.raises(ConfigError, match="riscv64"):
        detect_profile(_facts(arch="riscv64"))


def test_this_machine_is_detected():
    det = detect_profile()
    assert det.profile.arch in (Arch.X86_64, Arch.AARCH64)
    assert det.reasons
