"""What limits the trained demo model's shapes: the judge's figures for other sampling settings of the same weights.

    .venv/bin/python scripts/demo_limits.py --split validation --shifts 1,2,3,4,6,9    # the schedule's shift
    .venv/bin/python scripts/demo_limits.py --split held-out --steps 32                # more passes, guidance 0
    .venv/bin/python scripts/demo_limits.py --steps 8,25 --guidance 0,2,4 --weights FILE  # a teacher's guidance

``validation``: scenes of the training split (seen colour/shape/background triples, new scenes); ``held-out``: the
judge's 200 prompts (``held_out_scenes``). One line per setting; docs/demo-model.md has the figures.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_ui.models.demo import SCHEDULER_CONFIG, load_trained_pipeline
from zimage_ui.models.judge import generate_and_judge
from zimage_ui.models.shapes_world import held_out_scenes, sample_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("validation", "held-out"), default="held-out")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--shifts", default=str(SCHEDULER_CONFIG["shift"]), help="comma-separated")
    parser.add_argument("--steps", default="8", help="comma-separated pass counts")
    parser.add_argument("--guidance", default="0", help="comma-separated guidance scales (CFG above 0)")
    parser.add_argument("--weights", default=None, help="a demo-weights file (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (float32, as the product runs it) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_trained_pipeline(args.weights).to(args.device)
    if args.split == "validation":
        rng = random.Random("validation:0")
        scenes = [sample_scene(rng) for _ in range(args.prompts)]
    else:
        scenes = held_out_scenes(args.prompts)
    for shift in (float(x) for x in args.shifts.split(",")):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**{**SCHEDULER_CONFIG, "shift": shift})
        for steps in (int(x) for x in args.steps.split(",")):
            for guidance in (float(x) for x in args.guidance.split(",")):
                start = time.perf_counter()
                with torch.inference_mode():
                    summary, _ = generate_and_judge(pipe, scenes, steps=steps, guidance=guidance, seed=0)
                figures = {k: round(v, 3) for k, v in summary.items() if not k.endswith("_n")}
                print(f"{args.split} shift {shift:g} steps {steps} guidance {guidance:g}: {figures} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
