"""CUDA kv_pyramid bandwidth on the model shapes: bytes moved (K and V read once, every level written)
over the median time, beside a plain device-to-device copy of K and V as the ceiling."""

import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from shapes import SHAPES  # noqa: E402


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'shape':<16}{'pyramid ms':>11}{'TB/s':>7}{'copy TB/s':>10}")
    for name in ("wan1.3b_480p", "cogvideox5b", "wan14b_720p"):
        shape = SHAPES[name]
        k = torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms = triton.testing.do_bench(lambda: psa.kv_pyramid(k, v), return_mode="median")
        moved = 2 * k.numel() * k.element_size() * (1 + 1 / 2 + 1 / 4 + 1 / 8)
        dst_k, dst_v = torch.empty_like(k), torch.empty_like(v)
        copy_ms = triton.testing.do_bench(lambda: (dst_k.copy_(k), dst_v.copy_(v)), return_mode="median")
        copied = 4 * k.numel() * k.element_size()
        print(f"{name:<16}{ms:>11.3f}{moved / ms / 1e9:>7.2f}{copied / copy_ms / 1e9:>10.2f}")


if __name__ == "__main__":
    main()
