"""The Hopper kernels (sm_90a: the TMA + wgmma attention in csrc/kernels/sm90/, the wgmma variant of the
fused sampled estimator) against psa.reference and the sm80 kernels.

The rest of the CUDA suite runs with the default kernel choice, which is this kernel on an H100/H200
for block_m 64/128 and block_n 64/128; these tests force it (PSA_CUDA_KERNEL=sm90, an error if it
cannot run) on shapes that stress its tiling: many pieces per tile, partial key blocks, empty slots,
causal diagonals, GQA, strided inputs.
"""

import pytest
import torch

import psa
from psa import PSAConfig, _loader, reference
from conftest import (CUDA_DTYPES, CUDA_HEAD_DIMS, check_attention_against_reference, random_levels, randn,
                      requires_cuda)


def sm90_kernels_available() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and bool(_loader.read_build_info().get("sm90_kernels")))


requires_sm90 = pytest.mark.skipif(not sm90_kernels_available(),
                                   reason="needs an H100/H200 and psa built with sm_90a and CUTLASS")
pytestmark = [pytest.mark.cuda, requires_cuda, requires_sm90]


@pytest.fixture
def kernel(monkeypatch):
    """Selects the CUDA attention kernel for the calls a test makes: kernel('sm90') or kernel('sm80')."""
    def select(name):
        monkeypatch.setenv("PSA_CUDA_KERNEL", name)
    return select


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (128, 64), (64, 128), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len,q_heads,kv_heads", [(1000, 1283, 4, 2), (517, 517, 2, 2), (257, 97, 3, 1)])
def test_matches_reference(rng, kernel, dtype, head_dim, block_m, block_n, causal, q_len, k_len, q_heads, kv_heads):
    kernel("sm90")
    q = randn(rng, 2, q_heads, q_len, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    v = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    levels = random_levels(rng, 2, q_heads, -(-q_len // block_m), -(-k_len // block_n)).cuda()
    check_attention_against_reference(q, k, v, levels, block_m=block_m, block_n=block_n, causal=causal)


@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("level", [1, 2, 4, 8])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 64)])
def test_single_level_maps(rng, kernel, head_dim, level, block_m, block_n):
    # One level everywhere: at level 8 and block_n 64 a 128-key tile is sixteen 8-row TMA pieces.
    kernel("sm90")
    q = randn(rng, 1, 2, 300, head_dim, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 2001, head_dim, dtype=torch.bfloat16, device="cuda")
    v = randn(rng, 1, 2, 2001, head_dim, dtype=torch.bfloat16, device="cuda")
    levels = torch.full((1, 2, -(-300 // block_m), -(-2001 // block_n)), level, dtype=torch.int8, device="cuda")
    check_attention_against_reference(q, k, v, levels, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 64)])
def test_equals_sm80_kernel(rng, kernel, block_m, block_n):
    # Both kernels compute the same function: on one input their outputs differ by rounding only.
    q = randn(rng, 1, 4, 3000, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 3100, 128, dtype=torch.bfloat16, device="cuda")
    v = randn(rng, 1, 2, 3100, 128, dtype=torch.bfloat16, device="cuda")
    levels = random_levels(rng, 1, 4, -(-3000 // block_m), -(-3100 // block_n)).cuda()
    kernel("sm90")
    out90, lse90 = psa.attention_with_levels(q, k, v, levels, block_m=block_m, block_n=block_n, return_lse=True)
    kernel("sm80")
    out80, lse80 = psa.attention_with_levels(q, k, v, levels, block_m=block_m, block_n=block_n, return_lse=True)
    torch.testing.assert_close(out90.float(), out80.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse90, lse80, atol=1e-3, rtol=0)


def test_strided_inputs_and_empty_rows(rng, kernel):
    kernel("sm90")
    # [B, L, H, D] storage viewed as [B, H, L, D]: TMA reads it through its strides, no copy.
    q = randn(rng, 2, 700, 4, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
    k = randn(rng, 2, 650, 2, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
    v = randn(rng, 2, 650, 2, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
    levels = random_levels(rng, 2, 4, 6, 6).cuda()
    levels[0, 1, 2] = 0   # an empty row: zeros and lse = -inf
    levels[1, :, :, :] = 0
    out, lse = check_attention_against_reference(q, k, v, levels, block_m=128, block_n=128, causal=True)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert (out[0, 1, 256:384] == 0).all()


def test_all_level_one_equals_sdpa(rng, kernel):
    kernel("sm90")
    q = randn(rng, 1, 4, 2048, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 4, 2048, 128, dtype=torch.bfloat16, device="cuda")
    v = randn(rng, 1, 4, 2048, 128, dtype=torch.bfloat16, device="cuda")
    levels = torch.ones(1, 4, 16, 16, dtype=torch.int8, device="cuda")
    out = psa.attention_with_levels(q, k, v, levels, block_m=128, block_n=128)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - dense).norm() / dense.norm() < 1e-2


def test_unsupported_configuration_names_the_reason(rng, kernel):
    kernel("sm90")
    q = randn(rng, 1, 1, 256, 64, dtype=torch.bfloat16, device="cuda")
    levels = torch.ones(1, 1, 8, 8, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="block_m must be 64 or 128"):
        psa.attention_with_levels(q, q, q, levels, block_m=32, block_n=32)
    kernel("auto")  # the default falls back to the sm80 kernel for the same call
    psa.attention_with_levels(q, q, q, levels, block_m=32, block_n=32)


def test_bad_kernel_choice_is_rejected(rng, kernel):
    kernel("wgmma")
    q = randn(rng, 1, 1, 128, 64, dtype=torch.bfloat16, device="cuda")
    levels = torch.ones(1, 1, 1, 1, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="PSA_CUDA_KERNEL must be auto, sm80 or sm90"):
        psa.attention_with_levels(q, q, q, levels, block_m=128, block_n=128)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 32), (32, 64)])
def test_sampled_estimator_matches_reference(rng, kernel, dtype, head_dim, causal, block_m, block_n):
    kernel("sm90")
    q = randn(rng, 2, 4, 1333, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, 2, 1301, head_dim, dtype=dtype, device="cuda")
    scores = psa.estimate_importance(q, k, PSAConfig(block_m=block_m, block_n=block_n, causal=causal))
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), causal=causal, method="sampled",
                                             block_m=block_m, block_n=block_n).double()
    # wgmma multiplies bf16/fp16 exactly and accumulates in fp32, like the sm80 kernel.
    torch.testing.assert_close(scores.cpu().double(), expected, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_estimator_strided_gqa_drawn_offsets(rng, kernel, causal):
    # [B, L, H, D] views (token stride H * D), Lq != Lk, GQA 3:1, offsets drawn by a generator, and enough
    # query blocks for several CTAs per head (256 sampled rows each) and several key tiles per CTA.
    kernel("sm90")
    q = randn(rng, 2, 2900, 3, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = randn(rng, 2, 3333, 1, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    q_offsets = torch.sort(torch.randperm(64, generator=rng)[:16]).values
    k_offsets = torch.sort(torch.randperm(128, generator=rng)[:32]).values
    scores = torch.ops.psa.estimate_importance(q, k, q_offsets.cuda(), k_offsets.cuda(), block_m=64, block_n=128,
                                               method="sampled", causal=causal)
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), causal=causal, method="sampled",
                                             block_m=64, block_n=128, q_offsets=q_offsets, k_offsets=k_offsets)
    torch.testing.assert_close(scores.cpu().double(), expected.double(), atol=2e-5, rtol=1e-3)


def test_sampled_estimator_equals_sm80(rng, kernel):
    q = randn(rng, 1, 4, 4000, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 4100, 128, dtype=torch.bfloat16, device="cuda")
    config = PSAConfig(causal=True)
    kernel("sm90")
    hopper = psa.estimate_importance(q, k, config)
    kernel("sm80")
    portable = psa.estimate_importance(q, k, config)
    torch.testing.assert_close(hopper, portable, atol=1e-5, rtol=1e-4)
