"""psa under diffusers' Ulysses context parallelism: one denoising step of a Wan2.1-sized transformer on
one GPU and on N GPUs of one host, the outputs compared and the step times' ratio printed.

Each rank runs `WanTransformer3DModel` (bench_e2e.py's configuration, random weights, bf16) with
`enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`, then psa applied (default config,
gilbert order): diffusers' all-to-all gives every rank the whole sequence for 1/N of the heads, and psa
attends there. NCCL with NVLink multicast off (NCCL_NVLS_ENABLE=0). The one-GPU run is the same model
without parallelism. Median of `--repeats` steps after warm-up.

Usage: python benchmarks/bench_ulysses.py [--model 1.3b] [--world 2] [--repeats 5]
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


def _rank(rank, world, name, repeats, tiny, init_file, result_file):
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
    try:
        model, inputs = build(name, device, dtype)
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=world))
        psa_diffusers.apply(model, psa.PSAConfig())
        out, ms = timed_steps(model, inputs, repeats, device, barrier=dist.barrier)
        if rank == 0:
            torch.save({"out": out.float().cpu(), "ms": ms}, result_file)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1.3b")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="two CPU processes over gloo (checks the script only)")
    args = parser.parse_args()
    name = "tiny" if args.tiny else args.model
    if not args.tiny and torch.cuda.device_count() < args.world:
        sys.exit(f"bench_ulysses.py needs {args.world} GPUs, found {torch.cuda.device_count()}")
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    dtype = torch.float32 if args.tiny else torch.bfloat16

    model, inputs = build(name, device, dtype)
    psa_diffusers.apply(model, psa.PSAConfig())
    single, single_ms = timed_steps(model, inputs, args.repeats, device)
    single = single.float().cpu()
    model = inputs = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as directory:
        result_file = os.path.join(directory, "rank0.pt")
        mp.spawn(_rank, args=(args.world, name, args.repeats, args.tiny, os.path.join(directory, "init"),
                              result_file), nprocs=args.world)
        result = torch.load(result_file)
    difference = (result["out"] - single).abs()
    relative = (difference.square().mean() / single.square().mean()).sqrt().item()
    label = "CPU (gloo)" if args.tiny else f"{args.world} x {torch.cuda.get_device_name()}"
    print(f"# {label}, torch {torch.__version__}, {dtype}, {datetime.date.today().isoformat()}, model {name}")
    print("|model|1 device step ms|" f"{args.world} devices step ms|scaling|max abs diff|rel. L2 diff|")
    print("|---|---|---|---|---|---|")
    print(f"|{name}|{single_ms:.1f}|{result['ms']:.1f}|{single_ms / result['ms']:.2f}x|"
          f"{difference.max().item():.3g}|{relative:.3g}|")


if __name__ == "__main__":
    main()
