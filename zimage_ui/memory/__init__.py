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
:mod:`.estimator` (peak working memory, admission), :mod:`.planner` (placement from a VRAM budget).
"""

from zimage_ui.memory import nvml
from zimage_ui.memory.estimator import (
    DEFAULT_MARGIN_BYTES,
    Admission,
    AdmissionState,
    WorkingMemoryEstimator,
    WorkShape,
    admit,
    admit_shape,
    available_bytes,
    largest_fitting,
)
from zimage_ui.memory.planner import (
    PLACEMENTS,
    Z_IMAGE_TURBO_BF16,
    ComponentSizes,
    DeviceFacts,
    Placement,
    PlacementOption,
    PlanResult,
    plan,
)
from zimage_ui.memory.probe import (
    CpuMemorySource,
    CudaMemorySource,
    MemoryProbe,
    MemorySnapshot,
    MemorySource,
    RawMemory,
    compose_snapshot,
    make_probe,
    weights_on_device,
)

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
    "admit_shape",
    "available_bytes",
    "compose_snapshot",
    "largest_fitting",
    "make_probe",
    "nvml",
    "plan",
    "weights_on_device",
]
