"""Device memory as a library: what is in VRAM/RAM now, what a request will need, where the weights should live.

No Gradio or FastAPI here, and nothing touches the GPU or NVML at import; the UI, the REST API and ``doctor`` are
thin adapters over these objects. On a machine without CUDA or NVML it works and says so:

    >>> import torch
    >>> from zimage_ui.memory import WorkShape, WorkingMemoryEstimator, admit, make_probe
    >>> probe = make_probe(torch.device("cpu"), weights_bytes=lambda: 0)
    >>> snap = probe.snapshot()
    >>> snap.label
    'CPU · RAM'
    >>> est = WorkingMemoryEstimator.default_for(snap.device_kind, weights_bytes=snap.weights_bytes)
    >>> admit(snap, est.predict(WorkShape(256, 256)), margin_bytes=0).state in ("ok", "tight", "over")
    True

Modules: :mod:`.probe` (snapshots and the bar's segments), :mod:`.nvml` (the one NVML wrapper),
:mod:`.estimator` (peak working memory), :mod:`.admission` (does a request fit now), :mod:`.planner` (placement
from a VRAM budget).
"""

# Names are imported on first use (PEP 562), so ``import zimage_ui.memory.allocator`` — which the command line does
# before anything else, to configure CUDA's allocator — pulls in neither torch nor numpy.
_WHERE = {
    "DEFAULT_MARGIN_BYTES": "estimator",
    "Admission": "admission",
    "AdmissionState": "admission",
    "WorkingMemoryEstimator": "estimator",
    "WorkShape": "estimator",
    "admit": "admission",
    "admit_shape": "admission",
    "available_bytes": "admission",
    "largest_fitting": "admission",
    "admit_request": "admission",
    "explain_cohost": "admission",
    "PLACEMENTS": "planner",
    "Z_IMAGE_TURBO_BF16": "planner",
    "ComponentSizes": "planner",
    "DeviceFacts": "planner",
    "Placement": "planner",
    "PlacementOption": "planner",
    "PlanResult": "planner",
    "plan": "planner",
    "CpuMemorySource": "probe",
    "CudaMemorySource": "probe",
    "MemoryProbe": "probe",
    "MemorySnapshot": "probe",
    "MemorySource": "probe",
    "RawMemory": "probe",
    "compose_snapshot": "probe",
    "make_probe": "probe",
    "weights_on_device": "probe",
}


def __getattr__(name: str) -> object:
    import importlib

    if name in ("admission", "allocator", "estimator", "nvml", "planner", "probe"):  # ``memory.nvml`` as an attribute
        return importlib.import_module(f"zimage_ui.memory.{name}")
    if name in _WHERE:
        return getattr(importlib.import_module(f"zimage_ui.memory.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'zimage_ui.memory' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MARGIN_BYTES",
    "PLACEMENTS",
    "Z_IMAGE_TURBO_BF16",
    "Admission",
    "AdmissionState",
    "ComponentSizes",
    "CpuMemorySource",
    "CudaMemorySource",
    "DeviceFacts",
    "MemoryProbe",
    "MemorySnapshot",
    "MemorySource",
    "Placement",
    "PlacementOption",
    "PlanResult",
    "RawMemory",
    "WorkShape",
    "WorkingMemoryEstimator",
    "admit",
    "admit_request",
    "admit_shape",
    "available_bytes",
    "compose_snapshot",
    "explain_cohost",
    "largest_fitting",
    "make_probe",
    "nvml",
    "plan",
    "weights_on_device",
]
