"""psa.integrations.diffusers on tiny random diffusers transformers: on the CPU reference backend and,
where there is a GPU, on the CUDA backend (head_dim 64 so both backends take them)."""

import gc

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import psa
from conftest import BACKENDS, assert_attention_close

diffusers = pytest.importorskip("diffusers")
import psa.integrations.diffusers as psa_diffusers  # noqa: E402

DENSE_CONFIG = psa.PSAConfig(bounds=(1.0, 1.0, 1.0, 1.0), block_m=32, block_n=32)
SPARSE_CONFIG = psa.PSAConfig(bounds=(0.2, 0.3, 0.4, 0.6), block_m=32, block_n=32)


class TinyModel:
    """A tiny random diffusers transformer with inputs: `build(dtype)` and `run(model, timestep, dtype)`."""

    def __init__(self, name, build, inputs, call, attentions):
        self.name, self.build_fn, self.inputs, self.call, self.attentions = name, build, inputs, call, attentions

    def build(self, dtype=torch.float32, device="cpu"):
        torch.manual_seed(0)
        return self.build_fn().to(device=device, dtype=dtype).eval()

    def run(self, model, timestep=500, dtype=torch.float32):
        device = next(model.parameters()).device
        with torch.no_grad():
            return self.call(model, *(x.to(device=device, dtype=dtype) for x in self.inputs),
                             torch.tensor([timestep], device=device))


# Wan and CogVideoX run one sample, HunyuanVideo two (different text padding per sample).


def wan_model(rng):
    # Latent grid after patching: 5 x 12 x 10 = 600 video tokens; 7 text tokens for cross-attention.
    return TinyModel(
        "wan",
        lambda: diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32),
        (torch.randn(1, 4, 5, 24, 20, generator=rng), torch.randn(1, 7, 16, generator=rng)),
        lambda model, latents, text, t: model(latents, t, text, return_dict=False)[0],
        lambda model: [block.attn1 for block in model.blocks])


def cogvideox_model(rng, rotary=False):
    # Joint attention over [8 text | 3 x 8 x 8 video] tokens; rotary embedding on the video part.
    frames, size, heads, head_dim = 3, 16, 2, 64
    video_tokens = frames * (size // 2) ** 2
    angles = torch.rand(video_tokens, head_dim, generator=rng) * 6.28
    rotary_emb = (angles.cos(), angles.sin()) if rotary else None
    return TinyModel(
        "cogvideox",
        lambda: diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=3, sample_width=size, sample_height=size, sample_frames=4 * frames - 3,
            patch_size=2, max_text_seq_length=8, use_rotary_positional_embeddings=rotary),
        (torch.randn(1, frames, 4, size, size, generator=rng), torch.randn(1, 8, 16, generator=rng)),
        lambda model, latents, text, t: model(
            latents, text, t, return_dict=False,
            image_rotary_emb=None if rotary_emb is None else tuple(x.to(latents.device) for x in rotary_emb))[0],
        lambda model: [block.attn1 for block in model.transformer_blocks])


def hunyuan_model(rng, text_mask=((1, 1, 1, 1, 1, 1, 0, 0), (1, 1, 1, 0, 0, 0, 0, 0))):
    # Joint attention over [3 x 8 x 8 video | 8 text] tokens; the two samples pad their text differently.
    mask = torch.tensor(text_mask)
    return TinyModel(
        "hunyuan",
        lambda: diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(16, 24, 24), guidance_embeds=False),
        (torch.randn(2, 4, 3, 16, 16, generator=rng), torch.randn(2, 8, 16, generator=rng),
         torch.randn(2, 8, generator=rng)),
        lambda model, latents, text, pooled, t: model(latents, t.expand(2), text, mask.to(latents.device), pooled,
                                                      return_dict=False)[0],
        lambda model: ([block.attn for block in model.transformer_blocks] +
                       [block.attn for block in model.single_transformer_blocks]))


MODELS = {"wan": wan_model, "cogvideox": cogvideox_model,
          "cogvideox_rotary": lambda rng: cogvideox_model(rng, rotary=True), "hunyuan": hunyuan_model}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("device,dtype", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_every_block_at_level_one_equals_the_unpatched_model(rng, name, device, dtype):
    tiny = MODELS[name](rng)
    model = tiny.build(dtype, device)
    expected = tiny.run(model, dtype=dtype)
    expected64 = tiny.run(tiny.build(torch.float64, device), dtype=torch.float64)
    psa_diffusers.apply(model, DENSE_CONFIG)
    assert_attention_close(tiny.run(model, dtype=dtype), expected64, expected)
    report = psa_diffusers.stats(model)
    assert [row["layer"] for row in report] == list(range(len(tiny.attentions(model))))
    assert all(row["density"] == 1.0 and row["coverage"] == 1.0 for row in report)


@pytest.mark.parametrize("device,dtype", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("order", ["gilbert", "tiled", "raster"])
def test_sparse_config_runs_differs_boundedly_and_reports(rng, name, order, device, dtype):
    tiny = MODELS[name](rng)
    model = tiny.build(dtype, device)
    dense = tiny.run(model, dtype=dtype).float()
    psa_diffusers.apply(model, SPARSE_CONFIG, order=order)
    sparse = tiny.run(model, dtype=dtype).float()
    relative = ((sparse - dense).norm() / dense.norm()).item()
    assert 0 < relative < 0.5
    for row in psa_diffusers.stats(model):
        assert 0 < row["density"] < 1 and row["density"] <= row["coverage"] <= 1
        assert sum(row["histogram"].values()) == pytest.approx(1.0)


def test_cogvideox_text_tokens_are_forced_keys_and_rows(rng, monkeypatch):
    tiny = cogvideox_model(rng)
    model = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG)
    seen = []
    original = psa_diffusers.sparse_attention

    def spy(q, k, v, config, **kwargs):
        result = original(q, k, v, config, **kwargs)
        seen.append((kwargs, result[-1]))   # return_levels: the level map comes last
        return result

    monkeypatch.setattr(psa_diffusers, "sparse_attention", spy)
    tiny.run(model)
    assert len(seen) == 3
    text = torch.zeros(8 + 192, dtype=torch.bool)
    text[:8] = True
    for kwargs, levels in seen:
        assert torch.equal(kwargs["force_keys"], text) and torch.equal(kwargs["force_queries"], text)
        # The 8 text tokens lie in key block 0 and query block 0 (block size 32): that column and that
        # row of every level map are level 1, while the rest of the map is sparse.
        assert (levels[..., 0] == 1).all() and (levels[:, :, 0, :] == 1).all()
        assert (levels[:, :, 1:, 1:] != 1).any()


@pytest.mark.parametrize("device,dtype", BACKENDS)
def test_hunyuan_padded_text_tokens_change_nothing(rng, device, dtype):
    tiny = hunyuan_model(rng)
    model = psa_diffusers.apply(tiny.build(dtype, device), SPARSE_CONFIG)
    expected = tiny.run(model, dtype=dtype)
    latents, text, pooled = tiny.inputs
    text = text.clone()
    text[0, 6:] = 100.0     # sample 0's padding
    text[1, 3:] = -50.0     # sample 1's padding
    tiny.inputs = (latents, text, pooled)
    torch.testing.assert_close(tiny.run(model, dtype=dtype), expected)
    assert {row["layer"] for row in psa_diffusers.stats(model)} == {0, 1, 2}


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_the_original_exactly(rng, name):
    gc.collect()   # models of earlier tests, patched and dropped, must not keep the wrapper alive
    tiny = MODELS[name](rng)
    model = tiny.build()
    module = diffusers.models.transformers.transformer_wan
    original_dispatch = getattr(module.dispatch_attention_fn, "_psa_original", module.dispatch_attention_fn)
    processors = [attention.processor for attention in tiny.attentions(model)]
    backends = [processor._attention_backend for processor in processors if hasattr(processor, "_attention_backend")]
    expected = tiny.run(model)
    psa_diffusers.apply(model, SPARSE_CONFIG)
    assert not torch.equal(tiny.run(model), expected)
    psa_diffusers.remove(model)
    assert module.dispatch_attention_fn is original_dispatch
    assert [attention.processor for attention in tiny.attentions(model)] == processors
    assert [p._attention_backend for p in processors if hasattr(p, "_attention_backend")] == backends
    assert torch.equal(tiny.run(model), expected)


def test_only_chosen_layers_are_patched(rng):
    tiny = wan_model(rng)
    model = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG, layers=[1])
    tiny.run(model)
    assert [row["layer"] for row in psa_diffusers.stats(model)] == [1]


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan"])
@pytest.mark.parametrize("cfg_style", ["batched", "two_passes"])
def test_warmup_counts_denoising_steps_not_attention_calls(rng, name, cfg_style):
    tiny = MODELS[name](rng)
    model = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG, warmup_steps=2)
    passes = 2 if cfg_style == "two_passes" else 1
    for generation in range(2):   # the second generation starts over: its first steps are dense again
        for timestep in (999, 800, 600, 400):
            for _ in range(passes):
                tiny.run(model, timestep)
        steps = sorted({row["step"] for row in psa_diffusers.stats(model)})
        assert steps == [2, 3], f"generation {generation}: psa ran at steps {steps}"
    # A dense step leaves the model's output exactly as unpatched.
    assert torch.equal(tiny.run(model, 999), tiny.run(tiny.build(), 999))


@pytest.mark.parametrize("device,dtype", BACKENDS)
@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan"])
def test_compile_fullgraph_traces_the_patched_model(rng, name, device, dtype):
    tiny = MODELS[name](rng)
    model = psa_diffusers.apply(tiny.build(dtype, device), SPARSE_CONFIG)
    eager = tiny.run(model, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True)
    traced = tiny.run(compiled, dtype=dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(traced, eager)
    else:
        # float16: Inductor keeps the fused chains around attention (norms, rotary, modulation) in float32
        # where eager rounds after every op, and the difference grows through the blocks: up to 0.017 on
        # outputs of magnitude 2 (H200). Elementwise bounds do not fit that; a relative L2 bound does, and
        # a wrong trace (token order, level map, layer config) is off by tens of percent.
        error = ((traced.float() - eager.float()).norm() / eager.float().norm()).item()
        assert error < 1e-2, f"compiled output differs from eager by {error:.2e} (relative L2)"


def test_two_experts_share_the_pipeline_steps(rng):
    """Wan2.2's experts: the second continues the first's steps, so its first steps are past warm-up."""
    tiny = wan_model(rng)
    high_noise, low_noise = tiny.build(), tiny.build()
    psa_diffusers.apply(high_noise, warmup_steps=2)
    with pytest.raises(ValueError, match="share_steps_with must be another transformer psa is already applied to"):
        psa_diffusers.apply(low_noise, warmup_steps=2, share_steps_with=tiny.build())
    psa_diffusers.apply(low_noise, warmup_steps=2, share_steps_with=high_noise)
    for generation in range(2):
        for timestep, expert in ((900, high_noise), (800, high_noise), (700, low_noise), (600, low_noise)):
            for _ in range(2):                               # two-pass classifier-free guidance
                tiny.run(expert, timestep)
        rows = psa_diffusers.stats(low_noise)          # this generation's steps only, each layer once
        assert sorted((row["step"], row["layer"]) for row in rows) == [(s, layer) for s in (2, 3) for layer in range(3)]
        with pytest.warns(UserWarning, match="has not run"):
            assert psa_diffusers.stats(high_noise) == []     # both its steps were warm-up


def test_stats_warns_when_psa_never_ran(rng):
    model = wan_model(rng).build()
    psa_diffusers.apply(model)
    with pytest.warns(UserWarning, match="psa has not run on this transformer yet"):
        assert psa_diffusers.stats(model) == []


def test_apply_rejects_what_it_cannot_patch():
    with pytest.raises(ValueError, match="supports"):
        psa_diffusers.apply(torch.nn.Linear(2, 2))
    model = wan_model(torch.Generator()).build()
    with pytest.raises(ValueError, match="warmup_steps"):
        psa_diffusers.apply(model, warmup_steps=-1)
    with pytest.raises(ValueError, match="order"):
        psa_diffusers.apply(model, order="hilbert")
    with pytest.raises(ValueError, match="layers"):
        psa_diffusers.apply(model, layers=[3])
    with pytest.raises(ValueError, match=r"tile must be three positive ints \(T, H, W\), got \(0, 0, 0\)"):
        psa_diffusers.apply(model, tile=(0, 0, 0))
    with pytest.raises(ValueError, match=r"maps block indices \(ints\) to PSAConfig, got keys \['0'\]"):
        psa_diffusers.apply(model, {"0": psa.PSAConfig()})

    class Pipeline:  # what a diffusers pipeline looks like to apply(): components and a transformer
        components = {}
        transformer = model

    with pytest.raises(ValueError, match="pass pipe.transformer"):
        psa_diffusers.apply(Pipeline())
    psa_diffusers.apply(model)
    with pytest.raises(ValueError, match="already applied"):
        psa_diffusers.apply(model)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_regional_compile_with_warmup_compiles_few_graphs(rng, name):
    # diffusers' compile_repeated_blocks compiles the transformer blocks and leaves the step bookkeeping
    # (one host read of the timestep per forward) in eager code. The blocks must not be specialised per
    # step or per layer: one graph for dense steps and one for psa steps.
    tiny = MODELS[name](rng)
    eager = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG, warmup_steps=2)
    compiled = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG, warmup_steps=2)
    compiled.compile_repeated_blocks(fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for timestep in (999, 800, 600, 400, 999, 800):
        torch.testing.assert_close(tiny.run(compiled, timestep), tiny.run(eager, timestep))
    # At most a dense and a psa graph per compiled block class (classes psa does not touch: one).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 * len(compiled._repeated_blocks)
    assert psa_diffusers.stats(compiled) == psa_diffusers.stats(eager)


def test_per_layer_configs_from_calibration_drive_their_layers(rng):
    from psa import tools
    tiny = wan_model(rng)
    model = tiny.build()
    with tools.capture(model) as captures:
        tiny.run(model)
    assert [c.layer for c in captures] == [0, 1, 2] and all(tuple(c.grid) == (5, 12, 10) for c in captures)
    chosen = [c for c in captures if c.layer != 1]
    configs = tools.calibrate(chosen, target_density=0.3, base=SPARSE_CONFIG, tolerance=0.05, per_layer=True)
    configs = tools.configs_from_json(tools.configs_to_json(configs))
    assert sorted(configs) == [0, 2]
    psa_diffusers.apply(model, configs)
    tiny.run(model)
    report = psa_diffusers.stats(model)
    assert [row["layer"] for row in report] == [0, 2]          # layer 1 has no config: it stays dense
    assert all(abs(row["density"] - 0.3) <= 0.05 for row in report)
    with pytest.raises(ValueError, match="not both"):
        psa_diffusers.apply(tiny.build(), configs, layers=[0])


def _with_latent_grid(tiny, frames, height, width, rng):
    """`tiny` with a latent of another size (CogVideoX holds frames before channels)."""
    latents = tiny.inputs[0]
    shape = list(latents.shape)
    if tiny.name.startswith("cogvideox"):
        shape[1], shape[3], shape[4] = frames, height, width
    else:
        shape[2], shape[3], shape[4] = frames, height, width
    return TinyModel(tiny.name, tiny.build_fn, (torch.randn(shape, generator=rng), *tiny.inputs[1:]), tiny.call,
                     tiny.attentions)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan"])
def test_dynamic_compile_takes_new_grids_without_recompiling(rng, name):
    # The grid reaches compiled code as the shape of an empty tensor, symbolic under dynamic=True: a new
    # latent size reuses the graphs, and psa still runs with the new grid's token order. psa must add no
    # recompile to the unpatched model's: on torch 2.11 CogVideoX's own positional embedding specializes
    # the frame count (repeat_interleave in get_3d_sincos_pos_embed), whatever psa does.
    tiny = MODELS[name](rng)
    dense, model = tiny.build(), psa_diffusers.apply(tiny.build(), SPARSE_CONFIG)
    dense_counter, counter = torch._dynamo.testing.CompileCounter(), torch._dynamo.testing.CompileCounter()
    compiled_dense = torch.compile(dense, backend=dense_counter, fullgraph=True, dynamic=True)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    # Sizes all distinct (and unlike the model's other sizes): dynamo's duck sizing would tie equal sizes
    # together and recompile once they part, whatever psa does.
    for index, (t, h, w) in enumerate([(3, 12, 20), (5, 20, 24), (6, 24, 12)]):
        grid_model = _with_latent_grid(tiny, t, h, w, rng)
        torch.testing.assert_close(grid_model.run(compiled), grid_model.run(model))
        grid_model.run(compiled_dense)
        if index == 0:
            graphs, dense_graphs = counter.frame_count, dense_counter.frame_count
        assert counter.frame_count - graphs == dense_counter.frame_count - dense_graphs, \
            f"grid {(t, h, w)} recompiled for psa"
    assert psa_diffusers.stats(model)
    if torch.__version__ >= "2.14":  # where the unpatched models take new grids without recompiling (2.11 does not)
        assert counter.frame_count == graphs


def _count_layout_gathers(monkeypatch):
    """Counts psa.layout permutations (permute and unpermute calls that move data)."""
    calls = {"n": 0}
    for name in ("permute", "unpermute"):
        original = getattr(psa.layout.TokenLayout, name)

        def counted(self, x, dim=-2, _original=original):
            calls["n"] += 0 if self.is_identity else 1
            return _original(self, x, dim)

        monkeypatch.setattr(psa.layout.TokenLayout, name, counted)
    return calls


@pytest.mark.parametrize("name,per_token_timestep,kept_gathers", [
    # (Wan's rotary cos and sin are indexed in the hook itself, not through TokenLayout: see rope_hook.)
    ("wan", False, 2),                # patch tokens, the output projection's output
    ("wan", True, 3),                 # + Wan2.2 TI2V's per-token timesteps
    ("cogvideox", False, 2),          # the patch embedding's video part, the final norm's input
    ("cogvideox_rotary", False, 4),   # + the rotary tables
], ids=["wan2.1", "wan2.2-ti2v", "cogvideox", "cogvideox-rotary"])
def test_blocks_keep_psa_order(rng, monkeypatch, name, per_token_timestep, kept_gathers):
    # keep_order (the default on Wan and CogVideoX): the blocks run in gilbert order, permuted once per
    # forward instead of q, k, v and the output in every psa layer; the output is the one of per-layer
    # permutation.
    tiny = MODELS[name](rng)
    if name == "wan":
        latents, text = tiny.inputs
        tokens = 5 * 12 * 10
        timestep = torch.linspace(999, 500, tokens)[None] if per_token_timestep else torch.tensor([700.0])

        def run(model):
            with torch.no_grad():
                return model(latents, timestep, text, return_dict=False)[0]
    else:
        run = tiny.run

    calls = _count_layout_gathers(monkeypatch)
    per_layer = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG, keep_order=False)
    expected = run(per_layer)
    per_layer_gathers, calls["n"] = calls["n"], 0
    kept = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG)
    out = run(kept)
    assert per_layer_gathers == 4 * len(tiny.attentions(kept))  # q, k, v and the output of every layer
    assert calls["n"] == kept_gathers
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert [row["density"] for row in psa_diffusers.stats(kept)] == pytest.approx(
        [row["density"] for row in psa_diffusers.stats(per_layer)], abs=0.05)
    psa_diffusers.remove(kept)
    torch.testing.assert_close(run(kept), run(tiny.build()), rtol=0, atol=0)
