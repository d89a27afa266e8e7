"""Training through psa: the fidelity benchmark's video transformer fine-tuned with psa's sparse attention
and, from the same weights on the same clips and masks, with dense attention; their losses side by side.

Starts from the committed weights (`benchmarks/weights/fidelity_vit.safetensors`, trained with dense
attention on frames 0-199 of cockatoo.mp4) and fine-tunes every parameter for --steps steps of the
masked-patch objective on training clips, once per attention: dense SDPA, and `psa.sparse_attention` at
the default config (density ~0.15, raster order). Both runs draw their clips and masks from generators
with the same seed. Prints the training loss every --every steps, then each model's masked-patch MSE on
the held-out frames, evaluated with dense attention (the task, not the model's own attention) and with
the attention it was trained with, and the time per training step. On CUDA both attentions run in
bfloat16 (psa's CUDA kernels take 16-bit inputs); on the CPU in float32.

What it shows: gradients flow through psa (its loss falls) and psa-trained weights do about as well as
densely trained ones: the check of issue 16 that the loss tracks the dense run's.

Usage: python benchmarks/train_with_psa.py [--steps 60] [--every 10] [--clip-frames 4] [--device cuda|cpu]
Needs PyAV and the clip, as benchmarks/fidelity.py does.
"""

import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from fidelity_model import (HELD_OUT_FRAMES, TRAIN_FRAMES, fetch_clip, grid_of, load_frames,  # noqa: E402
                            load_model, patchify)


def attention_fn(kind: str, device: str, config: psa.PSAConfig):
    """q, k, v [B, H, L, D] -> [B, H, L, D]: dense SDPA or psa, in bfloat16 on CUDA."""
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def attend(q, k, v):
        q16, k16, v16 = (x.to(compute) for x in (q, k, v))
        if kind == "dense":
            out = F.scaled_dot_product_attention(q16, k16, v16)
        else:
            out = psa.sparse_attention(q16, k16, v16, config)
        return out.to(q.dtype)

    return attend


def set_attention(model, fn) -> None:
    for layer in model.layers:
        layer.attention = fn


def draw_batch(frames, clip_frames: int, generator: torch.Generator, device: str):
    """A training clip (random start, random horizontal flip) and its mask of hidden patches."""
    first = int(torch.randint(0, len(frames) - clip_frames + 1, (), generator=generator))
    clip = frames[first:first + clip_frames]
    if torch.rand((), generator=generator) < 0.5:
        clip = clip.flip(-1)
    patches = patchify(clip)[None]
    mask = torch.rand(patches.shape[:2], generator=generator) < 0.5
    return patches.to(device), mask.to(device)


@torch.no_grad()
def held_out_mse(model, frames, clip_frames: int, device: str, seed: int) -> float:
    """Masked-patch MSE over every non-overlapping held-out clip, with fixed masks."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(frames) - clip_frames + 1, clip_frames):
        patches = patchify(frames[first:first + clip_frames])[None]
        mask = torch.rand(patches.shape[:2], generator=generator) < 0.5
        patches, mask = patches.to(device), mask.to(device)
        prediction = model(patches, grid_of(clip_frames), mask)
        total += F.mse_loss(prediction[mask], patches[mask], reduction="sum").item()
        count += int(mask.sum()) * patches.shape[-1]
    model.train()
    return total / count


def fine_tune(kind: str, args, train_frames, config) -> tuple:
    """(model, per-step losses, ms per step) of one fine-tuning run."""
    model = load_model(args.device).train()
    set_attention(model, attention_fn(kind, args.device, config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    grid = grid_of(args.clip_frames)
    losses, elapsed = [], 0.0
    for _ in range(args.steps):
        patches, mask = draw_batch(train_frames, args.clip_frames, generator, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        prediction = model(patches, grid, mask)
        loss = F.mse_loss(prediction[mask], patches[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # synchronises, so the step's time is complete
        elapsed += time.perf_counter() - start
    return model, losses, 1e3 * elapsed / max(1, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--clip-frames", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    frames = load_frames(fetch_clip())
    train_frames, test_frames = frames[list(TRAIN_FRAMES)], frames[list(HELD_OUT_FRAMES)]
    config = psa.PSAConfig()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    tokens = args.clip_frames * grid_of(1)[1] * grid_of(1)[2]
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today().isoformat()}: fine-tuning the fidelity "
          f"model, {args.steps} steps, clips of {args.clip_frames} frames ({tokens} tokens), lr {args.lr}")

    runs = {kind: fine_tune(kind, args, train_frames, config) for kind in ("dense", "psa")}
    print("|steps|dense loss|psa loss|psa / dense|")
    print("|---|---|---|---|")
    for end in range(args.every, args.steps + 1, args.every):
        dense = sum(runs["dense"][1][end - args.every:end]) / args.every
        sparse = sum(runs["psa"][1][end - args.every:end]) / args.every
        print(f"|{end - args.every + 1}-{end}|{dense:.4f}|{sparse:.4f}|{sparse / dense:.3f}|")

    dense_attention = attention_fn("dense", args.device, config)
    print()
    print("|trained with|held-out MSE, dense attention|held-out MSE, its own attention|ms per step|")
    print("|---|---|---|---|")
    start = load_model(args.device)
    set_attention(start, dense_attention)
    start_dense = held_out_mse(start, test_frames, args.clip_frames, args.device, args.seed)
    set_attention(start, attention_fn("psa", args.device, config))
    start_psa = held_out_mse(start, test_frames, args.clip_frames, args.device, args.seed)
    print(f"|(start: the committed weights)|{start_dense:.4f}|{start_psa:.4f} (psa)|-|")
    for kind, (model, _, step_ms) in runs.items():
        set_attention(model, dense_attention)
        dense_eval = held_out_mse(model, test_frames, args.clip_frames, args.device, args.seed)
        set_attention(model, attention_fn(kind, args.device, config))
        own_eval = held_out_mse(model, test_frames, args.clip_frames, args.device, args.seed)
        print(f"|{kind}|{dense_eval:.4f}|{own_eval:.4f}|{step_ms:.0f}|")


if __name__ == "__main__":
    main()
