"""Calibration sources: arrays, images, random (opt-in); bad folders name the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_sdk.converters.calibration import (ArrayFiles, ImageFiles, ImageOptions, load_labels,
                                             load_samples, source_for)
from edge_sdk.errors import ConfigError
from edge_sdk.manifest import TensorSpec

IMAGE = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 8, 8])]
MULTI = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 8, 8]), TensorSpec(name="imu", dtype="float32", shape=[1, 6])]


def test_npy_folder_single_and_stacked(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.random((1, 3, 8, 8), dtype=np.float32))
    np.save(tmp_path / "b.npy", rng.random((4, 3, 8, 8), dtype=np.float32))  # 4 samples stacked on the batch axis
    source = source_for(tmp_path)
    assert isinstance(source, ArrayFiles)
    got = source.read(IMAGE)
    assert len(got.samples) == 5 and got.names == ["a", "b[0]", "b[1]", "b[2]", "b[3]"]
    assert all(s["image"].shape == (1, 3, 8, 8) for s in got.samples)
    np.testing.assert_array_equal(got.samples[2]["image"][0], np.load(tmp_path / "b.npy")[1])
    assert not got.warnings


def test_npz_for_multi_input_models(tmp_path):
    np.savez(tmp_path / "s0.npz", image=np.zeros((1, 3, 8, 8), np.float32), imu=np.ones((1, 6), np.float32))
    got = load_samples(tmp_path, MULTI)
    assert set(got.samples[0]) == {"image", "imu"}
    np.savez(tmp_path / "s1.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ConfigError, match=r"s1.npz: missing arrays for inputs \['imu'\]"):
        load_samples(tmp_path, MULTI)


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 3, 9, 8), np.float32), r"has shape \[1, 3, 9, 8\], the model expects \[1, 3, 8, 8\]"),
    (np.zeros((1, 3, 8, 8), np.float64), "has dtype float64, the model expects float32"),
])
def test_wrong_shape_or_dtype_names_the_file(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ConfigError, match="bad.npy.*" + message):
        load_samples(tmp_path, IMAGE)


def test_empty_missing_and_mixed_folders(tmp_path):
    with pytest.raises(ConfigError, match="empty folder"):
        load_samples(tmp_path, IMAGE)
    with pytest.raises(ConfigError, match="no such file"):
        load_samples(tmp_path / "nope", IMAGE)
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    with pytest.raises(ConfigError, match="mixes array files"):
        load_samples(tmp_path, IMAGE)


def test_corrupt_npy(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="x.npy: cannot read"):
        load_samples(tmp_path, IMAGE)


def test_image_folder_resize_and_normalize(tmp_path):
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    Image.fromarray(pixels).save(tmp_path / "red.png")
    source = source_for(tmp_path, ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert isinstance(source, ImageFiles)
    got = source.read(IMAGE)
    image = got.samples[0]["image"]
    assert image.shape == (1, 3, 8, 8) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 0], 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(image[0, 1:], -1.0, atol=1e-6)


def test_random_is_explicit_and_warned():
    got = load_samples("random:5", IMAGE)
    assert len(got.samples) == 5 and got.source == "random"
    assert got.warnings and "random" in got.warnings[0]
    with pytest.raises(ConfigError, match="random:N"):
        source_for("random:zero")


def test_labels_text_npy_and_count(tmp_path):
    names = ["a", "b", "c"]
    (tmp_path / "labels.txt").write_text("# name,label\nc.npy,2\na.npy,0\nb.npy,1\n")
    np.testing.assert_array_equal(load_labels(tmp_path / "labels.txt", names), [0, 1, 2])
    np.save(tmp_path / "labels.npy", np.array([3, 4, 5]))
    np.testing.assert_array_equal(load_labels(tmp_path / "labels.npy", names), [3, 4, 5])
    with pytest.raises(ConfigError, match="2 labels for 3 calibration samples"):
        load_labels([1, 2], names)
    (tmp_path / "bad.txt").write_text("a,cat\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: 'cat' is not an integer"):
        load_labels(tmp_path / "bad.txt", names)
