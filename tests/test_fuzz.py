"""Property-based checks of every op against psa.reference on drawn problems (hypothesis): batch up to
3, GQA ratios 1-3, odd lengths from 1 token, Lq != Lk, every block size, both assignment modes,
causal or not, forced key and query positions, the similarity cap, every estimator.

Two profiles: the CPU backend in float64 (CI; the comparisons are tight and level maps exact), and
the CUDA backend in bf16/fp16 at head_dim 64/128 (where it is built and a GPU is present), held to the
same tolerances as the other CUDA tests.
"""

import pytest
import torch

import psa
from psa import PSAConfig, reference
from conftest import assert_attention_close, reference_attention_pair, reference_scores, requires_cuda

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

BLOCKS = (32, 64, 128)


@st.composite
def problems(draw, cuda=False):
    q_len = draw(st.integers(1, 300))
    k_len = draw(st.one_of(st.just(q_len), st.integers(1, 300)))
    bounds = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4)))
    config = PSAConfig(
        block_m=draw(st.sampled_from(BLOCKS)), block_n=draw(st.sampled_from(BLOCKS)),
        mode=draw(st.sampled_from(("topk", "threshold"))), bounds=tuple(bounds),
        estimator=draw(st.sampled_from(("sampled", "antidiagonal", "pooled"))),
        min_full=draw(st.sampled_from((0.0, 0.06, 0.3))), causal=draw(st.booleans()), sink=draw(st.booleans()),
        sim_thresholds=draw(st.sampled_from((None, (0.7, 0.65, 0.6), (0.0, -0.5, -1.0)))))
    return dict(
        batch=draw(st.integers(1, 3)), kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 3)),
        q_len=q_len, k_len=k_len, head_dim=draw(st.sampled_from((64, 128) if cuda else (8, 16, 32))),
        config=config,
        force_keys=draw(st.lists(st.integers(0, k_len - 1), max_size=4, unique=True)),
        force_queries=draw(st.lists(st.integers(0, q_len - 1), max_size=2, unique=True)),
        seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(p, dtype, device):
    generator = torch.Generator().manual_seed(p["seed"])
    q_heads = p["kv_heads"] * p["group"]

    def draw(heads, length):
        return torch.randn(p["batch"], heads, length, p["head_dim"], generator=generator, dtype=torch.float64)

    q, k, v = draw(q_heads, p["q_len"]), draw(p["kv_heads"], p["k_len"]), draw(p["kv_heads"], p["k_len"])
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def reference_levels(scores, p, k):
    c = p["config"]
    return reference.assign_levels(
        scores, mode=c.mode, bounds=c.bounds, block_m=c.block_m, block_n=c.block_n, q_len=p["q_len"],
        k_len=p["k_len"], min_full=c.min_full, causal=c.causal, sink=c.sink, k=k, sim_thresholds=c.sim_thresholds,
        force_keys=positions_mask(p["force_keys"], p["k_len"]),
        force_queries=positions_mask(p["force_queries"], p["q_len"]))


def positions_mask(positions, length):
    mask = torch.zeros(length, dtype=torch.bool)
    mask[list(positions)] = True
    return mask


def stage_arguments(p):
    return dict(q_len=p["q_len"], force_keys=p["force_keys"], force_queries=p["force_queries"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpu_backend_matches_the_reference(p):
    c = p["config"]
    q, k, v = make_inputs(p, torch.float64, "cpu")
    # Estimate: the same function in float64, computed another way.
    scores = psa.estimate_importance(q, k, c)
    expected_scores = reference.estimate_importance(q, k, method=c.estimator, block_m=c.block_m, block_n=c.block_n,
                                                    causal=c.causal, stride=c.stride)
    torch.testing.assert_close(scores, expected_scores.float(), rtol=1e-5, atol=1e-7)
    # Assign: exactly the reference's map on the same scores.
    levels = psa.assign_levels(expected_scores, c, k=k, **stage_arguments(p))
    assert torch.equal(levels, reference_levels(expected_scores, p, k))
    # Attend: the reference's output and lse on that map.
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=c.block_m, block_n=c.block_n, causal=c.causal,
                                         return_lse=True)
    expected_out, expected_lse = reference.attention_with_levels(q, k, v, levels, block_m=c.block_m,
                                                                 block_n=c.block_n, causal=c.causal)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse.float())
    # The pipeline op is its stages composed.
    whole, whole_levels = psa.sparse_attention(q, k, v, c, force_keys=p["force_keys"],
                                               force_queries=p["force_queries"], return_levels=True)
    assert torch.equal(whole_levels, psa.assign_levels(scores, c, k=k, **stage_arguments(p)))
    torch.testing.assert_close(whole, psa.attention_with_levels(q, k, v, whole_levels, block_m=c.block_m,
                                                                block_n=c.block_n, causal=c.causal))


@pytest.mark.cuda
@requires_cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(cuda=True), st.sampled_from((torch.bfloat16, torch.float16)))
def test_cuda_backend_matches_the_reference(p, dtype):
    c = p["config"]
    q, k, v = make_inputs(p, dtype, "cuda")
    scores = psa.estimate_importance(q, k, c)
    expected_scores = reference_scores(q, k, method=c.estimator, block_m=c.block_m, block_n=c.block_n,
                                       causal=c.causal, stride=c.stride)
    # The kernels multiply bf16/fp16 values exactly and sum in fp32 (test_cuda_estimate_assign's rule).
    torch.testing.assert_close(scores.cpu().double(), expected_scores.double(), atol=2e-5, rtol=1e-3)
    levels = psa.assign_levels(expected_scores.float().cuda(), c, k=k, **stage_arguments(p))
    assert torch.equal(levels.cpu(), psa.assign_levels(expected_scores.float(), c, k=k.cpu(), **stage_arguments(p)))
    out = psa.attention_with_levels(q, k, v, levels, block_m=c.block_m, block_n=c.block_n, causal=c.causal)
    ref64, _, ref_lowp = reference_attention_pair(q, k, v, levels, block_m=c.block_m, block_n=c.block_n,
                                                  causal=c.causal)
    assert_attention_close(out.cpu(), ref64, ref_lowp)
