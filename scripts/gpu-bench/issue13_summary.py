"""Issue 13's table from runL.sh's / runM.sh's reports: python3 scripts/gpu-bench/issue13_summary.py RESULTS_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def vanilla(path: Path) -> float | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"run"' in line:
                return json.loads(line)["median_s"]
    except OSError:
        pass
    return None


def main(folder: str) -> None:
    r = Path(folder)
    rows = [("vanilla diffusers, eager", vanilla(r / "vanilla.jsonl")),
            ("vanilla + compile_repeated_blocks", vanilla(r / "vanilla_compile.jsonl"))]
    for name, label in (("bf16", "bf16"), ("fp8", "fp8"), ("bf16_restart", "bf16, restart")):
        rep = load(r / f"{name}.json")
        warm = rep.get("warm") or [{}, {}]
        http = rep.get("http") or {}
        rows.append((f"ours {label}, engine, new / same prompt",
                     f"{warm[0].get('median_s')} / {warm[1].get('median_s')}"))
        rows.append((f"ours {label}, HTTP, new / same prompt",
                     f"{(http.get('new_prompt') or {}).get('median_s')} / "
                     f"{(http.get('same_prompt') or {}).get('median_s')}"))
        if "direct" in rep:
            rows.append((f"ours {label}, direct pipeline call", rep["direct"]["median_s"]))
        c = http.get("concurrent")
        if c:
            rows.append((f"ours {label}, {c['clients']} clients: images/s, ratio, same pixels",
                         f"{c['images_per_s']} vs {http.get('sequential_images_per_s')} = {c['ratio_to_sequential']}x,"
                         f" {c['same_pixels_as_alone']}"))
        cs = rep.get("cold_start") or {}
        if cs:
            rows.append((f"ours {label}, cold start ready / warm-up / first request ratio",
                         f"{cs.get('ready_s')} / {cs.get('warmup_s')} / "
                         f"{(rep.get('first_request') or {}).get('ratio')}"))
            rows.append((f"ours {label}, cold start stages", ", ".join(
                f"{k} {v}" for k, v in cs.items() if k.endswith("_s") and k not in ("ready_s", "wall_s"))))
        if rep.get("save_png_median_s") is not None:
            rows.append((f"ours {label}, PNG save median s", rep["save_png_median_s"]))
        lat = rep.get("latents") or {}
        if "cosine" in lat:
            rows.append((f"ours {label} vs bf16: cosine min/mean, PSNR min/mean dB",
                         f"{lat['cosine']} / {lat.get('cosine_mean')}, {lat.get('psnr_db_min')} / "
                         f"{lat.get('psnr_db_mean')}"))
        comp = rep.get("components") or {}
        for key in ("encode_pipeline_ms", "encode_ms", "encode_128_tokens_ms",
                    "vae_decode_engine_ms", "vae_decode_eager_ms", "to_pil_on_device_ms"):
            if key in comp:
                rows.append((f"  {key}", comp[key]))
        for level, v in (comp.get("png") or {}).items():
            rows.append((f"  png {level} ms / KB", f"{v['ms']} / {v['bytes'] // 1024}"))
        for k in (comp.get("transformer_pass_top_kernels") or [])[:8]:
            rows.append((f"  kernel {k['name'][:70]}", f"{k['ms']} ms x{k['calls']}"))
        acc = (rep.get("acceleration") or {})
        if acc:
            att = acc.get("attention") or {}
            rows.append((f"ours {label}, attention / compile", f"{att.get('backend')} {att.get('timings_ms')} | "
                         f"{acc.get('compile_note')} | {att.get('reason')}"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    main(sys.argv[1])
