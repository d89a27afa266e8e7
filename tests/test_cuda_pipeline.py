"""The whole CUDA pipeline: no host synchronisation, opcheck, torch.compile (CUDA graphs included),
the pieces agreeing with each other, and the CUDA-specific input errors."""

import pytest
import torch

import psa
from psa import PSAConfig, reference
from conftest import assert_attention_close, randn, reference_attention_pair, requires_cuda
from test_opcheck import TESTS, samples

pytestmark = [pytest.mark.cuda, requires_cuda, pytest.mark.usefixtures("fresh_dynamo")]


@pytest.mark.parametrize("estimator", ["sampled", "antidiagonal", "pooled"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sim", [None, (0.0, -0.1, -0.2)])
def test_pipeline_runs_without_host_sync_and_matches_its_stages(rng, estimator, causal, sim):
    q = randn(rng, 1, 4, 1000, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 1100, 128, dtype=torch.bfloat16, device="cuda")
    v = randn(rng, 1, 2, 1100, 128, dtype=torch.bfloat16, device="cuda")
    keys = torch.zeros(1100, dtype=torch.bool, device="cuda")
    keys[-50:] = True  # text tokens at the end
    config = PSAConfig(estimator=estimator, causal=causal, mode="threshold", bounds=(0.5, 0.7, 0.8, 0.9),
                       sim_thresholds=sim)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse, levels = psa.sparse_attention(q, k, v, config, force_keys=keys, return_lse=True,
                                                return_levels=True)
        scores = psa.estimate_importance(q, k, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The level map is what the CPU backend assigns from the same scores...
    expected_levels = psa.assign_levels(scores.cpu(), config, k=k.cpu(), q_len=1000, force_keys=keys.cpu())
    assert torch.equal(levels.cpu(), expected_levels)
    # ...and the output is the reference attention over that map.
    kwargs = dict(block_m=128, block_n=128, causal=causal)
    ref64, lse64, ref_lowp = reference_attention_pair(q, k, v, levels, **kwargs)
    assert_attention_close(out.cpu(), ref64, ref_lowp)
    stats = psa.level_stats(levels, causal=causal)
    assert 0 < stats["density"] < 1


def test_pipeline_equals_reference_pipeline_on_distinct_scores(rng):
    # Full reference pipeline (estimate, assign, attend) on the CPU in float64 from the same inputs:
    # at this size the estimated scores are far enough apart that both backends pick the same map.
    q = randn(rng, 1, 2, 512, 64, dtype=torch.float16, device="cuda")
    k = randn(rng, 1, 2, 512, 64, dtype=torch.float16, device="cuda") * 2
    v = randn(rng, 1, 2, 512, 64, dtype=torch.float16, device="cuda")
    config = PSAConfig(block_m=64, block_n=64, estimator="pooled", mode="topk", bounds=(0.25, 0.5, 0.75, 0.9))
    out, levels = psa.sparse_attention(q, k, v, config, return_levels=True)
    _, _, ref_levels = reference.sparse_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), config)
    assert torch.equal(levels.cpu(), ref_levels)


@pytest.mark.parametrize("name", sorted(samples("cpu")))
def test_opcheck_on_cuda(name):
    op = getattr(torch.ops.psa, name).default
    for args, kwargs in samples("cuda", dtype=torch.bfloat16)[name]:
        torch.library.opcheck(op, args, kwargs, test_utils=TESTS)


def test_compile_fullgraph_and_cuda_graphs_equal_eager(rng):
    config = PSAConfig(block_m=64, block_n=64, causal=True)

    def attention(q, k, v, keys):
        return psa.sparse_attention(q, k, v, config, force_keys=keys) * 2

    q, k, v = (randn(rng, 1, 4, 700, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    keys = torch.zeros(700, dtype=torch.bool, device="cuda")
    keys[:10] = True
    eager = attention(q, k, v, keys)
    fullgraph = torch.compile(attention, fullgraph=True)
    assert torch.equal(fullgraph(q, k, v, keys), eager)
    graphed = torch.compile(attention, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        result = graphed(q, k, v, keys).clone()
    assert torch.equal(result, eager)
    q.copy_(randn(rng, 1, 4, 700, 64, dtype=torch.bfloat16, device="cuda"))  # replay on new values
    assert torch.equal(graphed(q, k, v, keys), attention(q, k, v, keys))


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.float32), "bfloat16 or float16 on CUDA"),
    (dict(head_dim=96), "head_dim must be 64 or 128 on CUDA"),
])
def test_cuda_input_errors_name_the_problem(bad, match):
    dtype, head_dim = bad.get("dtype", torch.bfloat16), bad.get("head_dim", 64)
    q = torch.randn(1, 2, 100, head_dim, device="cuda").to(dtype)
    levels = torch.ones(1, 2, 1, 1, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        psa.attention_with_levels(q, q, q, levels, block_m=128, block_n=128)
    with pytest.raises(RuntimeError, match=match):
        psa.sparse_attention(q, q, q)


def test_empty_batch_gives_empty_outputs_like_sdpa():
    q = torch.randn(0, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(0, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    out, lse, levels = psa.sparse_attention(q, k, v, return_lse=True, return_levels=True)
    assert out.shape == q.shape and lse.shape == (0, 4, 300) and levels.shape == (0, 4, 3, 3)
    pyramid = psa.kv_pyramid(k, v)
    assert pyramid[8][0].shape == (0, 2, 38, 64)
