"""psa.integrations.diffusers on tiny random diffusers transformers (CPU reference backend)."""

import gc

import pytest
import torch
import torch._dynamo

import psa
from conftest import assert_attention_close

diffusers = pytest.importorskip("diffusers")
import psa.integrations.diffusers as psa_diffusers  # noqa: E402

DENSE_CONFIG = psa.PSAConfig(bounds=(1.0, 1.0, 1.0, 1.0), block_m=32, block_n=32)
SPARSE_CONFIG = psa.PSAConfig(bounds=(0.2, 0.3, 0.4, 0.6), block_m=32, block_n=32)


def tiny_wan(dtype=torch.float32):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32)
    return model.to(dtype).eval()


def wan_inputs(rng, dtype=torch.float32):
    # Latent grid after patching: 5 x 12 x 10 = 600 video tokens.
    latents = torch.randn(1, 4, 5, 24, 20, generator=rng).to(dtype)
    text = torch.randn(1, 7, 16, generator=rng).to(dtype)
    return latents, text


def run(model, latents, text, timestep=500):
    with torch.no_grad():
        return model(latents, torch.tensor([timestep]), text, return_dict=False)[0]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_every_block_at_level_one_equals_the_unpatched_model(rng):
    latents, text = wan_inputs(rng)
    model, reference64 = tiny_wan(), tiny_wan(torch.float64)
    expected = run(model, latents, text)
    expected64 = run(reference64, latents.double(), text.double())
    psa_diffusers.apply(model, DENSE_CONFIG)
    assert_attention_close(run(model, latents, text), expected64, expected)
    report = psa_diffusers.stats(model)
    assert [row["layer"] for row in report] == [0, 1, 2]
    assert all(row["density"] == 1.0 and row["coverage"] == 1.0 for row in report)


@pytest.mark.parametrize("order", ["gilbert", "tiled", "raster"])
def test_sparse_config_runs_differs_boundedly_and_reports(rng, order):
    latents, text = wan_inputs(rng)
    model = tiny_wan()
    dense = run(model, latents, text)
    psa_diffusers.apply(model, SPARSE_CONFIG, order=order)
    sparse = run(model, latents, text)
    relative = ((sparse - dense).norm() / dense.norm()).item()
    assert 0 < relative < 0.5
    for row in psa_diffusers.stats(model):
        assert 0 < row["density"] < 1 and row["density"] <= row["coverage"] <= 1
        assert sum(row["histogram"].values()) == pytest.approx(1.0)


def test_remove_restores_the_original_exactly(rng):
    latents, text = wan_inputs(rng)
    gc.collect()   # models of earlier tests, patched and dropped, must not keep the wrapper alive
    model = tiny_wan()
    module = diffusers.models.transformers.transformer_wan
    original_dispatch = getattr(module.dispatch_attention_fn, "_psa_original", module.dispatch_attention_fn)
    expected = run(model, latents, text)
    psa_diffusers.apply(model, SPARSE_CONFIG)
    assert module.dispatch_attention_fn._psa_original is original_dispatch
    assert not torch.equal(run(model, latents, text), expected)
    psa_diffusers.remove(model)
    assert module.dispatch_attention_fn is original_dispatch
    assert all(block.attn1.processor._attention_backend is None for block in model.blocks)
    assert torch.equal(run(model, latents, text), expected)


def test_only_chosen_layers_are_patched(rng):
    latents, text = wan_inputs(rng)
    model = tiny_wan()
    psa_diffusers.apply(model, SPARSE_CONFIG, layers=[1])
    run(model, latents, text)
    assert [row["layer"] for row in psa_diffusers.stats(model)] == [1]


@pytest.mark.parametrize("cfg_style", ["batched", "two_passes"])
def test_warmup_counts_denoising_steps_not_attention_calls(rng, cfg_style):
    latents, text = wan_inputs(rng)
    model = tiny_wan()
    psa_diffusers.apply(model, SPARSE_CONFIG, warmup_steps=2)
    passes = 2 if cfg_style == "two_passes" else 1
    for generation in range(2):   # the second generation starts over: its first steps are dense again
        for timestep in (999, 800, 600, 400):
            for _ in range(passes):
                run(model, latents, text, timestep)
        steps = sorted({row["step"] for row in psa_diffusers.stats(model)})
        assert steps == [2, 3], f"generation {generation}: psa ran at steps {steps}"
    # A dense step leaves the model's output exactly as unpatched.
    reference = tiny_wan()
    assert torch.equal(run(model, latents, text, 999), run(reference, latents, text, 999))


def test_compile_fullgraph_traces_the_patched_model(rng):
    latents, text = wan_inputs(rng)
    model = psa_diffusers.apply(tiny_wan(), SPARSE_CONFIG)
    eager = run(model, latents, text)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(run(compiled, latents, text), eager)


def test_apply_rejects_what_it_cannot_patch():
    with pytest.raises(ValueError, match="supports"):
        psa_diffusers.apply(torch.nn.Linear(2, 2))
    model = tiny_wan()
    with pytest.raises(ValueError, match="warmup_steps"):
        psa_diffusers.apply(model, warmup_steps=-1)
    with pytest.raises(ValueError, match="order"):
        psa_diffusers.apply(model, order="hilbert")
    with pytest.raises(ValueError, match="layers"):
        psa_diffusers.apply(model, layers=[3])
    psa_diffusers.apply(model)
    with pytest.raises(ValueError, match="already applied"):
        psa_diffusers.apply(model)
