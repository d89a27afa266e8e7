"""psa.tools: capture, evaluate, calibrate (CPU reference backend)."""

import pytest
import torch
import torch.nn.functional as F

import psa
from psa import tools
from conftest import randn


class TwoLayerAttention(torch.nn.Module):
    """Two self-attention calls and one cross-attention call per forward, through F.sdpa."""

    def forward(self, x, context):
        for _ in range(2):
            x = x + F.scaled_dot_product_attention(x, x, x)
        return x + F.scaled_dot_product_attention(x, context, context)


def smooth_video(rng, grid, heads=2, dim=32):
    """[1, H, T*H*W, D] tokens of a smooth random field on `grid` plus a little noise, in raster order."""
    t, h, w = grid
    coarse = torch.randn(1, heads * dim, max(1, t // 2), max(1, h // 4), max(1, w // 4), generator=rng)
    field = F.interpolate(coarse, size=grid, mode="trilinear", align_corners=False)
    tokens = field.view(1, heads, dim, t * h * w).transpose(-1, -2)
    return (tokens + 0.1 * torch.randn(tokens.shape, generator=rng)).double().contiguous()


def test_capture_filters_caps_and_cleans_up(rng, tmp_path):
    module = TwoLayerAttention()
    x, context = randn(rng, 1, 2, 96, 16), randn(rng, 1, 2, 10, 16)
    one_call = 3 * x.numel() * x.element_size()
    with tools.capture(module, layers=[1], grid=(2, 6, 8)) as captures:
        F.scaled_dot_product_attention(x, x, x)     # outside the module's forward: not recorded
        for _ in range(3):
            module(x, context)
    assert [(c.layer, c.step) for c in captures] == [(1, 0), (1, 1), (1, 2)]
    assert captures[0].grid == (2, 6, 8) and captures[0].q.shape == (1, 2, 96, 16)
    assert not module._forward_pre_hooks and not module._forward_hooks
    assert torch._C._len_torch_function_stack() == 0
    with pytest.warns(UserWarning, match="max_bytes=.* reached"), \
            tools.capture(module, steps=[1], max_bytes=one_call) as capped:
        for _ in range(2):
            module(x, context)
    assert [(c.layer, c.step) for c in capped] == [(0, 1)] and capped.skipped == 1
    path = str(tmp_path / "captures.safetensors")
    tools.save(captures, path)
    loaded = tools.load(path)
    assert [(c.layer, c.step, tuple(c.grid)) for c in loaded] == [(1, s, (2, 6, 8)) for s in range(3)]
    assert all(torch.equal(a.k, b.k) for a, b in zip(captures, loaded))


def test_capture_reads_the_grid_of_a_diffusers_transformer(rng):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
    with torch.no_grad(), tools.capture(model) as captures:
        model(torch.randn(1, 4, 5, 24, 20, generator=rng), torch.tensor([500]),
              torch.randn(1, 7, 16, generator=rng), return_dict=False)
    # Two blocks of self-attention; cross-attention to the 7 text tokens is not a layer.
    assert [(c.layer, tuple(c.grid)) for c in captures] == [(0, (5, 12, 10)), (1, (5, 12, 10))]
    assert captures[0].q.shape == (1, 2, 600, 32)


def test_capture_counts_denoising_steps_and_numbers_blocks_as_apply_does(rng):
    """Two-pass classifier-free guidance (two forwards per timestep) is one step, and HunyuanVideo's
    text-refiner attention is not a layer: the blocks are numbered as apply() numbers them."""
    pytest.importorskip("diffusers")
    from test_diffusers import hunyuan_model, wan_model
    wan = wan_model(rng)
    model = wan.build()
    with tools.capture(model, steps=[1, 2]) as captures:
        for timestep in (900, 800, 700):
            for _ in range(2):                       # conditional and unconditional pass
                wan.run(model, timestep)
    assert [(c.step, c.layer) for c in captures] == [(s, l) for s in (1, 2) for _ in range(2) for l in range(3)]
    hunyuan = hunyuan_model(rng)
    model = hunyuan.build()
    with tools.capture(model) as captures:
        hunyuan.run(model)
    # 2 double-stream + 1 single-stream block; the refiner's self-attention over the text is left out.
    assert [c.layer for c in captures] == [0, 1, 2]
    assert all(c.q.shape[-2] == 3 * 8 * 8 + 8 and c.text_after == 8 for c in captures)


def test_evaluate_all_level_one_has_no_error(rng):
    grid = (4, 8, 8)
    q, k, v = (smooth_video(rng, grid) for _ in range(3))
    captures = [tools.Capture(q, k, v, layer=0, step=0, grid=grid)]
    rows = tools.evaluate(captures, psa.PSAConfig(bounds=(1, 1, 1, 1), block_m=32, block_n=32),
                          without_reorder=True)
    assert [row["variant"] for row in rows] == ["psa", "binary", "psa raster"]
    for row in rows:
        assert row["density"] == 1.0 and row["rel_l2_worst"] < 1e-10 and row["cosine_worst"] > 1 - 1e-10
    assert "| config | variant |" in tools.format_table(rows)


def test_evaluate_identical_key_groups_make_level_eight_exact(rng):
    q = randn(rng, 1, 2, 256, 16, dtype=torch.float64)
    k = randn(rng, 1, 2, 32, 16, dtype=torch.float64).repeat_interleave(8, 2)
    v = randn(rng, 1, 2, 32, 16, dtype=torch.float64).repeat_interleave(8, 2)
    config = psa.PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 1.0), min_full=0.0, block_m=32, block_n=32)
    psa_row, binary_row = tools.evaluate([tools.Capture(q, k, v, layer=0, step=0)], config)
    # Per row of 8 key blocks: the one-block floor at level 1, seven at level 8, and no error.
    assert psa_row["density"] == pytest.approx((1 + 7 / 8) / 8) and psa_row["rel_l2_worst"] < 1e-10
    # Binary block-sparse at the same compute keeps round(1.875) = 2 blocks of 8 and loses much of it.
    assert binary_row["density"] == pytest.approx(2 / 8) and binary_row["rel_l2_mean"] > 0.3


def test_calibrate_hits_a_target_density(rng):
    grid = (4, 16, 16)
    captures = [tools.Capture(*(smooth_video(rng, grid) for _ in range(3)), layer=layer, step=0, grid=grid)
                for layer in range(2)]
    base = psa.PSAConfig(block_m=64, block_n=64)
    for mode in ("topk", "threshold"):
        config = tools.calibrate(captures, target_density=0.25, mode=mode, base=base, tolerance=0.02)
        assert isinstance(config, psa.PSAConfig) and config.mode == mode and config.block_n == 64
        (row,) = tools.evaluate(captures, config, baseline=False)
        assert abs(row["density"] - 0.25) <= 0.02
    per_layer = tools.calibrate(captures, target_density=0.25, base=base, tolerance=0.02, per_layer=True)
    assert sorted(per_layer) == [0, 1]


def test_calibrate_computes_each_dense_reference_once(rng, monkeypatch):
    import sys
    evaluate_module = sys.modules["psa.tools.evaluate"]   # the module (psa.tools.evaluate is the function)
    grid = (4, 16, 16)
    captures = [tools.Capture(*(smooth_video(rng, grid) for _ in range(3)), layer=layer, step=0, grid=grid)
                for layer in range(2)]
    calls = []
    dense = evaluate_module._dense
    monkeypatch.setattr(evaluate_module, "_dense", lambda *args, **kwargs: calls.append(1) or dense(*args, **kwargs))
    tools.calibrate(captures, target_error=0.2, base=psa.PSAConfig(block_m=64, block_n=64), iterations=6,
                    device="cpu")
    assert len(calls) == len(captures)   # not once per bisection step and shape


def test_calibrate_for_a_target_error_finds_a_sparse_config(rng):
    grid = (4, 16, 16)
    captures = [tools.Capture(*(smooth_video(rng, grid) for _ in range(3)), layer=0, step=0, grid=grid)]
    config = tools.calibrate(captures, target_error=0.2, base=psa.PSAConfig(block_m=64, block_n=64))
    (row,) = tools.evaluate(captures, config, baseline=False)
    assert row["rel_l2_mean"] <= 0.2 and row["density"] < 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"), (dict(target_density=0.2, target_error=0.1), "exactly one"),
    (dict(target_density=1.5), "target_density"), (dict(target_error=0.0), "target_error"),
    (dict(target_density=0.2, mode="quantile"), "mode"),
])
def test_calibrate_rejects_bad_arguments(rng, kwargs, match):
    capture = tools.Capture(*(randn(rng, 1, 1, 64, 8) for _ in range(3)), layer=0, step=0)
    with pytest.raises(ValueError, match=match):
        tools.calibrate([capture], **kwargs)
