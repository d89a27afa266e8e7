"""psa under diffusers' Ulysses context parallelism: one denoising step of a Wan2.1-sized transformer on
one GPU and on N GPUs of one host, the outputs compared and the step times' ratio printed.

Each rank runs `WanTransformer3DModel` (bench_e2e.py's configuration, random weights, bf16) with
`enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`, then psa applied (default config,
gilbert order): diffusers' all-to-all gives every rank the whole sequence for 1/N of the heads, and psa
attends there. NCCL with NVLink multicast off (NCCL_NVLS_ENABLE=0). The one-GPU run is the same model
without parallelism. Median of `--repeats` steps after warm-up. The attention outside psa (cross-attention;
every layer with --dense) runs on diffusers' cuDNN backend, as in bench_e2e.py.

--compile compiles the blocks (`compile_repeated_blocks`) in both runs; not fullgraph: diffusers' input
splitter on the first block calls inspect.signature, which Dynamo cannot trace (a graph break there only).
--overlap (with --compile) lets Inductor move independent work under the all-to-alls
(`torch._inductor.config.reorder_for_compute_comm_overlap`).
--dense times diffusers' own attention instead of psa (what its Ulysses gives a dense model).
--profile prints where one step's GPU time goes (torch.profiler, kernels grouped) on one GPU and on rank 0.

Usage: python benchmarks/bench_ulysses.py [--model 1.3b] [--world 2] [--repeats 5] [--compile [--overlap]] [--dense] [--profile]
       python benchmarks/bench_ulysses.py --tiny   # two CPU processes over gloo: checks the script only
"""

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psa  # noqa: E402
import psa.integrations.diffusers as psa_diffusers  # noqa: E402
from bench_e2e import build  # noqa: E402


def timed_steps(model, inputs, repeats, device, barrier=lambda: None):
    def forward():
        with torch.no_grad():
            return model(*inputs, return_dict=False)[0]
    for _ in range(2):
        out = forward()
    times = []
    for _ in range(repeats):
        barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        out = forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - begin))
    return out, statistics.median(times)


# Kernel families of a step's GPU time, by substring of the kernel name (first match wins).
KERNEL_GROUPS = [("nccl", ("nccl",)), ("psa", ("psa::",)),
                 ("dense attention", ("cudnn", "fmha", "flash", "sdpa")),
                 ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
                 ("copies", ("copy", "gather", "scatter", "index", "cat"))]


def print_profile(label, model, inputs, device):
    """One step under torch.profiler: its wall time, the GPU time per kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    def forward():
        with torch.no_grad():
            model(*inputs, return_dict=False)
    forward()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        forward()
        torch.cuda.synchronize(device)
        wall = 1000 * (time.perf_counter() - begin)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups = {}
    for e in events:
        name = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + e.device_time_total / 1000
    total = sum(groups.values())
    print(f"## {label}: step {wall:.1f} ms wall, {total:.1f} ms of kernels; "
          + ", ".join(f"{g} {ms:.1f}" for g, ms in sorted(groups.items(), key=lambda item: -item[1])), flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        print(f"   {e.device_time_total / 1000:8.2f} ms  x{e.count:<5d} {e.key[:100]}", flush=True)


def prepare(model, parallel, compile_blocks, dense):
    """Context parallelism first (diffusers checks the attention backends when it is enabled), then psa,
    then compilation."""
    if next(model.parameters()).is_cuda:
        model.set_attention_backend("_native_cudnn")
    if parallel is not None:
        model.enable_parallelism(config=parallel)
    if not dense:
        psa_diffusers.apply(model, psa.PSAConfig())
    if compile_blocks:
        model.compile_repeated_blocks(fullgraph=False)


def _rank(rank, world, name, repeats, tiny, init_file, result_file, compile_blocks, dense, profile, overlap):
    import diffusers
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if tiny:
        # diffusers 0.42.1 on a CPU-only torch: see tests/test_diffusers_parallel.py.
        torch.accelerator.device_count = lambda: 1
        if not hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once = logging.Logger.warning
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        device, dtype, backend = torch.device("cuda", rank), torch.bfloat16, "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    if overlap:
        import torch._inductor.config as inductor_config
        inductor_config.reorder_for_compute_comm_overlap = True
    try:
        model, inputs = build(name, device, dtype)
        prepare(model, diffusers.ContextParallelConfig(ulysses_degree=world), compile_blocks, dense)
        out, ms = timed_steps(model, inputs, repeats, device, barrier=dist.barrier)
        if profile and not tiny:
            print_profile(f"rank {rank} of {world}", model, inputs, device)
        if rank == 0:
            torch.save({"out": out.float().cpu(), "ms": ms}, result_file)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1.3b")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compile the blocks in both runs")
    parser.add_argument("--overlap", action="store_true", help="Inductor's compute / communication reordering")
    parser.add_argument("--dense", action="store_true", help="diffusers' own attention instead of psa")
    parser.add_argument("--profile", action="store_true", help="where one step's GPU time goes")
    parser.add_argument("--tiny", action="store_true", help="two CPU processes over gloo (checks the script only)")
    args = parser.parse_args()
    name = "tiny" if args.tiny else args.model
    if not args.tiny and torch.cuda.device_count() < args.world:
        sys.exit(f"bench_ulysses.py needs {args.world} GPUs, found {torch.cuda.device_count()}")
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    dtype = torch.float32 if args.tiny else torch.bfloat16

    model, inputs = build(name, device, dtype)
    prepare(model, None, args.compile, args.dense)
    single, single_ms = timed_steps(model, inputs, args.repeats, device)
    single = single.float().cpu()
    if args.profile and not args.tiny:
        print_profile("one GPU", model, inputs, device)
    model = inputs = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as directory:
        result_file = os.path.join(directory, "rank0.pt")
        mp.spawn(_rank, args=(args.world, name, args.repeats, args.tiny, os.path.join(directory, "init"),
                              result_file, args.compile, args.dense, args.profile, args.overlap), nprocs=args.world)
        result = torch.load(result_file)
    difference = (result["out"] - single).abs()
    relative = (difference.square().mean() / single.square().mean()).sqrt().item()
    label = "CPU (gloo)" if args.tiny else f"{args.world} x {torch.cuda.get_device_name()}"
    print(f"# {label}, torch {torch.__version__}, {dtype}, {datetime.date.today().isoformat()}, model {name}, "
          f"attention {'dense (cuDNN)' if args.dense else 'psa'}, compile {'blocks' if args.compile else 'no'}"
          f"{', comm overlap' if args.overlap else ''}")
    print("|model|1 device step ms|" f"{args.world} devices step ms|scaling|max abs diff|rel. L2 diff|")
    print("|---|---|---|---|---|---|")
    print(f"|{name}|{single_ms:.1f}|{result['ms']:.1f}|{single_ms / result['ms']:.2f}x|"
          f"{difference.max().item():.3g}|{relative:.3g}|")


if __name__ == "__main__":
    main()
