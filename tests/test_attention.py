import math

import pytest
import torch
import torch.nn.functional as F

import psa
from psa import reference
from conftest import DEVICES, LEVELS, assert_attention_close, randn, random_levels


def naive_attention(q, k, v, levels, block_m, block_n, scale, causal):
    """Spec section 3 read literally, one row at a time, in float64: list the visible tokens of every
    level, give each the logit scale * q.K + ln(count), softmax, weight the pooled values."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, dim = q.shape
    k_len, group = k.shape[2], q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, q_len), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for r in range(q_len):
                logits, values = [], []
                for j in range(levels.shape[-1]):
                    level = int(levels[b, h, r // block_m, j])
                    if level == 0:
                        continue
                    for first in range(j * block_n, min((j + 1) * block_n, k_len), level):
                        last = min(first + level, k_len) - 1
                        if causal and last > r + k_len - q_len:
                            continue
                        key = k[b, h // group, first:last + 1].mean(0)
                        logits.append(scale * (q[b, h, r] @ key) + math.log(last + 1 - first))
                        values.append(v[b, h // group, first:last + 1].mean(0))
                if logits:
                    weights = torch.softmax(torch.stack(logits), 0)
                    out[b, h, r] = weights @ torch.stack(values)
                    lse[b, h, r] = torch.logsumexp(torch.stack(logits), 0)
    return out, lse


def bottom_right_causal_mask(q_len, k_len):
    return torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len,q_heads,kv_heads", [(200, 200, 2, 2), (130, 261, 4, 2), (257, 97, 3, 1)])
def test_all_level_one_equals_sdpa(rng, device, causal, q_len, k_len, q_heads, kv_heads):
    q = randn(rng, 2, q_heads, q_len, 32, dtype=torch.float64, device=device)
    k = randn(rng, 2, kv_heads, k_len, 32, dtype=torch.float64, device=device)
    v = randn(rng, 2, kv_heads, k_len, 32, dtype=torch.float64, device=device)
    levels = torch.ones(2, q_heads, -(-q_len // 64), -(-k_len // 32), dtype=torch.int8, device=device)
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=32, causal=causal, return_lse=True)
    group = q_heads // kv_heads
    mask = bottom_right_causal_mask(q_len, k_len).to(device) if causal else None
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    expected = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask)
    seen = mask.any(-1) if causal else torch.ones(q_len, dtype=torch.bool, device=device)
    torch.testing.assert_close(out[:, :, seen], expected[:, :, seen])
    assert (out[:, :, ~seen] == 0).all()  # causal with Lq > Lk: early rows see no key
    logits = (q @ k_full.transpose(-1, -2)) * 32 ** -0.5
    if causal:
        logits = logits.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1).float().double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_identical_key_groups_make_pooled_levels_exact(rng, device, causal):
    # Every aligned group of 8 keys (and values) is one repeated vector, so a block at any level
    # stands exactly for its keys: any map without skips equals dense attention.
    k_len = 8 * 25 - 3
    k = randn(rng, 1, 2, 25, 16, dtype=torch.float64, device=device).repeat_interleave(8, 2)[:, :, :k_len]
    v = randn(rng, 1, 2, 25, 16, dtype=torch.float64, device=device).repeat_interleave(8, 2)[:, :, :k_len]
    q = randn(rng, 1, 2, k_len, 16, dtype=torch.float64, device=device)
    levels = random_levels(rng, 1, 2, -(-k_len // 32), -(-k_len // 32), LEVELS[1:]).to(device)
    out = psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32, causal=causal)
    mask = bottom_right_causal_mask(k_len, k_len).to(device) if causal else None
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Causal: a pooled token is visible once all of its keys are, so rows at the end of a group of 8
    # see every group whole or not at all; only they are exact.
    rows = torch.arange(k_len, device=device)
    exact = (rows % 8 == 7) | (rows == k_len - 1) if causal else torch.ones_like(rows, dtype=torch.bool)
    torch.testing.assert_close(out[:, :, exact], dense[:, :, exact])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 32), (32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_random_level_maps_match_reference(rng, device, dtype, block_m, block_n, causal):
    q_len, k_len = 301, 333
    q = randn(rng, 2, 4, q_len, 64, dtype=dtype, device=device)
    k = randn(rng, 2, 2, k_len, 64, dtype=dtype, device=device)
    v = randn(rng, 2, 2, k_len, 64, dtype=dtype, device=device)
    levels = random_levels(rng, 2, 4, -(-q_len // block_m), -(-k_len // block_n)).to(device)
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=block_m, block_n=block_n, causal=causal,
                                         return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    kwargs = dict(block_m=block_m, block_n=block_n, causal=causal)
    ref64, lse64 = reference.attention_with_levels(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                   levels.cpu(), **kwargs)
    ref_lowp, _ = reference.attention_with_levels(q.cpu(), k.cpu(), v.cpu(), levels.cpu(), **kwargs)
    assert_attention_close(out.cpu(), ref64, ref_lowp)
    finite = lse64.isfinite()
    assert torch.equal(lse.cpu().isfinite(), finite)
    torch.testing.assert_close(lse.cpu()[finite], lse64[finite], atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=0)


def test_reference_matches_literal_spec_on_small_inputs(rng):
    q = randn(rng, 1, 2, 45, 8, dtype=torch.float64)
    k = randn(rng, 1, 1, 77, 8, dtype=torch.float64)
    v = randn(rng, 1, 1, 77, 8, dtype=torch.float64)
    for causal in (False, True):
        levels = random_levels(rng, 1, 2, 2, 3)
        expected, expected_lse = naive_attention(q, k, v, levels, 32, 32, 8 ** -0.5, causal)
        for impl in (psa.attention_with_levels, reference.attention_with_levels):
            result = impl(q, k, v, levels, block_m=32, block_n=32, causal=causal)
            out, lse = result if isinstance(result, tuple) else (result, None)
            torch.testing.assert_close(out, expected)
            if lse is not None:
                torch.testing.assert_close(lse.double(), expected_lse.float().double())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_zeros_and_minus_inf(rng, device):
    q = randn(rng, 1, 2, 100, 32, device=device)
    k = randn(rng, 1, 2, 90, 32, device=device)
    levels = random_levels(rng, 1, 2, 2, 3).to(device)
    levels[:, :, 1] = 0                       # query block 1 sees nothing
    out, lse = psa.attention_with_levels(q, k, k, levels, block_m=64, block_n=32, return_lse=True)
    assert (out[:, :, 64:] == 0).all() and (lse[:, :, 64:] == -math.inf).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_strided_inputs_equal_contiguous(rng):
    q = randn(rng, 2, 150, 4, 32).transpose(1, 2)   # [B, L, H, D] storage, as in most video DiTs
    k = randn(rng, 2, 150, 2, 32).transpose(1, 2)
    v = randn(rng, 2, 150, 2, 32).transpose(1, 2)
    levels = random_levels(rng, 2, 4, 3, 3)
    strided = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=64)
    contiguous = psa.attention_with_levels(q.contiguous(), k.contiguous(), v.contiguous(), levels, block_m=64,
                                           block_n=64)
    assert torch.equal(strided, contiguous)


def test_explicit_scale(rng):
    q, k, v = (randn(rng, 1, 1, 70, 16, dtype=torch.float64) for _ in range(3))
    levels = torch.ones(1, 1, 3, 3, dtype=torch.int8)
    out = psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
