import os

import pytest
import torch

import psa  # noqa: F401  (registers torch.ops.psa)


def has_cuda_kernel(op: str) -> bool:
    """True when a GPU is present and psa was built with a CUDA kernel for `op`."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"psa::{op}", "CUDA")


def cuda_backend_available() -> bool:
    return has_cuda_kernel("attention_over_pyramid")


# Devices of the backend-generic tests, which run in float64/float32 at small head dims: the CPU
# reference backend. The CUDA backend (bf16/fp16, head_dim 64/128) has its own tests, test_cuda_*.py.
DEVICES = ["cpu"]

requires_cuda = pytest.mark.skipif(not cuda_backend_available(), reason="needs a CUDA GPU and psa's CUDA backend")
CUDA_DTYPES = [torch.bfloat16, torch.float16]
CUDA_HEAD_DIMS = [64, 128]
# (device, dtype) pairs for tests that run unchanged on both backends.
BACKENDS = [pytest.param("cpu", torch.float32, id="cpu"),
            pytest.param("cuda", torch.float16, id="cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture
def fresh_dynamo():
    """torch.compile state reset around a test, so compiled graphs and counters do not leak between tests."""
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def rng(request):
    """A generator with a fresh seed per test, printed so that a failure can be replayed (PSA_SEED=...)."""
    seed = int(os.environ.get("PSA_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"{request.node.nodeid}: PSA_SEED={seed}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return generator


def randn(rng, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=rng, dtype=torch.float64).to(device=device, dtype=dtype)


def reference_scores(q, k, **kwargs):
    """psa.reference's estimate_importance in float64 on the CPU for the kernels' bf16/fp16 q and k. The
    pooled estimator's takes k in its own dtype: the kernels round its level-8 keys to it (kv_pyramid's
    k8), which a float64 k would not (against a float64 k, the CPU backend's bf16 pooled scores of one
    drawn example came to 1.13 times the CUDA tests' tolerance)."""
    from psa import reference
    k_ref = k.cpu() if kwargs["method"] == "pooled" else k.double().cpu()
    return reference.estimate_importance(q.double().cpu(), k_ref, **kwargs).double()


def reference_attention_pair(q, k, v, levels, **kwargs):
    """psa.reference attention on the CPU in float64 (out, lse) and in the inputs' dtype (out): the
    references of the FlashAttention error rule."""
    from psa import reference
    ref64, lse64 = reference.attention_with_levels(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                   levels.cpu(), **kwargs)
    ref_lowp, _ = reference.attention_with_levels(q.cpu(), k.cpu(), v.cpu(), levels.cpu(), **kwargs)
    return ref64, lse64, ref_lowp


def assert_attention_close(out, ref64, ref_lowp):
    """The FlashAttention rule: the error is at most twice that of the same reference run in the input
    dtype, plus a small floor."""
    assert torch.isfinite(out).all(), "output has NaN/inf"
    error = (out.double() - ref64.double()).abs().max().item()
    budget = 2 * (ref_lowp.double() - ref64.double()).abs().max().item() + 1e-5
    assert error <= budget, f"max error {error:.3e} exceeds budget {budget:.3e}"


# Level values of random level maps: skip and every pool factor.
LEVELS = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)


def random_levels(rng, batch, heads, n_q, n_k, values=LEVELS):
    return values[torch.randint(0, len(values), (batch, heads, n_q, n_k), generator=rng)]


def check_attention_against_reference(q, k, v, levels, **kwargs):
    """psa.attention_with_levels on CUDA inputs against the float64 reference: the output under the
    FlashAttention rule, lse to 2e-2 where finite and -inf exactly where the reference has it."""
    out, lse = psa.attention_with_levels(q, k, v, levels, return_lse=True, **kwargs)
    assert out.dtype == q.dtype and out.is_cuda and lse.dtype == torch.float32
    ref64, lse64, ref_lowp = reference_attention_pair(q, k, v, levels, **kwargs)
    assert_attention_close(out.cpu(), ref64, ref_lowp)
    finite = lse64.isfinite()
    assert torch.equal(lse.cpu().isfinite(), finite)
    torch.testing.assert_close(lse.cpu()[finite], lse64[finite].float(), atol=2e-2, rtol=0)
    return out, lse
