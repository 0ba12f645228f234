"""PNG encode time at 1024²: zimage-ui's encoder (Sub filter + ISA-L deflate) against PIL's at level 4 (before).

    .venv/bin/python scripts/bench-png.py [--side 1024] [--runs 20]

Two images: "photo-like" (a smooth field with fine grain, like a generated picture) and "noise" (what the
random-weight benchmark model draws; incompressible). Prints median milliseconds and kilobytes.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from zimage_ui.metadata import encode_png, png_info
from zimage_ui.validation import RunRequest


def images(side: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    low = Image.fromarray((rng.random((side // 32, side // 32, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(low.resize((side, side), Image.BICUBIC), dtype=np.float32)
    photo = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return {"photo-like": Image.fromarray(photo), "noise": Image.fromarray(noise)}


def median_ms(fn, runs: int) -> tuple[float, int]:
    data = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    request = RunRequest("a lighthouse at dusk", "", "turbo", 8, 0.0, args.side, args.side, 7, 1)
    info = png_info(request, seed=7, model="demo")

    def pil_level4(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info, compress_level=4)
        return buf.getvalue()

    print(f"{args.side}x{args.side} RGB, median of {args.runs}")
    for name, image in images(args.side).items():
        ours_ms, ours_size = median_ms(lambda image=image: encode_png(image, info), args.runs)
        pil_ms, pil_size = median_ms(lambda image=image: pil_level4(image), args.runs)
        print(f"{name:>10}: zimage-ui {ours_ms:6.1f} ms {ours_size / 1024:6.0f} KB | "
              f"PIL level 4 {pil_ms:6.1f} ms {pil_size / 1024:6.0f} KB | {pil_ms / ours_ms:4.1f}x faster")


if __name__ == "__main__":
    main()
