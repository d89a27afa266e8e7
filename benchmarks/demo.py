"""psa beside dense attention and binary block-sparse attention, on real video.

Runs the small video transformer benchmarks/ ships (fidelity_model.py: 4 layers, 3 heads of 64, trained
on frames 0-199 of cockatoo.mp4, a BSD-2 clip from Debian's python3-imageio package that the first run
fetches with apt-get) on held-out frames, captures the q, k, v of every attention layer, and runs on
each: dense SDPA, psa with its default config, and binary block-sparse attention (level 1 or skip) at
psa's measured density, so both spend the same compute. It prints each one's error against dense
attention and its time. On the GPU when psa has its CUDA backend there (bfloat16), else on the CPU
reference backend (float32).

`--synthetic` runs on smooth video-shaped random tokens at a real model's size instead (the wan1.3b
shape on the GPU), where psa's speed shows; without apt-get the demo says so and does that.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from psa import PSAConfig, tools  # noqa: E402
from psa.tools.evaluate import binary_config  # noqa: E402
from shapes import SHAPES  # noqa: E402

HOW_TO_READ = (
    "How to read it: 'rel L2' is the distance of each output from dense attention relative to its size "
    "(0 = exact, lower is better) and 'cosine' its direction (1 = exact); compare psa with binary "
    "block-sparse at the same density, i.e. the same compute. ")
READ_REAL = (
    "On this model and clip the default config "
    "(density ~0.15) reaches a mean rel L2 near 0.07 (cosine ~0.997) against binary's ~0.08: psa gains most "
    "where attention is spread out (layer 0), while in sharply focused layers binary's full-resolution "
    "blocks can match it. psa's speed shows at video-DiT lengths (tens of thousands of tokens: --synthetic, "
    "benchmarks/bench_attention.py), not on this short clip.")
READ_SYNTHETIC = (
    "These random tokens have no trained attention pattern, so both errors are large and only their order "
    "means something; this mode is for time. Real inputs: run without --synthetic.")


def has_cuda_backend() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "psa::attention_over_pyramid", "CUDA")


def timed(fn, device, repeats):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) / repeats * 1e3


def compare(q, k, v, device, repeats, config=None):
    """Rows (name, ms, density, coverage, rel L2, cosine) of dense, psa and binary at psa's density."""
    dense, dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
    config = config or PSAConfig()
    (out, levels), psa_ms = timed(lambda: psa.sparse_attention(q, k, v, config, return_levels=True), device,
                                  repeats)
    stats = psa.level_stats(levels)
    binary = binary_config(config, stats["density"])
    (binary_out, binary_levels), binary_ms = timed(
        lambda: psa.sparse_attention(q, k, v, binary, return_levels=True), device, repeats)
    binary_stats = psa.level_stats(binary_levels)

    def errors(result):
        result, reference = result.double().flatten(2), dense.double().flatten(2)
        rel = ((result - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
        return rel, F.cosine_similarity(result, reference, dim=-1).mean().item()

    return [("dense SDPA", dense_ms, 1.0, 1.0, 0.0, 1.0),
            ("psa (pyramid)", psa_ms, stats["density"], stats["coverage"], *errors(out)),
            ("binary block-sparse", binary_ms, binary_stats["density"], binary_stats["coverage"],
             *errors(binary_out))]


def print_rows(rows, label=""):
    print(f"{label:<8}{'method':<22}{'ms':>9}{'density':>9}{'coverage':>9}{'rel L2':>9}{'cosine':>9}")
    for name, ms, density, coverage, rel, cos in rows:
        print(f"{'':<8}{name:<22}{ms:>9.2f}{density:>9.3f}{coverage:>9.3f}{rel:>9.4f}{cos:>9.4f}")


def real_video(device, dtype, frames, repeats):
    from fidelity_model import HELD_OUT_FRAMES, fetch_clip, grid_of, load_frames, load_model, patchify
    clip = load_frames(fetch_clip())[list(HELD_OUT_FRAMES)][:frames]
    grid = grid_of(len(clip))
    model = load_model(device, dtype)
    with torch.no_grad(), tools.capture(model, grid=grid) as captures:
        model(patchify(clip)[None].to(device, dtype), grid)
    tokens = grid[0] * grid[1] * grid[2]
    print(f"psa demo on {describe(device)}, {dtype}: cockatoo.mp4 frames {HELD_OUT_FRAMES.start}-"
          f"{HELD_OUT_FRAMES.start + len(clip) - 1} through the small trained video transformer, "
          f"{len(captures)} attention layers of {tokens} tokens ({grid[0]}x{grid[1]}x{grid[2]} patches), "
          f"3 heads of 64, block 128, default config")
    totals = None
    for capture in captures:
        q, k, v = (t.to(device) for t in (capture.q, capture.k, capture.v))
        rows = compare(q, k, v, device, repeats)
        print_rows(rows, f"layer {capture.layer}")
        totals = rows if totals is None else [
            (a[0],) + tuple(x + y for x, y in zip(a[1:], b[1:])) for a, b in zip(totals, rows)]
    mean = [(row[0],) + tuple(x / len(captures) for x in row[1:]) for row in totals]
    print_rows(mean, "mean")


def synthetic(device, dtype, repeats):
    """Smooth random video-shaped tokens at a real model's size (no data needed)."""
    shape = SHAPES["wan1.3b_480p" if device == "cuda" else "cpu_small"]
    t, h, w = shape.grid
    generator = torch.Generator().manual_seed(0)

    def tokens():
        coarse = torch.randn(1, shape.heads * shape.head_dim, max(1, t // 2), max(1, h // 4), max(1, w // 4),
                             generator=generator)
        field = F.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=False)
        x = field.view(shape.heads, shape.head_dim, t * h * w).transpose(1, 2).unsqueeze(0)
        x = x + 0.3 * torch.randn(x.shape, generator=generator)
        return (x * 1.5).to(device=device, dtype=dtype).contiguous()

    q, k, v = tokens(), tokens(), tokens()
    print(f"psa demo on {describe(device)}, {dtype}: synthetic smooth tokens, {shape.name} shape "
          f"(heads={shape.heads}, tokens={q.shape[2]}, head_dim={shape.head_dim}), default config")
    print_rows(compare(q, k, v, device, repeats))


def describe(device):
    return torch.cuda.get_device_name() if device == "cuda" else "the CPU reference backend"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=12, help="held-out frames of the clip (576 tokens each)")
    parser.add_argument("--synthetic", action="store_true", help="random video-shaped tokens at a model's size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if has_cuda_backend() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    real = not args.synthetic
    if real:
        try:
            real_video(device, dtype, args.frames, args.repeats)
        except (OSError, RuntimeError, ImportError) as error:
            print(f"(the real clip is unavailable here: {error}; running on synthetic tokens instead)")
            real = False
    if not real:
        synthetic(device, dtype, args.repeats)
    print(HOW_TO_READ + (READ_REAL if real else READ_SYNTHETIC))


if __name__ == "__main__":
    main()
