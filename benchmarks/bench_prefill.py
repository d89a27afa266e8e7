"""Causal prefill attention of a video-understanding model: psa against causal dense SDPA and FlexAttention.

Qwen2.5-VL-7B's language-model attention shape (28 query heads, 4 key/value heads, head_dim 128), bf16,
B=1, random inputs, at 32k and 64k tokens. For psa with the antidiagonal and the sampled estimator
(causal default config) it prints the whole op (`sparse_attention`), its estimate + assign share, and
the measured density over the causal candidate pairs; beside it causal SDPA with the cuDNN and the
flash backends, and FlexAttention with a causal block mask keeping the same fraction of candidate key
blocks per query block (psa's top-ranked ones; diagonal blocks masked by `mask_mod`). `triton.testing.
do_bench` medians; speedups over causal cuDNN.

Usage: python benchmarks/bench_prefill.py [--lengths 32768,65536] [--estimators antidiagonal,sampled]
       python benchmarks/bench_prefill.py --tiny   # small shapes on the CPU: checks the script only
"""

import argparse
import datetime
import time

import torch
import torch.nn.functional as F

import psa

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--estimators", default="antidiagonal,sampled")
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
    header = ["tokens", "estimator", "density", "psa ms", "est+asg ms", "cudnn ms", "flash ms", "flex ms",
              "psa x cudnn", "flex x cudnn", "est+asg % cudnn"]
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
            config = psa.PSAConfig(causal=True, estimator=estimator)
            scores = psa.estimate_importance(q, k, config)
            levels = psa.assign_levels(scores, config, k=k, q_len=length)
            density = psa.level_stats(levels, causal=True, q_len=length, k_len=length, block_m=config.block_m,
                                      block_n=config.block_n)["density"]
            psa_ms = bench(lambda: psa.sparse_attention(q, k, v, config))
            estimate_ms = bench(lambda: psa.assign_levels(psa.estimate_importance(q, k, config), config, k=k,
                                                          q_len=length))
            flex_ms = None
            if flex is not None:
                mask = flex_causal_block_mask(scores, density, length, config.block_n)
                flex_ms = bench(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True))
            print("|" + "|".join([
                str(length), estimator, f"{density:.3f}", f"{psa_ms:.2f}", f"{estimate_ms:.2f}", f"{cudnn_ms:.2f}",
                f"{flash_ms:.2f}", "-" if flex_ms is None else f"{flex_ms:.2f}", f"{cudnn_ms / psa_ms:.2f}",
                "-" if flex_ms is None else f"{cudnn_ms / flex_ms:.2f}", f"{100 * estimate_ms / cudnn_ms:.1f}"]) + "|",
                flush=True)
        q = k = v = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
