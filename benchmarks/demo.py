"""PSA beside dense attention on a video-shaped input.

Builds q, k, v for a latent video grid whose tokens vary smoothly in space and time (as real video
DiT activations do, and unlike i.i.d. noise), then runs dense SDPA, psa with its default config, and
binary block-sparse attention at the same density (levels 1 and 0 only). Prints time, density,
coverage and the error of each against dense. Runs on CUDA when psa has its CUDA backend there, on
the CPU reference backend otherwise.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from psa import PSAConfig  # noqa: E402
from shapes import SHAPES  # noqa: E402


def has_cuda_backend() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "psa::attention_with_levels", "CUDA")


def video_tokens(grid, heads, head_dim, device, dtype, generator):
    """[1, heads, T*H*W, head_dim] in raster order: a smooth random field plus a little noise."""
    t, h, w = grid
    coarse = torch.randn(1, heads * head_dim, max(1, t // 2), max(1, h // 4), max(1, w // 4), generator=generator)
    field = F.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=False)
    tokens = field.view(heads, head_dim, t * h * w).transpose(1, 2).unsqueeze(0)
    tokens = tokens + 0.3 * torch.randn(tokens.shape, generator=generator)
    return (tokens * 1.5).to(device=device, dtype=dtype).contiguous()


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: wan1.3b_480p on CUDA, cpu_small on the CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = "cuda" if has_cuda_backend() else "cpu"
    shape = SHAPES[args.shape or ("wan1.3b_480p" if device == "cuda" else "cpu_small")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (video_tokens(shape.grid, shape.heads, shape.head_dim, device, dtype, generator) for _ in range(3))
    print(f"psa demo on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU reference backend'}),"
          f" {shape.name}: heads={shape.heads}, tokens={q.shape[2]} (grid {shape.grid}), head_dim={shape.head_dim},"
          f" {dtype}")

    dense, dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, args.repeats)
    config = PSAConfig()
    (out, levels), psa_ms = timed(lambda: psa.sparse_attention(q, k, v, config, return_levels=True), device,
                                  args.repeats)
    stats = psa.level_stats(levels)
    density = stats["density"]
    binary = PSAConfig(bounds=(density,) * 4, min_full=0.0)
    (binary_out, binary_levels), binary_ms = timed(
        lambda: psa.sparse_attention(q, k, v, binary, return_levels=True), device, args.repeats)

    def errors(result):
        diff = (result.double() - dense.double()).flatten(2)
        rel = (diff.norm(dim=-1) / dense.double().flatten(2).norm(dim=-1)).mean().item()
        cos = F.cosine_similarity(result.double().flatten(2), dense.double().flatten(2), dim=-1).mean().item()
        return rel, cos

    rows = [("dense SDPA", dense_ms, 1.0, 1.0, 0.0, 1.0),
            ("psa (pyramid)", psa_ms, density, stats["coverage"], *errors(out))]
    binary_stats = psa.level_stats(binary_levels)
    rows.append(("binary block-sparse", binary_ms, binary_stats["density"], binary_stats["coverage"],
                 *errors(binary_out)))
    print(f"{'method':<22}{'ms':>10}{'density':>10}{'coverage':>10}{'rel L2 err':>12}{'cosine':>10}")
    for name, ms, dens, cov, rel, cos in rows:
        print(f"{name:<22}{ms:>10.2f}{dens:>10.3f}{cov:>10.3f}{rel:>12.4f}{cos:>10.4f}")
    print("level histogram (psa): " + ", ".join(f"{lvl}: {frac:.3f}" for lvl, frac in stats["histogram"].items()))


if __name__ == "__main__":
    main()
