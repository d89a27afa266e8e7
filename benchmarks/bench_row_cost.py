"""What one level-map row costs the CUDA attention kernel: a fixed part and a part per key tile.

A sparse row has few tiles, so a fixed cost per row (per query block: loading Q, building the row's
schedule, the epilogue, the pipeline filling and draining) weighs on sparse attention and hardly on
dense attention. This times the kernel alone (`attention_over_pyramid`, the pyramid built beforehand)
on level maps with exactly m level-1 key blocks per row (random blocks, the sequence's partial last block
left out), m = 0 .. 128, and prints per m the time
of one "round" (the kernel's time divided by the query blocks each SM handles in turn) and a
least-squares fit: round time = fixed + m * per_tile. m = 0 is a row with nothing to attend to.

Then the cost of a tile by level: maps with every key block at one level L (1, 2, 4, 8), so every row
has ceil(n_k / L) tiles of that level; a pooled tile is kTileN / (block_n / L) pieces, each its own
copy, so a tile of level 8 moves the bytes of a level-1 tile in 8 times as many pieces.

One run, one GPU, bf16, B=1, random inputs, `triton.testing.do_bench` medians.

Usage: python benchmarks/bench_row_cost.py [--shapes wan1.3b_480p,cogvideox5b] [--tiles 0,4,8,16,32,64,128]
"""

import argparse
import datetime
import math
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from shapes import SHAPES  # noqa: E402

BLOCK = 128


def random_level_one_map(heads: int, n_blocks: int, per_row: int) -> torch.Tensor:
    """[1, H, n, n] int8: `per_row` distinct random key blocks at level 1 in every row, never the last
    (partial) one, the rest skipped."""
    full_blocks = n_blocks - 1
    rank = torch.rand(1, heads, n_blocks, full_blocks, device="cuda").argsort(-1).argsort(-1)
    levels = torch.zeros(1, heads, n_blocks, n_blocks, dtype=torch.int8, device="cuda")
    levels[..., :full_blocks] = (rank < per_row).to(torch.int8)
    return levels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="wan1.3b_480p,cogvideox5b")
    parser.add_argument("--tiles", default="0,4,8,16,32,64,128")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B=1, {datetime.date.today().isoformat()}")
    print("|shape|tiles per row|ms|us per round|")
    print("|---|---|---|---|")
    fits, per_level = [], []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        pyramid = psa.kv_pyramid(k, v)
        n_blocks = math.ceil(shape.tokens / BLOCK)
        rounds = math.ceil(shape.heads * n_blocks / sms)
        points = []
        for per_row in (int(m) for m in args.tiles.split(",")):
            levels = random_level_one_map(shape.heads, n_blocks, min(per_row, n_blocks - 1))
            ms = triton.testing.do_bench(
                lambda: psa.attention_over_pyramid(q, pyramid, levels, block_m=BLOCK, block_n=BLOCK), warmup=30,
                rep=200)
            round_us = ms * 1e3 / rounds
            points.append((per_row, round_us))
            print(f"|{name}|{per_row}|{ms:.3f}|{round_us:.2f}|")
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
        slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        fits.append((name, (ys.mean() - slope * xs.mean()).item(), slope.item()))
        for level in (1, 2, 4, 8):
            levels = torch.full((1, shape.heads, n_blocks, n_blocks), level, dtype=torch.int8, device="cuda")
            ms = triton.testing.do_bench(
                lambda: psa.attention_over_pyramid(q, pyramid, levels, block_m=BLOCK, block_n=BLOCK), warmup=30,
                rep=200)
            tiles = math.ceil(n_blocks / level)
            per_level.append((name, level, tiles, ms, ms * 1e3 / rounds / tiles))
    print()
    print("|shape|fixed us per row|us per tile|")
    print("|---|---|---|")
    for name, fixed, per_tile in fits:
        print(f"|{name}|{fixed:.2f}|{per_tile:.3f}|")
    print()
    print("|shape|every block at level|tiles per row|ms|us per tile (round time / tiles)|")
    print("|---|---|---|---|---|")
    for name, level, tiles, ms, per_tile in per_level:
        print(f"|{name}|{level}|{tiles}|{ms:.3f}|{per_tile:.3f}|")


if __name__ == "__main__":
    main()
