"""Shared fixtures: sample models generated in code, and (added by the sync tests) a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk import samples


@pytest.fixture(scope="session")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated residual CNN (input ``image`` [1,3,32,32] → ``logits`` [1,10]), opset 17."""
    return samples.save(samples.make_cnn(), tmp_path_factory.mktemp("models") / "cnn.onnx")


@pytest.fixture(scope="session")
def multimodal_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated fusion model: ``image`` + ``audio`` + ``imu`` → ``scores``."""
    return samples.save(samples.make_multimodal(), tmp_path_factory.mktemp("models") / "multimodal.onnx")


@pytest.fixture(scope="session")
def cnn_calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of .npy calibration samples for the CNN (smooth images, not white noise)."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i in range(16):
        base = rng.random((1, 3, 4, 4)).astype(np.float32)
        image = np.kron(base, np.ones((1, 1, 8, 8), np.float32)) + 0.05 * rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        np.save(folder / f"sample_{i:02d}.npy", image.astype(np.float32))
    return folder
