"""CPU reference backend speed: the whole op and each stage beside dense SDPA, one process, one machine.

The reference backend is for correctness and CPU-only users, not speed; this keeps it usable:
`sparse_attention` at B=1, H=2, L=4096, D=64 must stay under 2 s on a 2-core machine.
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

import psa
from psa import PSAConfig


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim) for _ in range(3))
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; B=1 H={args.heads} L={args.length} D={args.head_dim} float32")
    dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
    print(f"{'estimator':<14}{'estimate ms':>12}{'assign ms':>11}{'attend ms':>11}{'total ms':>10}"
          f"{'SDPA ms':>9}{'total/SDPA':>11}")
    for estimator in ("sampled", "antidiagonal", "pooled"):
        config = PSAConfig(estimator=estimator)
        scores = psa.estimate_importance(q, k, config)
        levels = psa.assign_levels(scores, config, k=k)
        estimate = median_ms(lambda: psa.estimate_importance(q, k, config), args.repeats)
        assign = median_ms(lambda: psa.assign_levels(scores, config, k=k), args.repeats)
        attend = median_ms(lambda: psa.attention_with_levels(q, k, v, levels, block_m=128, block_n=128),
                           args.repeats)
        total = median_ms(lambda: psa.sparse_attention(q, k, v, config), args.repeats)
        print(f"{estimator:<14}{estimate:>12.2f}{assign:>11.2f}{attend:>11.2f}{total:>10.2f}{dense:>9.2f}"
              f"{total / dense:>11.2f}")


if __name__ == "__main__":
    main()
