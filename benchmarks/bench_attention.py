"""psa on the GPU against dense SDPA (cuDNN, flash) and FlexAttention block-sparse at the same density.

One run, one GPU, bf16, B=1, random inputs, `triton.testing.do_bench` medians. For every model shape and
density 0.15 / 0.30 / 1.0 (all level 1) it prints:
  - psa total (`sparse_attention`) and its stages: pyramid (`kv_pyramid`), estimate, assign, attend
    (`attention_with_levels`: pyramid + kernel) and the kernel alone (`attention_over_pyramid` over a
    pyramid built beforehand), and the kernel again with the portable sm80 kernel forced
    (`PSA_CUDA_KERNEL=sm80`);
  - dense SDPA with the cuDNN and the flash backend;
  - FlexAttention with a block mask that keeps, per query block, the `round(density * n_k)` key blocks
    psa's estimator ranks highest (binary block-sparse at equal compute);
  - where FlashAttention-4 (`flash-attn-4`) imports: FA4 dense, and FA4 block-sparse with the same
    blocks as FlexAttention (its output checked against Flex's), and psa's kernel time over FA4's (FA4,
    like Flex, is given its block lists precomputed; psa's kernel its pyramid);
  - effective TFLOP/s = 4 * B * H * Lq * Lk * D * density / time (density measured from the level map;
    dense and flex at their own density) and speedups over cuDNN.

Before that, per shape, the cost of each stage at the default config as a share of dense cuDNN:
pyramid, estimate with each estimator (sampled, pooled, antidiagonal; antidiagonal-fp8 with FP8 scoring on
request), assign, the attention kernel.
The pooled estimate is timed as sparse_attention runs it: reading the pyramid's k8, not k.

Usage: python benchmarks/bench_attention.py [--shapes wan1.3b_480p,...] [--densities 0.15,0.3,1.0]
           [--estimators sampled,pooled,antidiagonal[,antidiagonal-fp8]] [--no-stages] [--no-densities] [--kernels] [--site DIR]
           [--backward] [--gemm-floor] [--pooled-floor]

--site adds a site directory before looking for FA4 (benchmarks/fa4_wheels.sh installs it into one on a
machine without a registry).

--kernels also lists the device time of every kernel each stage launches (torch.profiler), to see
where a stage's time goes (with --backward, of one psa forward + backward too).

--gemm-floor adds, per shape, cuBLAS's time for the antidiagonal estimator's GEMM alone (anti-rows
[H, L/S, S*D] by anti-columns, S = 8): bf16 `torch.bmm`, and FP8 e4m3 `torch._scaled_mm` over the heads
stacked (the same FLOPs), each writing its bf16 output, beside cuDNN dense. The fused estimate is this GEMM
plus an epilogue (and FP8's quantization), so these bound it from below unless it outruns cuBLAS.

--pooled-floor adds, per shape, the pooled estimate beside the reads it cannot avoid, under the same
do_bench L2 flush: its CUDA-graph replay (no host path), torch's `q.sum()` and block sums of q (q is ~90%
of what it reads), and its kernels' device times after a flush.

--backward adds forward + backward times at the default config (density ~0.15): psa (`sparse_attention`,
gradients through attention_over_pyramid and the pyramid) against cuDNN's dense forward + backward and
FlexAttention's block-sparse forward + backward at psa's measured density (its top blocks per row).
"""

import argparse
import datetime
import functools
import os
import site
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
from shapes import SHAPES  # noqa: E402

GPU_SHAPES = ("wan1.3b_480p", "cogvideox5b", "wan14b_720p")


def config_for(density: float) -> psa.PSAConfig:
    """Top-k configs whose nominal density is `density`: the default mix of levels (0.15) scaled up,
    and all blocks at level 1 for 1.0."""
    if density >= 1.0:
        return psa.PSAConfig(bounds=(1.0, 1.0, 1.0, 1.0))
    base = psa.PSAConfig()
    factor = density / base.nominal_density
    return psa.PSAConfig(bounds=tuple(min(1.0, b * factor) for b in base.bounds))


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def top_blocks(scores: torch.Tensor, density: float):
    """The `round(density * n_k)` highest-scoring key blocks of every query block: (keep, kv_indices),
    indices of the kept blocks first (ascending), then the rest."""
    n_k = scores.shape[-1]
    keep = max(1, min(n_k, round(density * n_k)))
    order = torch.argsort(scores, dim=-1, descending=True).to(torch.int32)
    indices = torch.sort(order[..., :keep], dim=-1).values
    return keep, torch.cat([indices, order[..., keep:]], dim=-1).contiguous()


def flex_block_mask(scores: torch.Tensor, density: float, length: int, block: int) -> BlockMask:
    """Binary block mask keeping the top round(density * n_k) key blocks of every query block."""
    keep, kv_indices = top_blocks(scores, density)
    counts = torch.full(scores.shape[:-1], keep, dtype=torch.int32, device=scores.device)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), kv_indices, counts, kv_indices,
                                    BLOCK_SIZE=block, seq_lengths=(length, length))


class FlashAttention4:
    """FA4 (CuTe DSL) dense and block-sparse forward on [B, H, L, D] inputs, if it imports."""

    def __init__(self):
        try:
            from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
            from flash_attn.cute.interface import flash_attn_func
        except Exception as error:  # not installed, or a DSL that does not match this CUDA
            self.available, self.reason = False, f"{type(error).__name__}: {error}"
            return
        self.available, self.reason = True, ""
        self._attention, self._sparse_tensors = flash_attn_func, BlockSparseTensorsTorch

    @staticmethod
    def layout(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).contiguous()  # FA4 takes [B, L, H, D]

    def dense(self, q, k, v):
        return self._attention(q, k, v)[0]

    def block_sparse_tensors(self, scores: torch.Tensor, density: float, block: int):
        """The blocks flex_block_mask keeps, all as FA4 "full" blocks (no partial masking)."""
        keep, kv_indices = top_blocks(scores, density)
        counts = torch.full(scores.shape[:-1], keep, dtype=torch.int32, device=scores.device)
        return self._sparse_tensors(mask_block_cnt=torch.zeros_like(counts), mask_block_idx=torch.zeros_like(kv_indices),
                                    full_block_cnt=counts, full_block_idx=kv_indices, block_size=(block, block))

    def block_sparse(self, q, k, v, tensors):
        return self._attention(q, k, v, block_sparse_tensors=tensors)[0]


def peer_time(label, fn, expected=None):
    """Median ms of an optional peer, or None (with the reason printed) if it fails; its output is
    checked against `expected` (same layout) when given."""
    try:
        if expected is not None:
            error = (fn().float() - expected.float()).abs().max().item()
            if error > 2e-2:
                print(f"# {label}: output differs from the reference by {error:.3g}; not timed")
                return None
        return bench(fn)
    except Exception as error:  # a peer's unsupported shape must not end the run
        print(f"# {label}: {type(error).__name__}: {str(error)[:200]}")
        return None


def cell(value, fmt):
    return "-" if value is None else fmt(value)


def print_row(cells):
    print("|" + "|".join(cells) + "|", flush=True)


def print_kernel_times(label, fn, repeats=20):
    """Average device time per call of each kernel `fn` launches."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in sorted(events, key=lambda e: -e.device_time_total):
        print(f"  {label}: {e.device_time_total / repeats / 1000:.4f} ms  x{e.count // repeats}  {e.key[:90]}")
    # The stage's GPU time without its host path: what it adds to the whole op, where the next stage's
    # launches queue behind it (the stage table's times are do_bench's, one call at a time).
    total = sum(e.device_time_total for e in events) / repeats / 1000
    print(f"  {label}: {total:.4f} ms  device time per call, all kernels")


def estimator_config(name: str) -> psa.PSAConfig:
    """`sampled`, `pooled`, `antidiagonal`, or `antidiagonal-fp8` (FP8 scoring, estimate_precision="fp8")."""
    estimator, _, precision = name.partition("-")
    return psa.PSAConfig(estimator=estimator, estimate_precision=precision or "full")


def inputs_and_cudnn_ms(shape):
    """Random bf16 q, k, v of a model shape (B = 1) and dense cuDNN's median ms on them."""
    q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    return q, k, v, cudnn_ms


def print_stage_table(shapes, estimators, kernels=False):
    """Per shape: each stage of the default config (topk, density ~0.15) in ms and in % of dense cuDNN."""
    header = ["shape", "cudnn ms", "pyramid"] + [f"est {e}" for e in estimators] + ["assign", "kernel", "psa total"]
    print_row(header)
    print_row(["---"] * len(header))
    for name in shapes:
        shape = SHAPES[name]
        q, k, v, cudnn_ms = inputs_and_cudnn_ms(shape)
        config = psa.PSAConfig()
        scores = psa.estimate_importance(q, k, config)
        levels = psa.assign_levels(scores, config, k=k, q_len=shape.tokens)
        times = [bench(lambda: psa.kv_pyramid(k, v))]
        pyramid = psa.kv_pyramid(k, v)
        for estimator in estimators:
            # As in sparse_attention: the pooled estimator reads the pyramid's k8 rather than k.
            estimate = functools.partial(psa.estimate_importance, q, k, estimator_config(estimator),
                                         k8=pyramid[8][0] if estimator == "pooled" else None)
            times.append(bench(estimate))
        times.append(bench(lambda: psa.assign_levels(scores, config, k=k, q_len=shape.tokens)))
        times.append(bench(lambda: psa.attention_over_pyramid(q, pyramid, levels, block_m=config.block_m,
                                                              block_n=config.block_n)))
        times.append(bench(lambda: psa.sparse_attention(q, k, v, config)))
        print_row([name, f"{cudnn_ms:.2f}"] + [f"{t:.3f} ({100 * t / cudnn_ms:.2f}%)" for t in times])
        if kernels:
            print_kernel_times("pyramid", lambda: psa.kv_pyramid(k, v))
            for estimator in estimators:
                print_kernel_times(estimator, functools.partial(
                    psa.estimate_importance, q, k, estimator_config(estimator),
                    k8=pyramid[8][0] if estimator == "pooled" else None))
            print_kernel_times("assign", lambda: psa.assign_levels(scores, config, k=k, q_len=shape.tokens))
        q = k = v = scores = levels = pyramid = None
        torch.cuda.empty_cache()


def print_gemm_floor_table(shapes, stride):
    """Per shape: cuBLAS's bf16 and FP8 GEMMs of the antidiagonal estimator's shape, in ms and % of cuDNN."""
    header = ["shape", "cudnn ms", "gemm bf16 (bmm)", "gemm fp8 (_scaled_mm)", "est antidiagonal",
              "est antidiagonal-fp8"]
    print_row(header)
    print_row(["---"] * len(header))
    for name in shapes:
        shape = SHAPES[name]
        q, k, _, cudnn_ms = inputs_and_cudnn_ms(shape)
        # Anti-rows (and anti-columns): ceil(L / S), rounded up to 16 for _scaled_mm.
        rows = ((shape.tokens + stride - 1) // stride + 15) // 16 * 16
        inner = stride * shape.head_dim
        anti_rows = torch.randn(shape.heads, rows, inner, device="cuda", dtype=torch.bfloat16)
        anti_columns = torch.randn(shape.heads, inner, rows, device="cuda", dtype=torch.bfloat16)
        times = [bench(lambda: torch.bmm(anti_rows, anti_columns))]
        try:
            a8 = anti_rows.reshape(-1, inner).to(torch.float8_e4m3fn)
            b8 = anti_columns[0].t().contiguous().to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS takes it
            one = torch.ones((), device="cuda")
            times.append(bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)))
        except (RuntimeError, TypeError) as error:  # an FP8 GEMM this torch / GPU does not run
            print(f"  FP8 GEMM on {name}: {type(error).__name__}: {str(error).splitlines()[0]}")
            times.append(None)
        anti_rows = anti_columns = a8 = b8 = None
        for estimator in ("antidiagonal", "antidiagonal-fp8"):
            times.append(bench(functools.partial(psa.estimate_importance, q, k, estimator_config(estimator))))
        print_row([name, f"{cudnn_ms:.2f}"] +
                  ["n/a" if t is None else f"{t:.3f} ({100 * t / cudnn_ms:.2f}%)" for t in times])
        q = k = None
        torch.cuda.empty_cache()


def graph_of(fn):
    """`fn` captured in a CUDA graph (warmed up on a side stream first): its replay has no host path."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def print_pooled_floor_table(shapes):
    """Per shape: the pooled estimate beside the reads it cannot avoid, all timed as do_bench times them
    (L2 flushed before each call, so its dirty lines are written back under the timed work): the
    estimate, its CUDA-graph replay (no host path), torch's sum of q and block sums of q (q alone is most
    of what the estimate reads: k8 is an eighth of k), and the estimate's kernels under the same flush."""
    from torch.profiler import ProfilerActivity, profile
    header = ["shape", "cudnn ms", "q + k8 MB", "est pooled", "est pooled (graph)", "q.sum()", "q block sums",
              "kernels after a flush (us)"]
    print_row(header)
    print_row(["---"] * len(header))
    flush_buffer = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    for name in shapes:
        shape = SHAPES[name]
        q, k, v, cudnn_ms = inputs_and_cudnn_ms(shape)
        k8 = psa.kv_pyramid(k, v)[8][0]
        estimate = functools.partial(psa.estimate_importance, q, k, estimator_config("pooled"), k8=k8)
        graph = graph_of(estimate)
        whole_blocks = q[:, :, :shape.tokens // 128 * 128].reshape(shape.heads, -1, 128, shape.head_dim)
        times = [bench(estimate), bench(graph.replay), bench(lambda: q.sum(dtype=torch.float32)),
                 bench(lambda: whole_blocks.sum(dim=2, dtype=torch.float32))]
        repeats = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                triton.runtime.driver.active.clear_cache(flush_buffer)
                estimate()
            torch.cuda.synchronize()
        kernels = " + ".join(f"{e.key.split('<')[0].split('::')[-1]} {e.device_time_total / repeats:.1f}"
                             for e in prof.key_averages()
                             if e.device_type == torch.autograd.DeviceType.CUDA and "psa::" in e.key)
        megabytes = (q.numel() + k8.numel()) * q.element_size() / 1e6
        print_row([name, f"{cudnn_ms:.2f}", f"{megabytes:.0f}"] +
                  [f"{1000 * t:.1f} us ({100 * t / cudnn_ms:.3f}%)" for t in times] + [kernels])
        q = k = v = k8 = whole_blocks = graph = None
        torch.cuda.empty_cache()


def forward_backward_ms(forward, inputs) -> float:
    """Median ms of forward + backward (gradients of q, k and v for a fixed random output gradient)."""
    grad_out = torch.randn_like(inputs[0])

    def step():
        out = forward(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return bench(step)


def print_backward_table(shapes, flex, kernels=False):
    """Per shape: forward + backward of psa at the default config, cuDNN dense, Flex block-sparse; with
    `kernels`, the device time of every kernel one psa forward + backward launches."""
    header = ["shape", "density", "psa fwd+bwd ms", "cudnn fwd+bwd ms", "flex fwd+bwd ms", "psa x cudnn",
              "psa x flex"]
    print_row(header)
    print_row(["---"] * len(header))
    for name in shapes:
        shape = SHAPES[name]
        q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        config = psa.PSAConfig()
        with torch.no_grad():
            scores = psa.estimate_importance(q, k, config)
            density = psa.level_stats(psa.assign_levels(scores, config, k=k, q_len=shape.tokens))["density"]
        mask = flex_block_mask(scores, density, shape.tokens, config.block_n)
        psa_ms = forward_backward_ms(lambda q, k, v: psa.sparse_attention(q, k, v, config), (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = forward_backward_ms(F.scaled_dot_product_attention, (q, k, v))
        flex_ms = forward_backward_ms(lambda q, k, v: flex(q, k, v, block_mask=mask), (q, k, v))
        print_row([name, f"{density:.3f}", f"{psa_ms:.2f}", f"{cudnn_ms:.2f}", f"{flex_ms:.2f}",
                   f"{cudnn_ms / psa_ms:.2f}", f"{flex_ms / psa_ms:.2f}"])
        if kernels:
            grad_out = torch.randn_like(q)
            print_kernel_times(f"{name} fwd+bwd", lambda: torch.autograd.grad(
                psa.sparse_attention(q, k, v, config), (q, k, v), grad_out), repeats=5)
        q = k = v = scores = mask = None
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(GPU_SHAPES))
    parser.add_argument("--densities", default="0.15,0.3,1.0")
    parser.add_argument("--estimators", default="sampled,pooled,antidiagonal")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    parser.add_argument("--no-densities", action="store_true", help="skip the per-density table")
    parser.add_argument("--kernels", action="store_true", help="per-kernel device times of each stage (and of psa's backward)")
    parser.add_argument("--site", action="append", default=[], help="extra site directory (for FA4)")
    parser.add_argument("--backward", action="store_true", help="forward + backward table at the default config")
    parser.add_argument("--gemm-floor", action="store_true",
                        help="cuBLAS's GEMMs of the antidiagonal estimator's shape beside its estimate")
    parser.add_argument("--pooled-floor", action="store_true",
                        help="the pooled estimate beside its CUDA-graph replay and torch's reads of q")
    args = parser.parse_args()
    for directory in args.site:
        site.addsitedir(directory)
    fa4 = FlashAttention4()
    densities = [] if args.no_densities else [float(d) for d in args.densities.split(",")]
    shapes = args.shapes.split(",")
    flex = torch.compile(flex_attention, dynamic=False)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B=1, "
          f"{datetime.date.today().isoformat()}, FA4: {'yes' if fa4.available else 'no (' + fa4.reason + ')'}")
    if not args.no_stages:
        print_stage_table(shapes, args.estimators.split(","), args.kernels)
    if args.gemm_floor:
        print_gemm_floor_table(shapes, psa.PSAConfig().stride)
    if args.pooled_floor:
        print_pooled_floor_table(shapes)
    if args.backward:
        print_backward_table(shapes, flex, args.kernels)
    if not densities:
        return
    header = ("shape", "dens", "psa ms", "pyr", "est", "asg", "attend", "kernel", "sm80 kernel", "cudnn", "flash",
              "flex", "fa4", "fa4 bs", "kernel TF/s", "psa TF/s", "cudnn TF/s", "flex TF/s", "fa4 TF/s",
              "fa4 bs TF/s", "psa x", "flex x", "fa4 bs x", "kernel / fa4 bs", "est+asg %")
    print("|" + "|".join(header) + "|")
    print("|" + "|".join("---" for _ in header) + "|")
    kernel_rates = {}  # (shape, density) -> the kernel's effective TFLOP/s
    for name in shapes:
        shape = SHAPES[name]
        length, heads, dim = shape.tokens, shape.heads, shape.head_dim
        q, k, v = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense_flops = 4 * heads * length * length * dim
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        fa4_ms = None
        if fa4.available:
            q4, k4, v4 = fa4.layout(q), fa4.layout(k), fa4.layout(v)
            fa4_ms = peer_time(f"FA4 dense on {name}", lambda: fa4.dense(q4, k4, v4))
        for density in densities:
            config = config_for(density)
            scores = psa.estimate_importance(q, k, config)
            levels = psa.assign_levels(scores, config, k=k, q_len=length)
            measured = psa.level_stats(levels)["density"]
            pyramid_ms = bench(lambda: psa.kv_pyramid(k, v))
            estimate_ms = bench(lambda: psa.estimate_importance(q, k, config))
            assign_ms = bench(lambda: psa.assign_levels(scores, config, k=k, q_len=length))
            attend_ms = bench(lambda: psa.attention_with_levels(q, k, v, levels, block_m=config.block_m,
                                                                block_n=config.block_n))
            pyramid = psa.kv_pyramid(k, v)
            kernel_ms = bench(lambda: psa.attention_over_pyramid(q, pyramid, levels, block_m=config.block_m,
                                                                 block_n=config.block_n))
            total_ms = bench(lambda: psa.sparse_attention(q, k, v, config))
            # The portable mma.sync kernel on the same input (the default picks the Hopper one on sm_90).
            os.environ["PSA_CUDA_KERNEL"] = "sm80"
            sm80_kernel_ms = bench(lambda: psa.attention_over_pyramid(q, pyramid, levels, block_m=config.block_m,
                                                                      block_n=config.block_n))
            os.environ.pop("PSA_CUDA_KERNEL")
            mask = flex_block_mask(scores, density, length, config.block_n)
            flex_density = mask.sparsity() if hasattr(mask, "sparsity") else None
            flex_density = density if flex_density is None else 1 - flex_density / 100
            flex_ms = bench(lambda: flex(q, k, v, block_mask=mask))
            fa4_bs_ms = None
            if fa4.available:
                tensors = fa4.block_sparse_tensors(scores, density, config.block_n)
                fa4_bs_ms = peer_time(f"FA4 block-sparse on {name} at {density}",
                                      lambda: fa4.block_sparse(q4, k4, v4, tensors),
                                      expected=flex(q, k, v, block_mask=mask).transpose(1, 2))
            row = (name, f"{measured:.3f}", f"{total_ms:.2f}", f"{pyramid_ms:.2f}", f"{estimate_ms:.2f}",
                   f"{assign_ms:.2f}", f"{attend_ms:.2f}", f"{kernel_ms:.2f}", f"{sm80_kernel_ms:.2f}",
                   f"{cudnn_ms:.2f}", f"{flash_ms:.2f}", f"{flex_ms:.2f}", cell(fa4_ms, lambda t: f"{t:.2f}"),
                   cell(fa4_bs_ms, lambda t: f"{t:.2f}"), f"{dense_flops * measured / kernel_ms / 1e9:.0f}",
                   f"{dense_flops * measured / total_ms / 1e9:.0f}", f"{dense_flops / cudnn_ms / 1e9:.0f}",
                   f"{dense_flops * flex_density / flex_ms / 1e9:.0f}",
                   cell(fa4_ms, lambda t: f"{dense_flops / t / 1e9:.0f}"),
                   cell(fa4_bs_ms, lambda t: f"{dense_flops * flex_density / t / 1e9:.0f}"),
                   f"{cudnn_ms / total_ms:.2f}", f"{cudnn_ms / flex_ms:.2f}",
                   cell(fa4_bs_ms, lambda t: f"{cudnn_ms / t:.2f}"),
                   cell(fa4_bs_ms, lambda t: f"{kernel_ms / t:.2f}"),
                   f"{100 * (estimate_ms + assign_ms) / cudnn_ms:.1f}")
            print("|" + "|".join(row) + "|", flush=True)
            kernel_rates[name, density] = dense_flops * measured / kernel_ms / 1e9
        q = k = v = q4 = k4 = v4 = pyramid = None   # free this shape's inputs before the next one
        torch.cuda.empty_cache()
    # Sparse tiles against dense ones: the kernel's effective rate at each density over its own rate at 1.0.
    for name in shapes:
        if (name, 1.0) in kernel_rates:
            ratios = ", ".join(f"{d}: {100 * kernel_rates[name, d] / kernel_rates[name, 1.0]:.0f}%"
                               for d in densities if d != 1.0)
            print(f"kernel effective TFLOP/s over its density-1.0 rate, {name}: {ratios}")


if __name__ == "__main__":
    main()
