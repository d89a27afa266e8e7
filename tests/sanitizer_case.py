"""A small run of every CUDA op, for compute-sanitizer (not collected by pytest):

    compute-sanitizer --tool memcheck python tests/sanitizer_case.py
    compute-sanitizer --tool racecheck python tests/sanitizer_case.py

Covers bf16 and fp16, head_dim 64 and 128, GQA, Lq != Lk with lengths that are not block multiples,
causal and not, block_m 64/128, block_n 32/64/128, every estimator and both assignment modes, and the
backward through autograd. On an H100/H200 the default kernel choice runs the Hopper (sm_90a) kernels
wherever they apply (block_n 32 falls back to sm80); PSA_CUDA_KERNEL=sm80 checks the portable ones.
"""

import torch

import psa


def main():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=generator).to("cuda", dtype)

    for dtype, head_dim, block_m, block_n in ((torch.bfloat16, 128, 128, 128), (torch.float16, 64, 64, 32),
                                              (torch.bfloat16, 64, 64, 64), (torch.float16, 128, 128, 64)):
        q = rand(1, 4, 333, head_dim, dtype=dtype)
        k, v = rand(1, 2, 301, head_dim, dtype=dtype), rand(1, 2, 301, head_dim, dtype=dtype)
        for causal in (False, True):
            for estimator, mode in (("sampled", "topk"), ("antidiagonal", "threshold"), ("pooled", "topk")):
                config = psa.PSAConfig(block_m=block_m, block_n=block_n, estimator=estimator, mode=mode, causal=causal,
                                       sim_thresholds=(0.0, -0.1, -0.2))
                out, levels = psa.sparse_attention(q, k, v, config, force_keys=range(290, 301), return_levels=True)
                assert torch.isfinite(out).all()
            # The pooled estimator pooling k itself (sparse_attention hands it the pyramid's k8).
            psa.estimate_importance(q, k, psa.PSAConfig(block_m=block_m, block_n=block_n, estimator="pooled",
                                                        causal=causal))
            # The backward kernels (dq query-major, dK / dV key-major per level) through autograd.
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = psa.attention_with_levels(*leaves, levels, block_m=block_m, block_n=block_n, causal=causal)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            assert all(torch.isfinite(g).all() for g in grads)
    # The antidiagonal kernels over several CTAs and column tiles (Hopper: 256 anti-columns = 2048 keys).
    for causal in (False, True):
        config = psa.PSAConfig(estimator="antidiagonal", causal=causal)
        psa.estimate_importance(rand(1, 2, 2100, 128, dtype=torch.bfloat16), rand(1, 1, 4500, 128, dtype=torch.bfloat16),
                                config)
    # FP8 scoring: the quantization kernel and the Hopper kernel on FP8 wgmma (two column tiles).
    for causal in (False, True):
        config = psa.PSAConfig(estimator="antidiagonal", causal=causal, estimate_precision="fp8")
        psa.estimate_importance(rand(1, 2, 2100, 128, dtype=torch.bfloat16), rand(1, 1, 4500, 128, dtype=torch.bfloat16),
                                config)
    # The pooled kernels over several CTAs and passes (35 query blocks, 16 a CTA; 141 or 282 key blocks, 64
    # a pass): the scores kernel's logits in its ring (141 at head_dim 64) and in the output (the rest).
    for causal in (False, True):
        for head_dim, k_len in ((128, 4500), (64, 4500), (64, 9000)):
            q, k = rand(1, 2, 1100, head_dim, dtype=torch.float16), rand(1, 1, k_len, head_dim, dtype=torch.float16)
            config = psa.PSAConfig(block_m=32, block_n=32, estimator="pooled", causal=causal)
            psa.estimate_importance(q, k, config)
            psa.estimate_importance(q, k, config, k8=psa.kv_pyramid(k, k)[8][0])
    # The sampled kernels over several CTAs and key tiles: on Hopper, rows read in place (default offsets)
    # beside the copied rows of the partial last blocks.
    for causal in (False, True):
        psa.estimate_importance(rand(1, 2, 2563, 128, dtype=torch.bfloat16), rand(1, 1, 1531, 128, dtype=torch.bfloat16),
                                psa.PSAConfig(causal=causal))
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
