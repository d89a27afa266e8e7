import dataclasses
import math

import pytest
import torch

import psa
from psa import PSAConfig, reference
from conftest import BACKENDS, DEVICES, randn

METHODS = ["sampled", "antidiagonal", "pooled"]


def naive_sampled(q, k, block_m, block_n, scale, causal):
    """Spec section 4 'sampled', one query block at a time, in float64."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    n_q, n_k = -(-q_len // block_m), -(-k_len // block_n)
    q_off = reference.default_sample_offsets(block_m)
    k_off = reference.default_sample_offsets(block_n)
    scores = torch.zeros(n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        last_query = min((i + 1) * block_m, q_len) - 1
        blocks = [j for j in range(n_k) if not causal or j * block_n <= last_query + k_len - q_len]
        if not blocks:
            continue
        rows = [min(i * block_m + int(o), q_len - 1) for o in q_off]
        for r in rows:
            block_max = {j: max(scale * float(q[r] @ k[min(j * block_n + int(o), k_len - 1)]) for o in k_off)
                         for j in blocks}
            row_max = max(block_max.values())
            for j in blocks:
                scores[i, j] = max(scores[i, j], math.exp(block_max[j] - row_max))
        scores[i] /= scores[i].sum()
    return scores


def naive_pooled(q, k, block_m, block_n, scale):
    q_means = torch.stack([q[i:i + block_m].mean(0) for i in range(0, q.shape[0], block_m)])
    k_means = torch.stack([k[j:j + block_n].mean(0) for j in range(0, k.shape[0], block_n)])
    return torch.softmax(scale * q_means @ k_means.T, -1)


def naive_pooled_rounded(q, k, block_m, block_n, scale):
    """Spec section 4 'pooled' for 16-bit k, one block at a time: each key block's mean over its level-8
    keys (the mean of up to 8 keys in float32, rounded to k's dtype), weighted by the keys each covers."""
    q_means = torch.stack([q[i:i + block_m].double().mean(0) for i in range(0, q.shape[0], block_m)])
    k_means = []
    for j in range(0, k.shape[0], block_n):
        groups = [k[t:min(t + 8, j + block_n)] for t in range(j, min(j + block_n, k.shape[0]), 8)]
        pooled = [(g.float().sum(0) / g.shape[0]).to(k.dtype).double() * g.shape[0] for g in groups]
        k_means.append(sum(pooled) / sum(g.shape[0] for g in groups))
    return torch.softmax(scale * q_means @ torch.stack(k_means).T, -1)


def naive_antidiagonal(q, k, block_m, block_n, scale, stride):
    """Non-causal antidiagonal scores from the full Q K^T, summing each tile's antidiagonal."""
    q_len, k_len = q.shape[0], k.shape[0]
    q_tiles, k_tiles = -(-q_len // stride), -(-k_len // stride)
    full = torch.zeros(q_tiles * stride, k_tiles * stride, dtype=torch.float64)
    full[:q_len, :k_len] = q @ k.T
    anti = torch.zeros(q_tiles, k_tiles, dtype=torch.float64)
    for t in range(stride):  # tile entry (S-1-t, t) lies on the antidiagonal
        anti += full[stride - 1 - t::stride, t::stride]
    probs = torch.softmax(anti * scale / stride, -1)
    n_q, n_k = -(-q_len // block_m), -(-k_len // block_n)
    scores = torch.zeros(n_q, n_k, dtype=torch.float64)
    for i in range(q_tiles):
        for j in range(k_tiles):
            scores[i * stride // block_m, j * stride // block_n] += probs[i, j]
    return scores / scores.sum(-1, keepdim=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_estimators_match_reference(rng, device, method, causal, dtype):
    q = randn(rng, 2, 4, 333, 32, dtype=dtype, device=device)
    k = randn(rng, 2, 2, 301, 32, dtype=dtype, device=device)
    config = PSAConfig(block_m=64, block_n=32, estimator=method, causal=causal)
    scores = psa.estimate_importance(q, k, config)
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), method=method, block_m=64,
                                             block_n=32, causal=causal)
    assert scores.shape == (2, 4, 6, 10) and scores.dtype == torch.float32
    tolerance = 1e-5 if dtype != torch.bfloat16 else 5e-2
    torch.testing.assert_close(scores.cpu().double(), expected.double(), atol=tolerance, rtol=tolerance)
    candidates = reference.candidate_blocks(333, 301, 64, 32, causal)
    assert (scores.cpu()[..., ~candidates] == 0).all()
    row_sums = scores.sum(-1).cpu()
    assert torch.allclose(row_sums[..., candidates.any(-1)], torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_matches_literal_spec(rng, causal):
    q = randn(rng, 1, 1, 150, 16, dtype=torch.float64)
    k = randn(rng, 1, 1, 170, 16, dtype=torch.float64)
    scores = psa.estimate_importance(q, k, PSAConfig(block_m=64, block_n=32, estimator="sampled", causal=causal))
    expected = naive_sampled(q[0, 0], k[0, 0], 64, 32, 0.25, causal)
    torch.testing.assert_close(scores[0, 0].double(), expected, atol=1e-6, rtol=1e-6)


def test_pooled_and_antidiagonal_match_literal_spec(rng):
    q = randn(rng, 1, 1, 150, 16, dtype=torch.float64)
    k = randn(rng, 1, 1, 170, 16, dtype=torch.float64)
    pooled = psa.estimate_importance(q, k, PSAConfig(block_m=64, block_n=32, estimator="pooled"))
    torch.testing.assert_close(pooled[0, 0].double(), naive_pooled(q[0, 0], k[0, 0], 64, 32, 0.25))
    anti = psa.estimate_importance(q, k, PSAConfig(block_m=64, block_n=32, estimator="antidiagonal", stride=4))
    torch.testing.assert_close(anti[0, 0].double(), naive_antidiagonal(q[0, 0], k[0, 0], 64, 32, 0.25, 4),
                               atol=1e-6, rtol=1e-6)


def round_to_e4m3(x):
    """float8 e4m3 rounding written out (float64 in and out): 3 mantissa bits, ties to even, exponents down
    to -6 with subnormals below (steps of 2^-9); |x| <= 448 here."""
    out = torch.zeros_like(x)
    nonzero = x != 0
    exponent = torch.floor(torch.log2(x[nonzero].abs())).clamp(min=-6)
    step = torch.exp2(exponent - 3)
    out[nonzero] = torch.round(x[nonzero] / step) * step  # torch.round: half to even
    return out


def naive_fp8_groups(x, stride):
    """docs/spec.md section 4, FP8 scoring, one group of `stride` tokens at a time: the dequantized values
    (float64), i.e. e4m3(fp32(x) * r) * s with s = fp32(max |x| / 448) and r = fp32(448 / max |x|)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for first in range(0, x.shape[0], stride):
        group = x[first:first + stride].float()
        peak = group.abs().max()
        one = torch.ones((), dtype=torch.float32)
        scale, multiplier = (one, one) if peak == 0 else (peak / 448.0, 448.0 * one / peak)  # (not a reciprocal)
        multiplier = multiplier.clamp(max=torch.finfo(torch.float32).max)  # 448 / peak overflows
        out[first:first + stride] = round_to_e4m3((group * multiplier).double()) * scale.double()
    return out


@pytest.mark.parametrize("stride", [4, 8])
def test_fp8_antidiagonal_matches_literal_spec(rng, stride):
    # 150 and 170 tokens end in partial groups; k's entries span 2^-12 .. 2^4 so some groups reach
    # e4m3's subnormals.
    q = randn(rng, 1, 1, 150, 16, dtype=torch.float64)
    k = randn(rng, 1, 1, 170, 16, dtype=torch.float64) * torch.exp2(torch.linspace(-12, 4, 170))[:, None]
    # A group whose 448 / max overflows float32, zeros in it (an infinite multiplier would make them NaN).
    k[..., 16:24, :] *= 1e-38
    k[..., 16:24, :4] = 0
    config = PSAConfig(block_m=64, block_n=32, estimator="antidiagonal", stride=stride, estimate_precision="fp8")
    anti = psa.estimate_importance(q, k, config)
    expected = naive_antidiagonal(naive_fp8_groups(q[0, 0], stride), naive_fp8_groups(k[0, 0], stride), 64, 32,
                                  0.25, stride)
    assert torch.isfinite(anti).all()
    torch.testing.assert_close(anti[0, 0].double(), expected, atol=1e-6, rtol=1e-6)
    full = psa.estimate_importance(q, k, dataclasses.replace(config, estimate_precision="full"))
    assert not torch.allclose(anti, full, atol=1e-6, rtol=1e-6)  # the quantization shows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fp8_antidiagonal_matches_reference(rng, device, causal, dtype):
    # Both sides quantize to the same e4m3 values, so only the sums' rounding separates them, whatever the
    # input dtype. GQA, odd lengths, Lq != Lk.
    q = randn(rng, 2, 4, 333, 32, dtype=dtype, device=device)
    k = randn(rng, 2, 2, 301, 32, dtype=dtype, device=device)
    config = PSAConfig(block_m=64, block_n=32, estimator="antidiagonal", causal=causal, estimate_precision="fp8")
    scores = psa.estimate_importance(q, k, config)
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), method="antidiagonal", block_m=64,
                                             block_n=32, causal=causal, precision="fp8")
    assert scores.shape == (2, 4, 6, 10) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.cpu().double(), expected.double(), atol=1e-5, rtol=1e-5)
    # An approximation of the full-precision scores: close, on inputs whose scores are not flat.
    sharp_q, sharp_k = 3 * q, 3 * k
    fp8 = psa.estimate_importance(sharp_q, sharp_k, config)
    full = psa.estimate_importance(sharp_q, sharp_k, dataclasses.replace(config, estimate_precision="full"))
    assert ((fp8 - full).abs().sum() / full.abs().sum()).item() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pooled_key_means_are_taken_over_the_level8_keys(rng, dtype):
    # 16-bit keys: the level-8 rounding shows in the scores (8e-5 here, 80 times the tolerance, which is
    # float32's); 301 keys end in a partial group of 5 and a partial block.
    q = randn(rng, 1, 1, 150, 16, dtype=dtype)
    k = (4 * randn(rng, 1, 1, 301, 16)).to(dtype)
    pooled = psa.estimate_importance(q, k, PSAConfig(block_m=64, block_n=32, estimator="pooled"))
    expected = naive_pooled_rounded(q[0, 0], k[0, 0], 64, 32, 0.25)
    torch.testing.assert_close(pooled[0, 0].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_pooled_reads_the_pyramids_k8_to_the_same_scores(rng, device, dtype, causal):
    # sparse_attention hands the pooled estimator the pyramid's k8: the scores are those of pooling k,
    # bit for bit (the same level-8 values, added in the same order). [B, L, H, D] views, GQA.
    # (test_cuda_estimate_assign.py holds the CUDA kernels to the same.)
    q = randn(rng, 2, 333, 4, 64, dtype=dtype, device=device).transpose(1, 2)
    k = randn(rng, 2, 301, 2, 64, dtype=dtype, device=device).transpose(1, 2)
    config = PSAConfig(block_m=64, block_n=32, estimator="pooled", causal=causal)
    k8 = psa.kv_pyramid(k, k)[8][0]
    assert torch.equal(psa.estimate_importance(q, k, config, k8=k8), psa.estimate_importance(q, k, config))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_inputs_reach_the_scores(rng, method, causal):
    """NaN in a query block makes that row of scores NaN, NaN or +inf in a visible key block makes every
    row that sees it NaN (the assignment then runs those rows dense); the other rows keep finite scores."""
    q = randn(rng, 2, 2, 333, 32, dtype=torch.float64)
    k = randn(rng, 2, 2, 301, 32, dtype=torch.float64)
    q[0, 1, 128:256] = float("nan")
    k[1, 0, :64] = float("nan")
    k[1, 1, 6] = float("inf")  # a sampled row of key block 0 (offsets 2, 6, 10, ...)
    config = PSAConfig(block_m=128, block_n=64, estimator=method, causal=causal)
    scores = psa.estimate_importance(q, k, config)
    expected = reference.estimate_importance(q, k, method=method, block_m=128, block_n=64, causal=causal)
    assert expected[0, 1, 1].isnan().all() and expected[1].isnan().all()
    assert not expected[0, 0].isnan().any() and not expected[0, 1, 0].isnan().any()
    assert torch.equal(scores.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(scores[finite], expected[finite], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,dtype", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_inputs_give_nan_where_sdpa_does(rng, device, dtype, method):
    q, k, v = (randn(rng, 1, 2, 300, 64, dtype=dtype, device=device) for _ in range(3))
    q[0, 0, 70] = float("nan")
    k[0, 1, 202] = float("inf")  # a row the sampled estimator reads
    out = psa.sparse_attention(q, k, v, PSAConfig(block_m=64, block_n=64, estimator=method))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), expected.isnan())


@pytest.mark.parametrize("method", METHODS)
def test_estimators_take_a_negative_scale(rng, method):
    q = randn(rng, 1, 2, 300, 32, dtype=torch.float64)
    k = randn(rng, 1, 2, 270, 32, dtype=torch.float64)
    config = PSAConfig(block_m=64, block_n=64, estimator=method)
    expected = reference.estimate_importance(q, k, method=method, block_m=64, block_n=64, scale=-0.3)
    torch.testing.assert_close(psa.estimate_importance(q, k, config, scale=-0.3).double(), expected.double(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_estimators_are_deterministic(rng, method):
    q = randn(rng, 1, 2, 500, 32)
    k = randn(rng, 1, 2, 500, 32)
    config = PSAConfig(estimator=method)
    assert torch.equal(psa.estimate_importance(q, k, config), psa.estimate_importance(q, k, config))


def test_sampled_offsets_from_an_explicit_generator(rng):
    q = randn(rng, 1, 2, 600, 32, dtype=torch.float64)
    k = randn(rng, 1, 2, 600, 32, dtype=torch.float64)
    config = PSAConfig(estimator="sampled")
    first = psa.estimate_importance(q, k, config, generator=torch.Generator().manual_seed(7))
    again = psa.estimate_importance(q, k, config, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(7)   # query offsets are drawn first, then key offsets
    q_offsets, k_offsets = (torch.sort(torch.randperm(128, generator=generator)[:32]).values for _ in range(2))
    expected = reference.estimate_sampled(q, k, block_m=128, block_n=128, q_offsets=q_offsets, k_offsets=k_offsets)
    torch.testing.assert_close(first.double(), expected.double(), atol=1e-6, rtol=1e-6)
