"""One launch of the CUDA attention kernel, or of an estimator's, for Nsight Compute to read
(`gpu_session.sh ncu`).

Builds random bf16 inputs of a model shape, the K/V pyramid and a level map (every block at one level,
or the default config's map from `estimate_levels` with --map psa), runs `attention_over_pyramid` once
to warm up and once more: profile with `ncu --launch-skip 1 --launch-count 1 -k regex:attention_with_levels`.
With --estimator it runs `estimate_importance` twice instead (profile with `-k regex:estimate_`, which
gpu_session.sh picks when NCU_KERNEL=estimate_); --prefill TOKENS takes bench_prefill.py's causal VLM
shape (Qwen2.5-VL-7B's 28 query / 4 kv heads of 128) at that length instead of a video shape. With --fa4
SITE it runs FlashAttention-4's dense forward twice on the same shape (from SITE, where
benchmarks/fa4_wheels.sh installs it; NCU_KERNEL=Sm90), to compare its SASS and stalls with psa's kernel
at --map 1.

Usage: python benchmarks/profile_attention.py [--shape wan1.3b_480p] [--map 1|2|4|8|psa]
       python benchmarks/profile_attention.py --estimator antidiagonal|antidiagonal-fp8|sampled|pooled [--causal]
                                              [--prefill TOKENS]
       python benchmarks/profile_attention.py --fa4 /tmp/fa4site
"""

import argparse
import dataclasses
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from bench_attention import estimator_config  # noqa: E402
from shapes import SHAPES  # noqa: E402

BLOCK = 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="wan1.3b_480p", choices=sorted(SHAPES))
    parser.add_argument("--map", default="1", choices=["1", "2", "4", "8", "psa"])
    parser.add_argument("--estimator", choices=["antidiagonal", "antidiagonal-fp8", "sampled", "pooled"],
                        help="antidiagonal-fp8: FP8 scoring (quantize_anti_rows, then the FP8 GEMM)")
    parser.add_argument("--causal", action="store_true", help="with --estimator: causal scores")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="with --estimator: bench_prefill.py's GQA shape at TOKENS tokens, not --shape")
    parser.add_argument("--fa4", metavar="SITE", help="profile FlashAttention-4's dense forward from this site dir")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    if args.fa4:
        import site
        site.addsitedir(args.fa4)  # the CuTe DSL needs its .pth file read
        from flash_attn.cute.interface import flash_attn_func
        q4, k4, v4 = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # FA4 takes [B, L, H, D]
        torch.cuda.synchronize()
        for _ in range(2):
            flash_attn_func(q4, k4, v4)
        torch.cuda.synchronize()
        print(f"profiled {args.shape}, FA4 dense")
        return
    if args.estimator:
        if args.prefill:
            from bench_prefill import HEADS, HEAD_DIM, KV_HEADS
            q = torch.randn(1, HEADS, args.prefill, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, KV_HEADS, args.prefill, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
        config = dataclasses.replace(estimator_config(args.estimator), causal=args.causal)
        # As sparse_attention and bench_attention.py run it: the pooled estimator reads the pyramid's k8.
        k8 = psa.kv_pyramid(k, v)[8][0] if args.estimator == "pooled" else None
        for _ in range(2):
            psa.estimate_importance(q, k, config, k8=k8)
        torch.cuda.synchronize()
        print(f"profiled {f'prefill {args.prefill}' if args.prefill else args.shape}, estimator {args.estimator}")
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
