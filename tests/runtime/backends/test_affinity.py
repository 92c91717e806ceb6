"""CPU pinning: the runtime's worker threads go to the profile's big cores, the loading thread
keeps its own mask (it is the app's thread, or the monitor thread during a switch)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.profiles import get_profile
from edge_sdk.runtime.backends.base import cpu_affinity
from edge_sdk.runtime.model import EdgeModel

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="not applicable here: needs Linux CPU affinity and at least 2 usable cores")


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def test_context_restores_the_callers_mask() -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    seen = {}
    with cpu_affinity((core, 10_000)):  # cores this process may not use are ignored
        seen["inside"] = os.sched_getaffinity(0)
        worker = threading.Thread(target=lambda: seen.update(worker=os.sched_getaffinity(0)))
        worker.start()
        worker.join()
    assert seen == {"inside": {core}, "worker": {core}}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(RuntimeError):
        with cpu_affinity((core,)):
            raise RuntimeError("load failed")
    assert os.sched_getaffinity(0) == before


def test_big_cores_pin_the_runtime_pool_not_the_loading_thread(cnn_release: Path) -> None:
    before = os.sched_getaffinity(0)
    big = max(before)
    base = get_profile("intel-nuc")
    profile = base.model_copy(update={"cpu": base.cpu.model_copy(update={"cores": 2, "big_cores": [big]}), "threads": 2})
    tasks_before = _tasks()
    with EdgeModel.load(cnn_release, profile=profile, precision="fp32", threads=2, monitor=False) as model:
        assert model.run({"image": np.zeros((1, 3, 32, 32), np.float32)})["logits"].shape == (1, 10)
        assert os.sched_getaffinity(0) == before  # the loading thread is not left pinned
        workers = _tasks() - tasks_before  # onnxruntime's intra-op pool, started while loading
        assert workers
        assert {tid: os.sched_getaffinity(tid) for tid in workers} == {tid: {big} for tid in workers}
