"""psa vs binary block-sparse attention at equal compute, on real video through a trained model.

Set-up fetches `cockatoo.mp4` from Debian's python3-imageio package (not committed) and loads the small
video transformer trained on its first 200 frames (`fidelity_model.py`, weights committed under
`benchmarks/weights/`). On held-out frames 200+ it captures every layer's q, k, v (psa.tools.capture)
and, at densities 0.10 / 0.15 / 0.25, evaluates (psa.tools.evaluate) against dense attention:
  - psa topk (the default level mix scaled to the density) and psa threshold (bounds calibrated on
    layer 1 to within 0.03 of the density, with the default mix or, where its density jumps past the
    target, another of calibrate's mixes; omitted if none lands), each without and with the
    similarity cap (0.7, 0.65, 0.6);
  - each in generalized-Hilbert token order and in raster order;
  - binary block-sparse attention with the same estimator at the same measured density.
Prints one Markdown table (relative L2 error and cosine similarity vs dense, mean over heads and
layers, worst head).

With --fp8-scoring it prints instead, per layer, how the antidiagonal estimator's FP8 scoring
(`estimate_precision="fp8"`) compares with full precision at density 0.15 (topk): the share of level-map
entries that agree, and the attention error of each map against dense attention (tokens in the captured
order).

Usage: python benchmarks/fidelity.py [--frames 12] [--device cpu|cuda] [--fp8-scoring]
Needs `pip install av` (PyAV, to decode the clip) and apt-get (to fetch it).
"""

import argparse
import dataclasses
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from psa import tools  # noqa: E402
from psa.tools.calibrate import DEFAULT_SHAPES  # noqa: E402
from fidelity_model import (HELD_OUT_FRAMES, WEIGHTS, fetch_clip, grid_of, load_frames,  # noqa: E402
                            load_model, patchify)

DENSITIES = (0.10, 0.15, 0.25)
SIM_CAP = (0.7, 0.65, 0.6)


def configs_for(density, captures, base):
    """{name: PSAConfig} at one target density."""
    default = psa.PSAConfig()
    scale = density / default.nominal_density
    topk = dataclasses.replace(base, mode="topk", bounds=tuple(min(1.0, b * scale) for b in default.bounds))
    configs = {"topk": topk, "topk+cap": dataclasses.replace(topk, sim_thresholds=SIM_CAP)}
    calibration = [c for c in captures if c.layer == 1]
    # Threshold density moves in steps: the default mix first, the other level mixes if it cannot land.
    for shapes in ([DEFAULT_SHAPES[0]], DEFAULT_SHAPES):
        try:
            threshold = tools.calibrate(calibration, target_density=density, mode="threshold", base=base,
                                        shapes=shapes, tolerance=0.03, iterations=16)
        except ValueError:
            continue
        configs["threshold"] = threshold
        configs["threshold+cap"] = dataclasses.replace(threshold, sim_thresholds=SIM_CAP)
        break
    return configs


def relative_l2(out: torch.Tensor, dense: torch.Tensor) -> float:
    return ((out.double() - dense.double()).norm() / dense.double().norm()).item()


def print_fp8_scoring_table(captures, density=0.15):
    """Antidiagonal estimator at full precision and with FP8 scoring, same config otherwise, per layer."""
    default = psa.PSAConfig()
    bounds = tuple(min(1.0, b * density / default.nominal_density) for b in default.bounds)
    full = psa.PSAConfig(block_m=128, block_n=128, estimator="antidiagonal", bounds=bounds)
    configs = {"full": full, "fp8": dataclasses.replace(full, estimate_precision="fp8")}
    print("| layer | level entries equal | density full / fp8 | rel L2 full | rel L2 fp8 |")
    print("|---|---|---|---|---|")
    for c in captures:
        dense = torch.nn.functional.scaled_dot_product_attention(c.q, c.k, c.v)
        levels = {name: psa.estimate_levels(c.q, c.k, config) for name, config in configs.items()}
        errors = {name: relative_l2(psa.attention_with_levels(c.q, c.k, c.v, level_map, block_m=128, block_n=128),
                                    dense) for name, level_map in levels.items()}
        agree = (levels["full"] == levels["fp8"]).double().mean().item()
        densities = [psa.level_stats(levels[name])["density"] for name in configs]
        print(f"| {c.layer} | {100 * agree:.2f}% | {densities[0]:.3f} / {densities[1]:.3f} | {errors['full']:.4f} | "
              f"{errors['fp8']:.4f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12, help="held-out frames per clip (576 tokens each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp8-scoring", action="store_true",
                        help="compare the antidiagonal estimator's FP8 scoring with full precision instead")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    model = load_model(args.device, dtype)
    frames = load_frames(fetch_clip())[list(HELD_OUT_FRAMES)][:args.frames]
    grid = grid_of(len(frames))
    with torch.no_grad(), tools.capture(model, grid=grid) as captures:
        model(patchify(frames)[None].to(args.device, dtype), grid)

    from safetensors import safe_open
    with safe_open(WEIGHTS, framework="pt") as f:
        training = f.metadata().get("training")
    print(f"# psa fidelity on cockatoo.mp4 frames {HELD_OUT_FRAMES.start}-{HELD_OUT_FRAMES.start + len(frames) - 1}"
          f" ({grid[0]}x{grid[1]}x{grid[2]} = {grid[0] * grid[1] * grid[2]} tokens, {len(captures)} layers),"
          f" {args.device}, {dtype}, {datetime.date.today().isoformat()}; model training: {training}")
    if args.fp8_scoring:
        print_fp8_scoring_table(captures)
        return
    base = psa.PSAConfig(block_m=128, block_n=128)
    print("| target | config | variant | density | coverage | rel L2 mean | rel L2 worst | cosine mean |")
    print("|---|---|---|---|---|---|---|---|")
    for density in DENSITIES:
        rows = tools.evaluate(captures, configs_for(density, captures, base), without_reorder=True)
        for row in rows:
            variant = {"psa": "psa gilbert", "psa raster": "psa raster", "binary": "binary gilbert"}[row["variant"]]
            print(f"| {density:.2f} | {row['config']} | {variant} | {row['density']:.3f} | {row['coverage']:.3f} | "
                  f"{row['rel_l2_mean']:.4f} | {row['rel_l2_worst']:.4f} | {row['cosine_mean']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
