"""psa.integrations.transformers on a tiny random Qwen2.5-VL (no download): on the CPU reference backend
and, where there is a GPU, on the CUDA backend (head_dim 64 so both backends take it)."""

import pytest
import torch

import psa
from conftest import BACKENDS

transformers = pytest.importorskip("transformers")
import psa.integrations.transformers as psa_transformers  # noqa: E402

VIDEO, IMAGE = 301, 300
DENSE = psa.PSAConfig(causal=True, bounds=(1.0, 1.0, 1.0, 1.0), block_m=32, block_n=32)
SPARSE = psa.PSAConfig(causal=True, estimator="antidiagonal", bounds=(0.2, 0.3, 0.4, 0.6), block_m=32, block_n=32,
                       stride=8)


def tiny_qwen(implementation="sdpa", device="cpu", dtype=torch.float32, family="qwen2_5_vl"):
    """A tiny random Qwen2.5-VL (or Qwen2-VL) with 2 decoder layers of 4 query / 2 key-value heads of 64."""
    torch.manual_seed(0)
    text = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=320, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4})
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=302, vision_end_token_id=303)
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=256, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[0])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None,
                                               eos_token_id=None, pad_token_id=None, **tokens)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=256, num_heads=2, mlp_ratio=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class = transformers.Qwen2VLForConditionalGeneration
    config._attn_implementation = implementation
    return model_class(config).to(device=device, dtype=dtype).eval()


def prompt(rng, length=300, video=(40, 260)):
    """Token ids: text, then video placeholders in [video[0], video[1]), then text."""
    ids = torch.randint(0, 290, (1, length), generator=rng)
    ids[0, video[0]:video[1]] = VIDEO
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("device,dtype", BACKENDS)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_every_block_at_level_one_equals_the_unpatched_model(rng, device, dtype, implementation, family):
    model = tiny_qwen(implementation, device, dtype, family)
    ids = prompt(rng)
    expected = logits(model, ids)
    psa_transformers.apply(model, DENSE, min_tokens=64)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits(model, ids), expected, rtol=tolerance, atol=tolerance)
    assert [s["layer"] for s in psa_transformers.stats(model)] == [0, 1]


def test_sparse_prefill_changes_logits_boundedly_and_reports(rng):
    model = tiny_qwen()
    ids = prompt(rng, length=640, video=(32, 600))
    expected = logits(model, ids)
    psa_transformers.apply(model, SPARSE, min_tokens=64)
    out = logits(model, ids)
    error = (out - expected).norm() / expected.norm()
    assert 0 < error < 0.5, error
    report = psa_transformers.stats(model)
    assert len(report) == 2 and all(0 < s["density"] < 1 and 0 < s["coverage"] <= 1 for s in report)


def test_text_tokens_are_forced_keys_and_rows_and_the_sink_is_kept(rng, monkeypatch):
    seen = []
    original = psa_transformers.sparse_attention

    def spy(q, k, v, config, **kwargs):
        result = original(q, k, v, config, **kwargs)
        seen.append((kwargs["force_keys"], result[2]))
        return result

    monkeypatch.setattr(psa_transformers, "sparse_attention", spy)
    model = psa_transformers.apply(tiny_qwen(), SPARSE, min_tokens=64)
    ids = prompt(rng, length=640, video=(32, 600))
    logits(model, ids)
    text = ids != VIDEO
    assert len(seen) == 2
    for forced, levels in seen:
        assert torch.equal(forced.cpu(), text)
        rows = torch.arange(levels.shape[-2])
        # Rows of text-only query blocks (the first block, and the last two: tokens 600..639) are dense up
        # to the diagonal; every row keeps the sink block and the blocks holding text at level 1.
        for i in (0, levels.shape[-2] - 1):
            assert (levels[..., i, : i + 1] == 1).all()
        assert (levels[..., :, 0] == 1).all()
        assert (levels[..., rows, rows] == 1).all()   # the diagonal block


def test_decode_steps_and_short_prompts_use_the_models_attention(rng, monkeypatch):
    calls = []
    original = psa_transformers.sparse_attention
    monkeypatch.setattr(psa_transformers, "sparse_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[2]) or original(*args, **kwargs))
    model = psa_transformers.apply(tiny_qwen(), DENSE, min_tokens=100)
    reference = tiny_qwen()
    ids = prompt(rng, length=200, video=(20, 180))
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        expected = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    # One psa call per layer for the prefill, none for the four decode steps; all-level-1 psa generates
    # the same tokens as the model's own attention, through the KV cache.
    assert calls == [200, 200]
    assert torch.equal(generated, expected)
    calls.clear()
    logits(model, ids[:, :99])
    assert calls == []


def test_padded_batches_use_the_models_attention(rng, monkeypatch):
    calls = []
    original = psa_transformers.sparse_attention
    monkeypatch.setattr(psa_transformers, "sparse_attention",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    model = psa_transformers.apply(tiny_qwen(), DENSE, min_tokens=64)
    ids = torch.cat([prompt(rng), prompt(rng)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == []


def test_remove_restores_the_model_exactly_and_leaves_the_vision_tower_alone(rng):
    model = tiny_qwen()
    ids = prompt(rng)
    expected = logits(model, ids)
    vision_configs = [id(m.config) for m in model.modules() if hasattr(m, "config") and "Vision" in type(m).__name__]
    psa_transformers.apply(model, SPARSE, min_tokens=64)
    assert [id(m.config) for m in model.modules()
            if hasattr(m, "config") and "Vision" in type(m).__name__] == vision_configs
    assert not torch.equal(logits(model, ids), expected)
    psa_transformers.remove(model)
    assert torch.equal(logits(model, ids), expected)
    assert all(m.config._attn_implementation == "sdpa" for m in psa_transformers._language_attentions(model))


def test_apply_rejects_what_it_cannot_patch():
    model = tiny_qwen()
    with pytest.raises(ValueError, match="causal=True"):
        psa_transformers.apply(model, psa.PSAConfig())
    with pytest.raises(ValueError, match="min_tokens"):
        psa_transformers.apply(model, min_tokens=0)
    with pytest.raises(ValueError, match="layers"):
        psa_transformers.apply(model, layers=[5])
    with pytest.raises(ValueError, match="config must be a psa.PSAConfig"):
        psa_transformers.apply(model, {"causal": True})
    with pytest.raises(ValueError, match="language_model"):
        psa_transformers.apply(torch.nn.Linear(2, 2))
    psa_transformers.apply(model, min_tokens=64)
    with pytest.raises(ValueError, match="already applied"):
        psa_transformers.apply(model)
    psa_transformers.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        psa_transformers.remove(model)
    with pytest.raises(ValueError, match="not applied"):
        psa_transformers.stats(model)


def test_stats_warns_before_any_psa_prefill(rng):
    model = psa_transformers.apply(tiny_qwen(), DENSE, min_tokens=10_000)
    logits(model, prompt(rng))
    with pytest.warns(UserWarning, match="no prefill has run psa"):
        assert psa_transformers.stats(model) == []


def test_compile_fullgraph_traces_the_patched_prefill(rng, fresh_dynamo):
    model = psa_transformers.apply(tiny_qwen(), SPARSE, min_tokens=64)
    ids = prompt(rng, length=320, video=(32, 300))
    eager = logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids), eager, rtol=1e-5, atol=1e-5)
    assert len(psa_transformers.stats(model)) == 2
