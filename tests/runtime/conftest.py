"""Fixtures of the runtime tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from edge_sdk.manifest import Variant
from edge_sdk.runtime.backends.base import Session
from edge_sdk.runtime.model import EdgeModel


class ServedBy:
    """Calls the real :meth:`EdgeModel.run` and says which variant served each call: every
    session's ``run`` notes its ``variant_id`` in the calling thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def note(self, session: Session) -> None:
        self._local.variant_id = session.variant_id

    def run(self, model: EdgeModel, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Variant]:
        self._local.variant_id = None
        outputs = model.run(inputs)
        return outputs, model.manifest.variant(self._local.variant_id)


@pytest.fixture
def served_by(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedBy]:
    observer = ServedBy()
    real_run = Session.run

    def run(self: Session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = real_run(self, inputs)
        observer.note(self)
        return outputs

    monkeypatch.setattr(Session, "run", run)
    yield observer
