"""Causal prefill attention of a video-understanding model: psa against causal dense SDPA and FlexAttention.

Qwen2.5-VL-7B's language-model attention shape (28 query heads, 4 key/value heads, head_dim 128), bf16,
B=1, random inputs, at 32k and 64k tokens. For psa with the antidiagonal and the sampled estimator
(causal default config) it prints the whole op (`sparse_attention`), its estimate's and estimate +
assign's share, and
the measured density over the causal candidate pairs; beside it causal SDPA with the cuDNN and the
flash backends, and FlexAttention with a causal block mask keeping the same fraction of candidate key
blocks per query block (psa's top-ranked ones; diagonal blocks masked by `mask_mod`). `triton.testing.
do_bench` medians; speedups over causal cuDNN.

Then the level statistics per decoder layer of a real prefill: a small random-weight Qwen2.5-VL (4
layers of 8 query / 2 key-value heads of 64; transformers' model code, no download) reads a video of
cockatoo.mp4 frames (random frames when PyAV or the clip is missing) between two text spans, through
`psa.integrations.transformers` with its defaults (antidiagonal, causal, text forced, sink kept). The
weights are random, so the numbers describe the mechanics (the mrope positions, forced text, the sink,
the estimator on vision-tower features), not a trained model's attention.

Usage: python benchmarks/bench_prefill.py [--lengths 32768,65536] [--estimators antidiagonal,sampled]
                                          [--frames 128] [--skip-model]
       python benchmarks/bench_prefill.py --tiny   # small shapes on the CPU: checks the script only
Estimators are named as in bench_attention.py: antidiagonal-fp8 is the antidiagonal estimator with FP8
scoring (estimate_precision="fp8").
"""

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from bench_attention import estimator_config  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
# Token ids of the small model's vocabulary: text below 290, then the vision placeholders.
VIDEO_TOKEN, VISION_START, VISION_END = 301, 302, 303
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2


def timer(device):
    if device.type == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")

    def cpu(fn):
        fn()
        begin = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - begin)
    return cpu


def flex_causal_block_mask(scores, density, length, block):
    """Causal BlockMask keeping, per query block, the round(density * candidates) best-scoring candidate
    key blocks (the diagonal always); the diagonal block is partial (causal mask_mod), the rest full."""
    from torch.nn.attention.flex_attention import BlockMask

    n_q, n_k = scores.shape[-2:]
    rows = torch.arange(n_q, device=scores.device)[:, None]
    cols = torch.arange(n_k, device=scores.device)[None, :]
    candidates = cols <= rows
    ranked = torch.where(candidates, scores, -1.0)
    ranked = torch.where(cols == rows, 2.0, ranked)   # keep the diagonal
    keep = (density * candidates.sum(-1)).round().clamp(min=1).to(torch.int32).expand(scores.shape[:-1])
    order = torch.argsort(ranked, dim=-1, descending=True).to(torch.int32)
    position = torch.arange(n_k, device=scores.device)
    kept = position < keep[..., None]
    diagonal = order == rows.to(torch.int32)
    full = kept & ~diagonal
    # Indices of the full (off-diagonal kept) blocks first, then the rest; the diagonal as the partial block.
    full_order = torch.argsort((~full).to(torch.int8), dim=-1, stable=True)
    full_indices = torch.gather(order, -1, full_order).contiguous()
    full_counts = full.sum(-1).to(torch.int32)
    partial_indices = rows[:, 0].to(torch.int32).expand(scores.shape[:-1]).unsqueeze(-1)
    partial_indices = torch.cat([partial_indices, full_indices[..., :-1]], dim=-1).contiguous()
    partial_counts = torch.ones_like(full_counts)

    def causal(b, h, q, k):
        return q >= k

    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=block,
                                    mask_mod=causal, seq_lengths=(length, length))


def small_qwen(device, dtype):
    """A random-weight Qwen2.5-VL: a one-block vision tower and 4 decoder layers (8 query / 2 kv heads of 64)."""
    import transformers
    torch.manual_seed(0)
    text = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=32768, bos_token_id=None,
                eos_token_id=None,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=512, patch_size=PATCH,
                  temporal_patch_size=TEMPORAL_PATCH, spatial_merge_size=MERGE, window_size=112,
                  fullatt_block_indexes=[0])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None, eos_token_id=None,
                                           pad_token_id=None, image_token_id=300, video_token_id=VIDEO_TOKEN,
                                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    config._attn_implementation = "sdpa"
    return transformers.Qwen2_5_VLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def video_frames(count, size):
    """[count, 3, H, W] in [-1, 1]: cockatoo.mp4's first frames, or random ones (and why) without it."""
    try:
        from fidelity_model import CLIP_CACHE, fetch_clip, load_frames
        frames = load_frames(fetch_clip(CLIP_CACHE))[:count]
        return F.interpolate(frames, size=size, mode="area"), "cockatoo.mp4"
    except Exception as error:  # PyAV or the clip unavailable: the statistics still run
        return torch.rand(count, 3, *size) * 2 - 1, f"random frames ({type(error).__name__}: {error})"


def video_patches(frames):
    """Qwen2-VL's video input: pixel rows [t * h * w, 3 * 2 * 14 * 14] ordered so that each 2 x 2 merge
    group is contiguous, and the grid (t, h, w) in patches."""
    t, h, w = frames.shape[0] // TEMPORAL_PATCH, frames.shape[2] // PATCH, frames.shape[3] // PATCH
    x = frames.reshape(t, TEMPORAL_PATCH, 3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/2, w/2, 2, 2 | channel, time, row, column
    return x.reshape(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH), torch.tensor([[t, h, w]])


def model_level_stats(device, dtype, frame_count, size):
    import psa.integrations.transformers as psa_transformers
    model = small_qwen(device, dtype)
    frames, source = video_frames(frame_count, size)
    pixels, grid = video_patches(frames)
    video_tokens = int(grid.prod()) // (MERGE * MERGE)
    generator = torch.Generator().manual_seed(0)
    before, after = (torch.randint(0, 290, (n,), generator=generator) for n in (96, 64))
    ids = torch.cat([before, torch.tensor([VISION_START]), torch.full((video_tokens,), VIDEO_TOKEN),
                     torch.tensor([VISION_END]), after]).unsqueeze(0)
    psa_transformers.apply(model, min_tokens=256)
    with torch.no_grad():
        model(input_ids=ids.to(device), pixel_values_videos=pixels.to(device, dtype), video_grid_thw=grid.to(device))
    print(f"\n# level statistics per decoder layer: random-weight Qwen2.5-VL (4 layers, 8 / 2 heads of 64), "
          f"{source}, {frame_count} frames at {size[0]}x{size[1]} -> {video_tokens} video tokens, "
          f"{ids.shape[1]} tokens in all; default config (antidiagonal, causal)")
    print("|layer|density|coverage|level 1|level 2|level 4|level 8|skipped|")
    print("|---|---|---|---|---|---|---|---|")
    for row in psa_transformers.stats(model):
        histogram = row["histogram"]
        print(f"|{row['layer']}|{row['density']:.3f}|{row['coverage']:.3f}|" +
              "|".join(f"{histogram[level]:.3f}" for level in (1, 2, 4, 8, 0)) + "|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--estimators", default="antidiagonal,sampled")
    parser.add_argument("--frames", type=int, default=128, help="video frames of the model statistics")
    parser.add_argument("--skip-model", action="store_true", help="without the per-layer model statistics")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (checks the script only)")
    args = parser.parse_args()
    if args.tiny:
        device, dtype, lengths, heads = torch.device("cpu"), torch.float32, [1024], (4, 2, 64)
    else:
        device, dtype, heads = torch.device("cuda"), torch.bfloat16, (HEADS, KV_HEADS, HEAD_DIM)
        lengths = [int(x) for x in args.lengths.split(",")]
    bench = timer(device)
    q_heads, kv_heads, dim = heads
    label = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {label}, torch {torch.__version__}, {dtype}, {datetime.date.today().isoformat()}, "
          f"{q_heads} query / {kv_heads} kv heads, head_dim {dim}, causal")
    header = ["tokens", "estimator", "density", "psa ms", "est ms", "est+asg ms", "cudnn ms", "flash ms", "flex ms",
              "psa x cudnn", "flex x cudnn", "est % cudnn", "est+asg % cudnn"]
    print("|" + "|".join(header) + "|")
    print("|" + "|".join("---" for _ in header) + "|")
    flex = None
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    for length in lengths:
        q = torch.randn(1, q_heads, length, dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype) for _ in range(2))

        def dense(backend=None):
            if device.type != "cuda":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend
            cudnn_ms = bench(lambda: dense(SDPBackend.CUDNN_ATTENTION))
            flash_ms = bench(lambda: dense(SDPBackend.FLASH_ATTENTION))
        else:
            cudnn_ms = flash_ms = bench(dense)
        for estimator in args.estimators.split(","):
            config = dataclasses.replace(estimator_config(estimator), causal=True)
            scores = psa.estimate_importance(q, k, config)
            levels = psa.assign_levels(scores, config, k=k, q_len=length)
            density = psa.level_stats(levels, causal=True, q_len=length, k_len=length, block_m=config.block_m,
                                      block_n=config.block_n)["density"]
            psa_ms = bench(lambda: psa.sparse_attention(q, k, v, config))
            estimate_only_ms = bench(lambda: psa.estimate_importance(q, k, config))
            estimate_ms = bench(lambda: psa.assign_levels(psa.estimate_importance(q, k, config), config, k=k,
                                                          q_len=length))
            flex_ms = None
            if flex is not None:
                mask = flex_causal_block_mask(scores, density, length, config.block_n)
                flex_ms = bench(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True))
            print("|" + "|".join([
                str(length), estimator, f"{density:.3f}", f"{psa_ms:.2f}", f"{estimate_only_ms:.2f}",
                f"{estimate_ms:.2f}", f"{cudnn_ms:.2f}", f"{flash_ms:.2f}", "-" if flex_ms is None else f"{flex_ms:.2f}",
                f"{cudnn_ms / psa_ms:.2f}", "-" if flex_ms is None else f"{cudnn_ms / flex_ms:.2f}",
                f"{100 * estimate_only_ms / cudnn_ms:.2f}", f"{100 * estimate_ms / cudnn_ms:.1f}"]) + "|",
                flush=True)
        q = k = v = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_model:
        frame_count, size = (16, (112, 224)) if args.tiny else (args.frames, (168, 308))
        model_level_stats(device, dtype, frame_count, size)


if __name__ == "__main__":
    main()
