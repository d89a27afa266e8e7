"""The small video transformer of the fidelity benchmark, its data and its training.

Model: frames cut into 8x8 RGB patches, a linear patch embedding, 4 pre-norm transformer layers
(width 192, 3 heads of 64, MLP 4x) with 3-D rotary position embedding over (frame, row, column),
and a linear head back to patch pixels. Objective: masked-patch prediction (half of the tokens replaced
by a learned mask token; MSE on the pixels of the masked ones), which makes attention gather from
space-time neighbours, as in video diffusion transformers.

Data: `cockatoo.mp4` (1280x720, 280 frames, BSD-2) from Debian's python3-imageio package, fetched at
set-up and not committed. Frames 0-199 train, frames 200-279 are held out for the benchmark.

Train (writes benchmarks/weights/fidelity_vit.safetensors, ~7 MB in bfloat16):
    python benchmarks/fidelity_model.py --minutes 4
"""

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "fidelity_vit.safetensors")
CLIP_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "psa", "cockatoo.mp4")
PATCH = 8
FRAME_SIZE = (144, 256)          # frames are resized to this (H, W): 18 x 32 patches
TRAIN_FRAMES = range(0, 200)
HELD_OUT_FRAMES = range(200, 280)


def fetch_clip(path: str = CLIP_CACHE) -> str:
    """cockatoo.mp4 from Debian's python3-imageio package (downloaded with apt-get, then cached). On a
    machine whose package lists were never fetched, runs `apt-get update` once and tries again."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        download = ["apt-get", "download", "python3-imageio"]
        if subprocess.run(download, cwd=work, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            result = subprocess.run(download, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"apt-get download python3-imageio failed: {result.stderr.strip()}")
        package = glob.glob(os.path.join(work, "python3-imageio_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", package, os.path.join(work, "x")], check=True)
        found = glob.glob(os.path.join(work, "x", "**", "cockatoo.mp4"), recursive=True)
        if not found:
            raise RuntimeError("python3-imageio no longer ships imageio/resources/images/cockatoo.mp4")
        shutil.copy(found[0], path)
    return path


def load_frames(path: str) -> torch.Tensor:
    """float32 [N, 3, H, W] in [-1, 1], resized to FRAME_SIZE."""
    import av  # PyAV decodes the mp4
    with av.open(path) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    video = torch.stack(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.interpolate(video, size=FRAME_SIZE, mode="area")


def patchify(frames: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] -> [T * H/8 * W/8, 192] tokens in raster order (column fastest)."""
    t, c, h, w = frames.shape
    x = frames.view(t, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def grid_of(frames: int):
    return (frames, FRAME_SIZE[0] // PATCH, FRAME_SIZE[1] // PATCH)


def rotary_tables(grid, head_dim: int = 64, axes=(16, 24, 24), base: float = 100.0):
    """cos, sin [L, head_dim/2] of 3-D RoPE: the frequency pairs split over (frame, row, column)."""
    positions = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).view(-1, 3)
    angles = []
    for axis, dims in enumerate(axes):
        frequencies = base ** (-torch.arange(0, dims, 2).float() / dims)
        angles.append(positions[:, axis:axis + 1].float() * frequencies)
    angles = torch.cat(angles, dim=-1)
    assert angles.shape[-1] * 2 == head_dim
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        # q, k, v [B, H, L, D] -> [B, H, L, D]; train_with_psa.py swaps in psa's attention.
        self.attention = F.scaled_dot_product_attention
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attended = self.attention(q, k, v)                           # [B, H, L, D]
        x = x + self.out(attended.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class VideoTransformer(nn.Module):
    def __init__(self, width: int = 192, heads: int = 3, layers: int = 4):
        super().__init__()
        self.embed = nn.Linear(3 * PATCH * PATCH, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 3 * PATCH * PATCH)

    def forward(self, patches, grid, mask=None):
        """patches [B, L, 192] in raster order of `grid`; mask [B, L] bool (True = hidden)."""
        x = self.embed(patches)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        cos, sin = (t.to(x.device, x.dtype) for t in rotary_tables(grid))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


def load_model(device="cpu", dtype=torch.float32) -> VideoTransformer:
    from safetensors.torch import load_file
    model = VideoTransformer()
    model.load_state_dict({k: v.float() for k, v in load_file(WEIGHTS).items()})
    return model.to(device=device, dtype=dtype).eval()


def train(minutes: float, clip_frames: int, seed: int, device: str) -> None:
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    frames = load_frames(fetch_clip())[list(TRAIN_FRAMES)].to(device)
    model = VideoTransformer().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    grid = grid_of(clip_frames)
    start, step, losses = time.time(), 0, []
    while time.time() - start < minutes * 60:
        first = torch.randint(0, len(frames) - clip_frames + 1, ()).item()
        clip = frames[first:first + clip_frames]
        if torch.rand(()) < 0.5:
            clip = clip.flip(-1)                                    # horizontal flip
        patches = patchify(clip)[None]
        mask = torch.rand(patches.shape[:2], device=device) < 0.5
        prediction = model(patches, grid, mask)
        loss = F.mse_loss(prediction[mask], patches[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:                        # cosine decay over the time budget
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - start) / (minutes * 60))))
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            print(f"step {step}: masked-patch MSE {sum(losses[-20:]) / 20:.4f}", flush=True)
    os.makedirs(os.path.dirname(WEIGHTS), exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    meta = dict(steps=step, minutes=minutes, clip_frames=clip_frames, seed=seed, device=str(device),
                final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), torch=torch.__version__)
    save_file(state, WEIGHTS, metadata={"training": json.dumps(meta)})
    print(f"wrote {WEIGHTS}: {meta}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train the fidelity benchmark's video transformer.")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--clip-frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    train(args.minutes, args.clip_frames, args.seed, args.device)
