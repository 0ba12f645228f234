"""``Engine.gpu_stats``: the doors' one way to NVML's reading of the engine's GPU."""

import types

import torch

from zimage_ui.engine.boot import Runtime
from zimage_ui.engine.engine import Engine
from zimage_ui.memory import nvml
from zimage_ui.settings import Settings


def test_reads_the_gpu_the_model_is_on(monkeypatch):
    asked: list[int] = []
    monkeypatch.setattr(nvml, "gpu_stats", lambda index: asked.append(index) or f"stats of {index}")
    engine = Engine(Settings(model="demo"))
    assert engine.gpu_stats() == "stats of 0"  # no model yet: GPU 0
    seam = engine.test_seam()
    seam.runtime = Runtime(model=types.SimpleNamespace(device=torch.device("cuda", 1)), book=engine.presets())
    assert engine.gpu_stats() == "stats of 1"
    seam.runtime.model = types.SimpleNamespace(device=torch.device("cpu"))  # a CPU model on a GPU machine: GPU 0
    assert engine.gpu_stats() == "stats of 0"
    assert asked == [0, 1, 0]


def test_none_without_nvml_or_gpu_here():
    # the real reading: None on a machine without a GPU (this CI), NVML's figures on one with
    stats = Engine(Settings(model="demo")).gpu_stats()
    if nvml.nvml_available():
        assert stats is not None and stats.memory_total_bytes > 0
    else:
        assert stats is None
