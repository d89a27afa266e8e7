"""Wan2.1 / Wan2.2 text-to-video with psa beside dense attention, on weights you have locally.

    python examples/wan_t2v.py --model-path /models/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing"

Runs the same generation twice (dense, then psa with dense warm-up steps), prints seconds per
denoising step for both, psa's mean density per step, and writes `dense.mp4` and `psa.mp4`.
Needs a CUDA GPU with psa's CUDA backend, a diffusers-format Wan checkpoint (the `-Diffusers`
repositories; nothing is downloaded) and `pip install -r examples/requirements.txt` (the text
encoder's transformers and the mp4 writer).
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKLWan, WanPipeline
from diffusers.utils import export_to_video

import psa
import psa.integrations.diffusers as psa_diffusers
from psa.tools.calibrate import configs_from_json


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="local diffusers-format Wan checkpoint")
    parser.add_argument("--prompt", default="A cat walks on the grass, realistic style.")
    parser.add_argument("--negative-prompt", default="blurry, low quality, distorted")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--warmup-steps", type=int, default=12, help="dense denoising steps before psa")
    parser.add_argument("--config", default=None,
                        help="path of a JSON file: one PSAConfig (PSAConfig.to_json) or a per-layer mapping "
                             "(psa.tools.calibrate.configs_to_json); default: psa.PSAConfig()")
    parser.add_argument("--order", default="gilbert", choices=["gilbert", "tiled", "raster"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def generate(pipe, args):
    """Frames and the wall time of every denoising step (CFG's two passes included)."""
    step_times, last = [], [0.0]

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        torch.cuda.synchronize()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return callback_kwargs

    torch.cuda.synchronize()
    last[0] = time.perf_counter()
    frames = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator("cuda").manual_seed(args.seed), callback_on_step_end=on_step_end).frames[0]
    return frames, step_times


def main():
    args = parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        raise SystemExit(f"--warmup-steps must lie in [0, --steps), got {args.warmup_steps}")
    if not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU")
    vae = AutoencoderKLWan.from_pretrained(args.model_path, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model_path, vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    transformers = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]

    dense_frames, dense_times = generate(pipe, args)
    export_to_video(dense_frames, "dense.mp4", fps=16)

    config = psa.PSAConfig()
    if args.config:
        with open(args.config) as f:
            text = f.read()
        fields = json.loads(text)
        # A per-layer mapping's keys are block indices; a single config's are PSAConfig field names.
        config = configs_from_json(text) if all(key.isdigit() for key in fields) else psa.PSAConfig.from_json(text)
    for i, transformer in enumerate(transformers):   # Wan2.2 A14B: both experts, counting the pipeline's steps
        psa_diffusers.apply(transformer, config, warmup_steps=args.warmup_steps, order=args.order,
                            share_steps_with=transformers[0] if i else None)
    psa_frames, psa_times = generate(pipe, args)
    export_to_video(psa_frames, "psa.mp4", fps=16)

    sparse = slice(args.warmup_steps, None)
    dense_step, psa_step = statistics.median(dense_times[sparse]), statistics.median(psa_times[sparse])
    print(f"{torch.cuda.get_device_name()}: {args.frames} frames at {args.width}x{args.height}, {args.steps} steps")
    print(f"seconds per step after warm-up: dense {dense_step:.3f}, psa {psa_step:.3f} ({dense_step / psa_step:.2f}x)")
    print(f"whole generation: dense {sum(dense_times):.1f} s, psa {sum(psa_times):.1f} s")
    rows = psa_diffusers.stats(transformers[0])
    for step in sorted({row["step"] for row in rows}):
        densities = [row["density"] for row in rows if row["step"] == step]
        print(f"step {step}: mean density {statistics.mean(densities):.3f} over {len(densities)} layers")


if __name__ == "__main__":
    main()
