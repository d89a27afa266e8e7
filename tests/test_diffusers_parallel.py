"""psa under diffusers' context parallelism, two processes on the CPU (gloo): Ulysses gives every rank the
whole sequence for half of the heads, so the patched model's output and its gradient must equal the
one-process ones; ring mode must raise naming Ulysses."""

import logging
import os

import pytest
import torch
import torch.multiprocessing as mp

diffusers = pytest.importorskip("diffusers")
import psa.integrations.diffusers as psa_diffusers  # noqa: E402
from test_diffusers import SPARSE_CONFIG, wan_model  # noqa: E402

WORLD = 2


def _forward(tiny, model, per_token_timestep):
    """The tiny Wan's output; with `per_token_timestep` a timestep per video token (Wan2.2 TI2V's form,
    which diffusers' plan splits across the ranks like the tokens)."""
    if not per_token_timestep:
        return tiny.run(model)
    latents, text = tiny.inputs
    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    with torch.no_grad():
        return model(latents, torch.linspace(999, 500, tokens)[None], text, return_dict=False)[0]


def _run_rank(rank, seed, init_file, out_dir, parallel, per_token_timestep=False):
    import torch.distributed as dist

    # Two shims for a CPU-only run of diffusers 0.42.1's context parallelism: it places rank r on
    # accelerator r % device_count() (0 on a CPU-only torch), and its input splitter logs through
    # Logger.warning_once, which exists only once transformers is imported (as in a real pipeline).
    torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        tiny = wan_model(torch.Generator().manual_seed(seed))
        model = tiny.build()
        model.enable_parallelism(config=diffusers.ContextParallelConfig(**parallel))
        psa_diffusers.apply(model, SPARSE_CONFIG)
        result = {"out": _forward(tiny, model, per_token_timestep), "stats": psa_diffusers.stats(model),
                  "grad": _latent_gradient(tiny, model, seed)}
    except Exception as error:  # reported to the test through the file
        result = {"error": f"{type(error).__name__}: {error}"}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _latent_gradient(tiny, model, seed):
    """The gradient of a fixed random projection of the output in the latents (psa's backward under
    diffusers' all-to-all when the model runs in parallel)."""
    latents, text = (x.clone() for x in tiny.inputs)
    latents.requires_grad_(True)
    out = model(latents, torch.tensor([500.0]), text, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * weights).sum().backward()
    return latents.grad


def _run_parallel(tmp_path, seed, per_token_timestep=False, **parallel):
    mp.spawn(_run_rank, args=(seed, str(tmp_path / "init"), str(tmp_path), parallel, per_token_timestep),
             nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("per_token_timestep", [False, True], ids=["wan2.1", "wan2.2-ti2v"])
def test_ulysses_runs_psa_per_rank_and_matches_one_process(tmp_path, per_token_timestep):
    # The blocks hold psa's token order on every rank (keep_order): the tokens and the per-token
    # timesteps are permuted before diffusers splits them, the rotary tables after (apply's rope hook).
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    tiny = wan_model(torch.Generator().manual_seed(seed))
    model = psa_diffusers.apply(tiny.build(), SPARSE_CONFIG)
    expected = _forward(tiny, model, per_token_timestep)
    one_process_stats = psa_diffusers.stats(model)
    expected_grad = _latent_gradient(tiny, model, seed)
    results = _run_parallel(tmp_path, seed, per_token_timestep, ulysses_degree=WORLD)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        torch.testing.assert_close(result["out"], expected, rtol=1e-5, atol=1e-5)
        # psa ran on every layer of every rank (a dense fallback would record nothing), on half the heads.
        assert [s["layer"] for s in result["stats"]] == [s["layer"] for s in one_process_stats]
        assert all(0 < s["density"] < 1 for s in result["stats"])
    # psa's backward per rank: a rank's latent gradient covers its slice of the sequence (the output gather
    # hands each rank its slice of the output's gradient), so the ranks' gradients sum to one process's.
    torch.testing.assert_close(sum(result["grad"] for result in results), expected_grad, rtol=1e-4, atol=1e-5)
    # The two ranks' heads together make the one-process level maps: their densities average to its density.
    for layer, whole in enumerate(one_process_stats):
        halves = [result["stats"][layer]["density"] for result in results]
        assert sum(halves) / WORLD == pytest.approx(whole["density"], abs=1e-9)


def test_ring_attention_raises_naming_ulysses(tmp_path):
    for rank, result in enumerate(_run_parallel(tmp_path, 0, ring_degree=WORLD)):
        assert "error" in result, f"rank {rank} ran psa under ring attention"
        assert "Ulysses" in result["error"] and "ring_degree=2" in result["error"], result["error"]
