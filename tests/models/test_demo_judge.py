"""The shipped demo model draws the prompt: the judge's figures on held-out prompts, on the CPU, as CI runs it.

The model is loaded the way ``--model demo`` loads it and run through the real ``ZImagePipeline`` (float32, CPU).
The prompts come from the held-out split (colour/shape/background combinations never trained on). Skipped, with
the reason, when the trained weights are not in the package.

The whole held-out split of 200 prompts (docs/demo-model.md) is judged by `zimage-ui train-demo`'s own evaluation
on the GPU and, on the CPU as the product runs it, by `scripts/demo_limits.py --split held-out`.
"""

from __future__ import annotations

import pytest
import torch

from zimage_ui.models.demo import DEMO_WEIGHTS, TRAINED_SIDE
from zimage_ui.models.judge import TARGETS, generate_and_judge
from zimage_ui.models.shapes_world import held_out_scenes

pytestmark = pytest.mark.skipif(
    not DEMO_WEIGHTS.is_file(),
    reason=f"the trained demo weights are not shipped ({DEMO_WEIGHTS} is absent): run `zimage-ui train-demo --out DIR`"
           " on a GPU and copy DIR/demo.safetensors there",
)

CI_PROMPTS = 30


@pytest.fixture(scope="module")
def turbo(pipe):
    return generate_and_judge(pipe, held_out_scenes(CI_PROMPTS), side=TRAINED_SIDE, steps=8, guidance=0.0, seed=0,
                              batch=10)


@pytest.fixture(scope="module")
def pipe():
    from zimage_ui.models import demo
    from zimage_ui.models.loading import load_model
    from zimage_ui.models.sources import DEMO_SOURCE

    with pytest.MonkeyPatch.context() as mp:  # the shipped weights (the suite's default is the untrained model)
        mp.delenv(demo.WEIGHTS_ENV, raising=False)
        lm = load_model(DEMO_SOURCE, device="cpu")
    assert lm.label == "demo model (tiny, trained on simple shapes)"
    return lm.pipe


def misses(rows) -> list:
    return [(s.caption, r) for s, r, sc, _ in rows if not all(v for v in sc.values() if v is not None)]


def test_turbo_draws_held_out_prompts(turbo):
    summary, rows = turbo
    print("turbo, 30 held-out prompts:", {k: summary[k] for k in ("background", "colour", "shape", "position")})
    for key, floor in TARGETS.items():
        assert summary[key] >= floor, (key, summary, misses(rows)[:8])


def test_standard_preset_with_guidance_still_draws_it(pipe):
    # Standard: 25 steps, guidance 4 (classifier-free guidance against the empty prompt)
    summary, rows = generate_and_judge(pipe, held_out_scenes(CI_PROMPTS)[:4], side=TRAINED_SIDE, steps=25,
                                       guidance=4.0, seed=0, batch=4)
    assert summary["background"] >= 0.75 and summary["colour"] >= 0.75, (summary, [(s.caption, r) for s, r, *_ in rows])


def test_the_prompt_changes_the_picture(pipe):
    # the same seed, two prompts: the judge reads each prompt's own colours (not a fixed picture)
    from zimage_ui.models.judge import read_picture

    images = pipe(["a red circle on a blue background", "a blue circle on a red background"], height=TRAINED_SIDE,
                  width=TRAINED_SIDE, num_inference_steps=8, guidance_scale=0.0,
                  generator=[torch.Generator().manual_seed(1) for _ in range(2)]).images
    first, second = read_picture(images[0]), read_picture(images[1])
    assert (first.background, first.colour) == ("blue", "red")
    assert (second.background, second.colour) == ("red", "blue")


def test_the_sampling_sweep_script_judges_each_setting(trained_demo):
    """``scripts/demo_limits.py`` (docs/demo-model.md's sampling figures) runs and prints one line per setting."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "demo_limits.py"
    done = subprocess.run([sys.executable, str(script), "--split", "validation", "--prompts", "2", "--shifts", "3,6",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("validation shift")]
    assert [line.split(":")[0] for line in lines] == ["validation shift 3 steps 8 guidance 0",
                                                "validation shift 6 steps 8 guidance 0"]
    assert all("'shape': " in line and "'prompts': 2" in line for line in lines)
