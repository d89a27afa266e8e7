"""One denoising step of a Wan2.1-sized diffusers transformer, dense attention against psa.

The transformer is `WanTransformer3DModel` with the released model's configuration and random weights
(the weights are not needed to time it), bf16 on the GPU, batch 1 (one pass of classifier-free
guidance), a random text context of 512 tokens, and the latent of 81 frames: 480x832 for 1.3B
(21 x 30 x 52 = 32760 tokens), 720x1280 for 14B (21 x 45 x 80 = 75600). Per model it prints:
  - the step time with diffusers' cuDNN attention backend and with psa (default config, `--order`),
    both with the blocks compiled (`compile_repeated_blocks(fullgraph=True)`) unless `--no-compile`;
  - the attention share: the model's self-attention layers timed alone (SDPA cuDNN, psa's
    `sparse_attention`: on Wan the blocks hold psa's token order, `keep_order`, so a layer runs the op
    without permuting) over the step, and the step speedup;
  - psa's density and coverage on this input.
Median of `--repeats` steps after warm-up, CUDA events.

Usage: python benchmarks/bench_e2e.py [--models 1.3b,14b] [--order gilbert] [--repeats 5] [--no-compile]
       python benchmarks/bench_e2e.py --tiny   # a few-layer model on the CPU: checks the script, times nothing real
"""

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import psa
import psa.integrations.diffusers as psa_diffusers

# The released configurations (diffusers' WanTransformer3DModel arguments) and their 81-frame latents.
MODELS = {
    "1.3b": dict(config=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
                 latent=(21, 60, 104)),
    "14b": dict(config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
                latent=(21, 90, 160)),
    # For --tiny: the script's logic on the CPU.
    "tiny": dict(config=dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=64, num_layers=2, text_dim=32,
                             freq_dim=32, in_channels=4, out_channels=4),
                 latent=(3, 16, 24)),
}
TEXT_TOKENS = 512


def build(name, device, dtype):
    import diffusers

    torch.manual_seed(0)
    # Built on the device: initialising 14B parameters on the CPU takes minutes of a short GPU lease.
    with torch.device(device):
        model = diffusers.WanTransformer3DModel(**MODELS[name]["config"]).to(dtype=dtype).eval()
    config = model.config
    frames, height, width = MODELS[name]["latent"]
    latents = torch.randn(1, config.in_channels, frames, height, width, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS if name != "tiny" else 7, config.text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    return model, (latents, timestep, text)


def step_ms(model, inputs, repeats, device):
    """Median ms of one forward (a denoising step for one guidance pass)."""
    def forward():
        with torch.no_grad():
            model(*inputs, return_dict=False)
    for _ in range(2):  # compile and warm up
        forward()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            forward()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def attention_ms(model, inputs, config, repeats, device, dtype):
    """(dense, psa) ms of one self-attention layer alone on this model's shape (psa on tokens already in
    its order, as the integration runs Wan's blocks with keep_order)."""
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = inputs[0].shape
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    # Random tokens: psa's order would change nothing the op sees.
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))

    def run_psa():
        return psa.sparse_attention(q, k, v, config)

    def run_dense():
        if device.type == "cuda":
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    if device.type == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") for fn in (run_dense, run_psa))
    return tuple(min(_time_cpu(fn) for _ in range(max(1, repeats))) for fn in (run_dense, run_psa))


def _time_cpu(fn):
    begin = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - begin)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,14b")
    parser.add_argument("--order", default="gilbert", choices=psa.layout.ORDERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script only)")
    args = parser.parse_args()
    if args.tiny:
        names, device, dtype = ["tiny"], torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_e2e.py times the GPU; --tiny runs a check on the CPU")
        names, device, dtype = args.models.split(","), torch.device("cuda"), torch.bfloat16
    config = psa.PSAConfig()
    name_of_device = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {name_of_device}, torch {torch.__version__}, {dtype}, {datetime.date.today().isoformat()}, "
          f"order {args.order}, compile {'no' if args.no_compile else 'compile_repeated_blocks'}")
    header = ["model", "tokens", "dense step ms", "psa step ms", "step speedup", "attn dense ms", "attn psa ms",
              "attn share dense", "attn share psa", "density", "coverage"]
    print("|" + "|".join(header) + "|")
    print("|" + "|".join("---" for _ in header) + "|")
    for name in names:
        try:
            model, inputs = build(name, device, dtype)
        except torch.cuda.OutOfMemoryError:
            print(f"|{name}|out of memory|")
            continue
        layers = model.config.num_layers
        if device.type == "cuda":
            model.set_attention_backend("_native_cudnn")
        if not args.no_compile:
            model.compile_repeated_blocks(fullgraph=True)
        dense_ms = step_ms(model, inputs, args.repeats, device)
        psa_diffusers.apply(model, config, order=args.order)
        psa_ms = step_ms(model, inputs, args.repeats, device)
        stats = psa_diffusers.stats(model)
        density = statistics.mean(s["density"] for s in stats)
        coverage = statistics.mean(s["coverage"] for s in stats)
        attn_dense, attn_psa = attention_ms(model, inputs, config, args.repeats, device, dtype)
        p_t, p_h, p_w = model.config.patch_size
        tokens = (inputs[0].shape[2] // p_t) * (inputs[0].shape[3] // p_h) * (inputs[0].shape[4] // p_w)
        print("|" + "|".join([
            name, str(tokens), f"{dense_ms:.1f}", f"{psa_ms:.1f}", f"{dense_ms / psa_ms:.2f}x",
            f"{attn_dense:.2f}", f"{attn_psa:.2f}", f"{100 * layers * attn_dense / dense_ms:.0f}%",
            f"{100 * layers * attn_psa / psa_ms:.0f}%", f"{density:.3f}", f"{coverage:.3f}"]) + "|", flush=True)
        model = inputs = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
