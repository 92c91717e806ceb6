"""`--profile auto`'s inputs: /proc/cpuinfo and the device-tree model read from a fake root folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edge_sdk.profiles import MachineFacts, detect_profile

RK3588_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 48.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    f"CPU implementer\t: 0x41\nCPU part\t: {'0xd05' if i < 4 else '0xd0b'}\n\n"
    for i in range(8)
)
NUC_CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\n"
    "model name\t: 11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz\n"
    "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni\n\n"
    for i in range(8)
)


def _root(tmp_path: Path, cpuinfo: str, dt_model: bytes | None = None) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    if dt_model is not None:
        (tmp_path / "proc" / "device-tree").mkdir()
        (tmp_path / "proc" / "device-tree" / "model").write_bytes(dt_model)
    return tmp_path


def test_rk3588_cpuinfo_and_device_tree_are_read(tmp_path):
    facts = MachineFacts.read(_root(tmp_path, RK3588_CPUINFO, b"Orange Pi 5\x00"))
    assert facts.device_tree_model == "Orange Pi 5"  # the kernel's trailing NUL is stripped
    assert facts.cpu_model == ""  # arm64 cpuinfo names no model
    # Linux names for arm64 features, plus the names profiles use for them.
    assert {"asimd", "asimddp", "fphp", "neon", "dotprod"} <= facts.features
    # arch, cores and RAM come from the running kernel, not from these files: set them as on the board.
    detection = detect_profile(replace(facts, arch="aarch64", cores=8, ram_mb=15_900))
    assert detection.profile.id == "rk3588"
    assert "matched 'Orange Pi 5' in 'Orange Pi 5'" in detection.explain()


def test_x86_avx512_cpuinfo_picks_the_nuc_and_says_why(tmp_path):
    facts = MachineFacts.read(_root(tmp_path, NUC_CPUINFO))
    assert facts.cpu_model == "11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz"
    assert {"avx2", "avx512f", "avx512_vnni"} <= facts.features and "neon" not in facts.features
    assert facts.device_tree_model == ""
    detection = detect_profile(replace(facts, arch="x86_64", cores=8, ram_mb=16_000))
    assert detection.profile.id == "intel-nuc"
    assert "CPU has avx2, avx512f, avx512_vnni" in detection.explain()


def test_a_matching_cpu_name_without_its_isa_features_falls_back_to_generic(tmp_path):
    facts = MachineFacts.read(_root(tmp_path, NUC_CPUINFO.replace(" avx512_vnni", "")))
    assert "avx512_vnni" not in facts.features
    detection = detect_profile(replace(facts, arch="x86_64", cores=8, ram_mb=16_000))
    assert detection.profile.id == "generic-x86_64" and "generic fallback" in detection.reasons


def test_an_empty_root_reads_as_no_facts(tmp_path):
    facts = MachineFacts.read(tmp_path)
    assert facts.features == frozenset() and facts.cpu_model == "" and facts.device_tree_model == ""
