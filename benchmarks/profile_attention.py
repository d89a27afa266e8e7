"""One launch of the CUDA attention kernel, or of an estimator's, for Nsight Compute to read
(`gpu_session.sh ncu`).

Builds random bf16 inputs of a model shape, the K/V pyramid and a level map (every block at one level,
or the default config's map from `estimate_levels` with --map psa), runs `attention_over_pyramid` once
to warm up and once more: profile with `ncu --launch-skip 1 --launch-count 1 -k regex:attention_with_levels`.
With --estimator it runs `estimate_importance` twice instead (profile with `-k regex:estimate_`, which
gpu_session.sh picks when NCU_KERNEL=estimate_).

Usage: python benchmarks/profile_attention.py [--shape wan1.3b_480p] [--map 1|2|4|8|psa]
       python benchmarks/profile_attention.py --estimator antidiagonal|sampled|pooled [--causal]
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from shapes import SHAPES  # noqa: E402

BLOCK = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="wan1.3b_480p", choices=sorted(SHAPES))
    parser.add_argument("--map", default="1", choices=["1", "2", "4", "8", "psa"])
    parser.add_argument("--estimator", choices=["antidiagonal", "sampled", "pooled"])
    parser.add_argument("--causal", action="store_true", help="with --estimator: causal scores")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    if args.estimator:
        config = psa.PSAConfig(estimator=args.estimator, causal=args.causal)
        for _ in range(2):
            psa.estimate_importance(q, k, config)
        torch.cuda.synchronize()
        print(f"profiled {args.shape}, estimator {args.estimator}")
        return
    pyramid = psa.kv_pyramid(k, v)
    if args.map == "psa":
        levels = psa.estimate_levels(q, k)
    else:
        n_blocks = math.ceil(shape.tokens / BLOCK)
        levels = torch.full((1, shape.heads, n_blocks, n_blocks), int(args.map), dtype=torch.int8, device="cuda")
    for _ in range(2):
        psa.attention_over_pyramid(q, pyramid, levels, block_m=BLOCK, block_n=BLOCK)
    torch.cuda.synchronize()
    print(f"profiled {args.shape}, map {args.map}")


if __name__ == "__main__":
    main()
