"""This machine's own parallelism for the throughput test: the same picture in two bare processes, one torch thread
each (what two replicas are, without Ray), against one alone. Separate processes, as replicas are: two threads of
one process share its allocator and the GIL, and measure less than the machine gives."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any


def _worker(index: int, job: dict[str, Any], barrier: Any, out: Any) -> None:
    import torch

    torch.set_num_threads(1)
    from zimage_ui.models.demo import load_demo_pipeline

    pipe = load_demo_pipeline()

    def run(seed: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=job["prompt"], width=job["width"], height=job["height"], num_inference_steps=8,
                 guidance_scale=0.0, generator=torch.Generator().manual_seed(seed))
        return time.perf_counter() - start

    run(0)  # warm
    barrier.wait()
    alone = run(1) if index == 0 else 0.0  # the others wait: process 0 has the machine to itself
    barrier.wait()
    together = run(2)
    out.put((index, alone, together))


def parallel_ratio(job: dict[str, Any], processes: int = 2, timeout: float = 300) -> float:
    """Throughput of ``processes`` bare processes at once over one alone (2.0: the machine gives two full cores)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, job, barrier, out), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    alone = next(a for i, a, _ in results if i == 0)
    slowest = max(t for _, _, t in results)
    return (processes / slowest) / (1 / alone)
