import json

import pytest
import torch
import torch.nn.functional as F

import psa
from psa import PSAAttention, PSAConfig, reference
from conftest import DEVICES, assert_attention_close, randn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["sampled", "antidiagonal", "pooled"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_matches_reference(rng, device, estimator, causal, dtype):
    q = randn(rng, 1, 4, 555, 64, dtype=dtype, device=device)
    k = randn(rng, 1, 2, 555, 64, dtype=dtype, device=device)
    v = randn(rng, 1, 2, 555, 64, dtype=dtype, device=device)
    config = PSAConfig(block_m=64, block_n=32, estimator=estimator, causal=causal, mode="threshold",
                       bounds=(0.5, 0.7, 0.8, 0.9), sim_thresholds=(0.0, -0.1, -0.2))
    out, lse, levels = psa.sparse_attention(q, k, v, config, return_lse=True, return_levels=True)
    # Levels come from the op; the attention they drive is checked against the reference in float64.
    assert torch.equal(levels, psa.estimate_levels(q, k, config))
    kwargs = dict(block_m=64, block_n=32, causal=causal)
    ref64, _ = reference.attention_with_levels(q.double().cpu(), k.double().cpu(), v.double().cpu(), levels.cpu(),
                                               **kwargs)
    ref_lowp, _ = reference.attention_with_levels(q.cpu(), k.cpu(), v.cpu(), levels.cpu(), **kwargs)
    assert_attention_close(out.cpu(), ref64, ref_lowp)


def test_pipeline_levels_match_reference_in_float64(rng):
    q = randn(rng, 2, 2, 400, 32, dtype=torch.float64)
    k = randn(rng, 2, 2, 400, 32, dtype=torch.float64)
    v = randn(rng, 2, 2, 400, 32, dtype=torch.float64)
    config = PSAConfig(block_m=32, block_n=32)
    out, lse, levels = psa.sparse_attention(q, k, v, config, return_lse=True, return_levels=True)
    ref_out, ref_lse, ref_levels = reference.sparse_attention(q, k, v, config)
    assert torch.equal(levels, ref_levels)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_pipeline_with_fp8_antidiagonal_scores_matches_reference(rng, device, causal):
    # estimate_precision reaches the estimator through the composite op: its levels are the reference's
    # with FP8 scoring (float64 inputs: both quantize the same values), and differ from full precision's.
    q, k, v = (randn(rng, 1, 2, 700, 32, dtype=torch.float64, device=device) for _ in range(3))
    config = PSAConfig(block_m=32, block_n=32, estimator="antidiagonal", causal=causal, estimate_precision="fp8")
    out, lse, levels = psa.sparse_attention(q, k, v, config, return_lse=True, return_levels=True)
    ref_out, ref_lse, ref_levels = reference.sparse_attention(q.cpu(), k.cpu(), v.cpu(), config)
    assert torch.equal(levels.cpu(), ref_levels)
    torch.testing.assert_close(out.cpu(), ref_out)
    assert torch.equal(levels, psa.estimate_levels(q, k, config))
    assert not torch.equal(levels, psa.estimate_levels(q, k, PSAConfig(block_m=32, block_n=32, causal=causal,
                                                                       estimator="antidiagonal")))


def test_keeping_every_block_equals_sdpa(rng):
    q, k, v = (randn(rng, 1, 2, 300, 32, dtype=torch.float64) for _ in range(3))
    config = PSAConfig(bounds=(1.0, 1.0, 1.0, 1.0), block_m=64, block_n=64)
    torch.testing.assert_close(psa.sparse_attention(q, k, v, config), F.scaled_dot_product_attention(q, k, v))
    causal = PSAConfig(bounds=(1.0, 1.0, 1.0, 1.0), causal=True, block_m=64, block_n=64)
    torch.testing.assert_close(psa.sparse_attention(q, k, v, causal),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_default_config_density(rng):
    q, k, v = (randn(rng, 1, 2, 4096, 64) for _ in range(3))
    levels = psa.sparse_attention(q, k, v, return_levels=True)[1]
    stats = psa.level_stats(levels)
    # 32 key blocks: 3 at level 1, 2 at level 2, 6 at level 8 -> (3 + 1 + 0.75) / 32.
    assert stats["density"] == pytest.approx(4.75 / 32)
    assert stats["coverage"] == pytest.approx(11 / 32)
    assert PSAConfig().nominal_density == pytest.approx(0.15)


def test_level_stats_hand_example():
    levels = torch.tensor([[1, 2, 0], [4, 8, 1], [0, 0, 2]], dtype=torch.int8).view(1, 1, 3, 3)
    stats = psa.level_stats(levels)
    assert stats["density"] == pytest.approx((1 + 0.5 + 0.25 + 0.125 + 1 + 0.5) / 9)
    assert stats["coverage"] == pytest.approx(6 / 9)
    assert stats["histogram"] == pytest.approx({0: 3 / 9, 1: 2 / 9, 2: 2 / 9, 4: 1 / 9, 8: 1 / 9})
    causal = psa.level_stats(levels, causal=True)   # pairs on or below the diagonal: 6
    assert causal["density"] == pytest.approx((1 + 0.25 + 0.125 + 0 + 0 + 0.5) / 6)


def test_module_and_forced_positions(rng):
    q, k, v = (randn(rng, 1, 2, 300, 32) for _ in range(3))
    module = PSAAttention(PSAConfig(block_m=32, block_n=32))
    out = module(q, k, v, force_keys=range(290, 300))
    levels = psa.estimate_levels(q, k, module.config, force_keys=range(290, 300))
    assert (levels[..., -1] == 1).all()
    torch.testing.assert_close(out, psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32))


def test_config_round_trips_through_json():
    config = PSAConfig(mode="threshold", bounds=(0.5, 0.6, 0.7, 0.8), sim_thresholds=(0.7, 0.65, 0.6))
    assert PSAConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["bounds"] == [0.5, 0.6, 0.7, 0.8]


@pytest.mark.parametrize("field,value", [
    ("block_m", 48), ("block_n", 256), ("block_m", True), ("mode", "quantile"), ("estimator", "random"),
    ("bounds", (0.1, 0.2, 0.3)), ("bounds", (0.3, 0.2, 0.4, 0.5)), ("bounds", (0.1, 0.2, 0.3, 1.5)),
    ("bounds", "abcd"), ("min_full", -0.1), ("min_full", float("nan")), ("sim_thresholds", (0.7, 0.6)),
    ("sim_thresholds", (0.7, 0.6, 2.0)), ("causal", 1), ("sink", None), ("stride", 3), ("stride", 0),
    ("estimate_precision", "fp16"), ("estimate_precision", "fp8"),
])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        PSAConfig(**{field: value})


def test_module_with_a_grid_attends_in_token_order(rng):
    from psa import layout
    grid = (3, 6, 8)
    q, k, v = (randn(rng, 1, 2, 5 + 144, 32) for _ in range(3))
    config = PSAConfig(block_m=32, block_n=32)
    module = PSAAttention(config, order="gilbert")
    out = module(q, k, v, grid=grid, text_before=5, force_keys=[140])
    order = layout.get_layout(grid, "gilbert", text_before=5)
    forced = torch.zeros(149, dtype=torch.bool)
    forced[:5] = True
    keys = forced.clone()
    keys[140] = True
    expected = psa.sparse_attention(*(order.permute(x) for x in (q, k, v)), config,
                                    force_keys=order.permute(keys, dim=-1), force_queries=order.permute(forced, dim=-1))
    torch.testing.assert_close(out, order.unpermute(expected))
    # Every block at level 1: any order is dense attention.
    dense = PSAAttention(PSAConfig(bounds=(1, 1, 1, 1), block_m=32, block_n=32), order="tiled")
    torch.testing.assert_close(dense(q.double(), k.double(), v.double(), grid=grid, text_before=5),
                               F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    with pytest.raises(ValueError, match="grid"):
        module(q, k, v, grid=(3, 6, 9))
    with pytest.raises(ValueError, match="order"):
        PSAAttention(order="hilbert")
