"""`edge-sdk align` on CSV/Parquet files gives merge_asof's rows."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from needs import need_module

from edge_sdk.cli import main
from edge_sdk.runtime.align import Stream, align


def write_csv(path, header, rows):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(3)
    cam = np.round(np.sort(rng.uniform(0, 10, 40)), 4)
    audio = np.round(np.sort(rng.uniform(0, 10, 300)), 4)
    imu = np.round(np.sort(rng.uniform(0, 10, 500)), 4)
    write_csv(tmp_path / "cam.csv", ["ts", "frame"], [[t, f"f{i}"] for i, t in enumerate(cam)])
    write_csv(tmp_path / "audio.csv", ["timestamp", "rms"], [[t, i * 0.5] for i, t in enumerate(audio)])
    write_csv(tmp_path / "imu.csv", ["ts", "ax", "ay"], [[t, np.sin(t), np.cos(t)] for t in imu])
    return tmp_path, cam, audio, imu


def test_cli_csv_matches_merge_asof(files):
    folder, cam, audio, imu = files
    out = folder / "aligned.csv"
    with pytest.raises(SystemExit) as info:
        main(["align", "--reference", str(folder / "cam.csv"), "--stream", f"{folder / 'audio.csv'}:nearest:0.05",
              "--stream", f"motion={folder / 'imu.csv'}:previous:0.02:0.001", "-o", str(out)])
    assert info.value.code in (0, None)
    got = pd.read_csv(out)
    assert list(got.columns) == ["ts", "frame", "audio.index", "audio.ts", "audio.rms", "motion.index", "motion.ts",
                                 "motion.ax", "motion.ay"]
    want_a = pd.merge_asof(pd.DataFrame({"ts": cam}), pd.DataFrame({"ts": audio, "i": np.arange(audio.size)}),
                           on="ts", direction="nearest", tolerance=0.05)
    np.testing.assert_array_equal(got["audio.index"], want_a["i"].fillna(-1).astype(int))
    np.testing.assert_array_equal(got["audio.rms"].isna(), want_a["i"].isna())
    want_m = pd.merge_asof(pd.DataFrame({"ts": cam}), pd.DataFrame({"ts": imu + 0.001, "i": np.arange(imu.size)}),
                           on="ts", direction="backward", tolerance=0.02)
    np.testing.assert_array_equal(got["motion.index"], want_m["i"].fillna(-1).astype(int))
    ok = want_m["i"].notna().to_numpy()
    np.testing.assert_array_equal(got["motion.ax"][ok], np.sin(imu[want_m["i"][ok].astype(int)]))
    assert got["frame"].tolist() == [f"f{i}" for i in range(cam.size)]


def test_cli_parquet_roundtrip(files):
    need_module("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, cam, audio, imu = files
    pq.write_table(pa.table({"ts": imu, "ax": np.sin(imu), "ay": np.cos(imu)}), folder / "imu.parquet")
    out = folder / "aligned.parquet"
    with pytest.raises(SystemExit) as info:
        main(["align", "-r", str(folder / "cam.csv"), "-s", f"{folder / 'imu.parquet'}:interpolate:0.05", "-o", str(out)])
    assert info.value.code in (0, None)
    got = pd.read_parquet(out)
    want = align(cam, {"imu": Stream(imu, np.stack([np.sin(imu), np.cos(imu)], 1), "interpolate", 0.05)})["imu"]
    assert got.shape[0] == cam.size and 0 < want.mask.sum() < cam.size
    np.testing.assert_array_equal(got["imu.index"], want.indices)
    np.testing.assert_array_equal(got["imu.ax"].to_numpy()[want.mask], want.values[want.mask, 0])
    assert got["imu.ax"].isna().to_numpy().tolist() == (~want.mask).tolist()


def test_cli_errors_are_one_line(files, tmp_path):
    folder, *_ = files
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", "align", "-r", str(folder / "cam.csv"), "-s",
                           f"{folder / 'audio.csv'}:closest", "-o", str(tmp_path / "x.csv")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "stream 'audio': unknown policy 'closest'" in proc.stderr and "Traceback" not in proc.stderr
    write_csv(tmp_path / "bad.csv", ["ts", "v"], [[0.0, 1], ["nan", 2]])
    with pytest.raises(SystemExit) as info:
        main(["align", "-r", str(tmp_path / "bad.csv"), "-s", f"{folder / 'audio.csv'}:nearest", "-o", str(tmp_path / "y.csv")])
    assert info.value.code == 1
    with pytest.raises(SystemExit):
        main(["align", "-r", str(folder / "cam.csv"), "-s", f"{folder / 'audio.csv'}:nearest:abc", "-o", str(tmp_path / "z.csv")])
