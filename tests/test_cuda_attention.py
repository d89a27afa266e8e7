"""The CUDA attention kernel against psa.reference (float64, FlashAttention error rule) and SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

import psa
from conftest import (CUDA_DTYPES, CUDA_HEAD_DIMS, LEVELS, assert_attention_close,
                      check_attention_against_reference, random_levels, randn,
                      requires_cuda)

pytestmark = [pytest.mark.cuda, requires_cuda]

@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 32), (32, 64), (128, 64), (64, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len,q_heads,kv_heads", [(301, 333, 4, 2), (257, 97, 3, 1), (130, 130, 2, 2)])
def test_random_level_maps_match_reference(rng, dtype, head_dim, block_m, block_n, causal, q_len, k_len, q_heads,
                                           kv_heads):
    q = randn(rng, 2, q_heads, q_len, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    v = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    levels = random_levels(rng, 2, q_heads, -(-q_len // block_m), -(-k_len // block_n)).cuda()
    check_attention_against_reference(q, k, v, levels, block_m=block_m, block_n=block_n, causal=causal)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("level", [1, 2, 4, 8])
def test_single_level_maps(rng, dtype, head_dim, level):
    # Every block at one level: level 8 with block_n 32 packs sixteen 4-token blocks into each tile.
    q = randn(rng, 1, 2, 200, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 1, 2, 1000, head_dim, dtype=dtype, device="cuda")
    v = randn(rng, 1, 2, 1000, head_dim, dtype=dtype, device="cuda")
    for block_n in (32, 64, 128):
        levels = torch.full((1, 2, 4, -(-1000 // block_n)), level, dtype=torch.int8, device="cuda")
        check_attention_against_reference(q, k, v, levels, block_m=64, block_n=block_n)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len,q_heads,kv_heads", [(200, 200, 2, 2), (130, 261, 4, 2), (257, 97, 3, 1)])
def test_all_level_one_equals_sdpa(rng, dtype, head_dim, causal, q_len, k_len, q_heads, kv_heads):
    q = randn(rng, 2, q_heads, q_len, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    v = randn(rng, 2, kv_heads, k_len, head_dim, dtype=dtype, device="cuda")
    levels = torch.ones(2, q_heads, -(-q_len // 64), -(-k_len // 32), dtype=torch.int8, device="cuda")
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=32, causal=causal, return_lse=True)
    group = q_heads // kv_heads
    mask = (torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)).cuda()
    mask = mask if causal else None
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    expected64 = F.scaled_dot_product_attention(q.double(), k_full.double(), v_full.double(), attn_mask=mask)
    expected_lowp = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask)
    seen = mask.any(-1) if causal else torch.ones(q_len, dtype=torch.bool, device="cuda")
    assert_attention_close(out[:, :, seen], expected64[:, :, seen], expected_lowp[:, :, seen])
    assert (out[:, :, ~seen] == 0).all() and (lse[:, :, ~seen] == -math.inf).all()
    logits = (q.double() @ k_full.double().transpose(-1, -2)) * head_dim ** -0.5
    if causal:
        logits = logits.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse[:, :, seen].double(), torch.logsumexp(logits, -1)[:, :, seen], atol=1e-3,
                               rtol=1e-4)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_identical_key_groups_make_pooled_levels_exact(rng, dtype):
    # Groups of 8 identical keys/values: any map without skips equals dense attention (non-causal).
    k_len = 8 * 40 - 3
    k = randn(rng, 1, 2, 40, 64, dtype=dtype, device="cuda").repeat_interleave(8, 2)[:, :, :k_len]
    v = randn(rng, 1, 2, 40, 64, dtype=dtype, device="cuda").repeat_interleave(8, 2)[:, :, :k_len]
    q = randn(rng, 1, 2, 150, 64, dtype=dtype, device="cuda")
    levels = random_levels(rng, 1, 2, 3, -(-k_len // 32), LEVELS[1:]).cuda()
    out = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=32)
    expected64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    expected_lowp = F.scaled_dot_product_attention(q, k, v)
    assert_attention_close(out, expected64, expected_lowp)


@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
def test_empty_rows_give_zeros_and_minus_inf(rng, head_dim):
    q = randn(rng, 1, 2, 100, head_dim, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 90, head_dim, dtype=torch.bfloat16, device="cuda")
    levels = random_levels(rng, 1, 2, 2, 3).cuda()
    levels[:, :, 1] = 0
    levels[:, 0, 0] = 0
    out, lse = psa.attention_with_levels(q, k, k, levels, block_m=64, block_n=32, return_lse=True)
    assert (out[:, :, 64:] == 0).all() and (lse[:, :, 64:] == -math.inf).all()
    assert (out[:, 0] == 0).all() and (lse[:, 0] == -math.inf).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_strided_and_misaligned_inputs_equal_contiguous(rng):
    # [B, L, H, D] storage seen through transpose(1, 2) is read in place; a tensor whose rows are not
    # 16-byte aligned (storage offset 1) is copied first. Both must give the contiguous result.
    q = randn(rng, 2, 150, 4, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = randn(rng, 2, 170, 2, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    flat = randn(rng, 2 * 2 * 170 * 64 + 1, dtype=torch.bfloat16, device="cuda")
    v = flat[1:].view(2, 2, 170, 64)
    levels = random_levels(rng, 2, 4, 3, 3).cuda()
    kwargs = dict(block_m=64, block_n=64, causal=True)
    strided = psa.attention_with_levels(q, k, v, levels, **kwargs)
    contiguous = psa.attention_with_levels(q.contiguous(), k.contiguous(), v.contiguous(), levels, **kwargs)
    assert torch.equal(strided, contiguous)


@pytest.mark.parametrize("dim", CUDA_HEAD_DIMS)
def test_attention_over_a_given_pyramid_equals_attention_with_levels(rng, dim):
    # The pyramid passed in, as strided views of [B, L, H, D] storage and with a misaligned level: the
    # kernel reads what it is given (TMA-compatible or copied), with attention_with_levels' result.
    q = randn(rng, 1, 4, 300, dim, dtype=torch.bfloat16, device="cuda")
    k, v = (randn(rng, 1, 2, 333, dim, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    levels = random_levels(rng, 1, 4, 3, 3).cuda()
    kwargs = dict(block_m=128, block_n=128, causal=True)
    pyramid = psa.kv_pyramid(k, v)
    strided = {level: tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in pair)
               for level, pair in pyramid.items()}
    flat = torch.empty(pyramid[8][1].numel() + 1, dtype=torch.bfloat16, device="cuda")
    misaligned = flat[1:].view(pyramid[8][1].shape).copy_(pyramid[8][1])
    strided[8] = (strided[8][0], misaligned)
    expected = psa.attention_with_levels(q, k, v, levels, **kwargs)
    assert torch.equal(psa.attention_over_pyramid(q, strided, levels, **kwargs), expected)


def test_explicit_scale(rng):
    q, k, v = (randn(rng, 1, 2, 150, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    levels = torch.ones(1, 2, 3, 3, dtype=torch.int8, device="cuda")
    out = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=64, scale=0.3)
    expected64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert_attention_close(out, expected64, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_offsets_past_2_to_the_31(rng):
    # B * H * L * D > 2^31 elements: the last head, computed in place, equals the same head alone.
    heads, length, dim = 520, 32768, 128
    q = torch.zeros(1, heads, length, dim, dtype=torch.bfloat16, device="cuda")
    assert q.numel() > 2**31
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    for x in (q, k, v):
        x[:, -1] = randn(rng, length, dim, dtype=torch.bfloat16, device="cuda")
    levels = torch.zeros(1, heads, length // 128, length // 128, dtype=torch.int8, device="cuda")
    levels[:, -1] = random_levels(rng, 1, 1, length // 128, length // 128)[0].cuda()
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=128, block_n=128, return_lse=True)
    alone, alone_lse = psa.attention_with_levels(q[:, -1:].clone(), k[:, -1:].clone(), v[:, -1:].clone(),
                                                 levels[:, -1:].clone(), block_m=128, block_n=128, return_lse=True)
    assert torch.equal(out[:, -1:], alone) and torch.equal(lse[:, -1:], alone_lse)
    assert alone.abs().sum() > 0
