import pytest
import torch

import psa
from psa import reference
from conftest import DEVICES, has_cuda_kernel, randn

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def naive_pool(x, level):
    """Loop over pooled tokens: the mean of the real positions each one covers."""
    length = x.shape[-2]
    tokens = [x[..., t:min(t + level, length), :].double().mean(-2) for t in range(0, length, level)]
    return torch.stack(tokens, dim=-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 7, 9, 130, 301])
def test_pyramid_matches_naive_means(rng, device, dtype, length):
    k = randn(rng, 2, 3, length, 16, dtype=dtype, device=device)
    v = randn(rng, 2, 3, length, 16, dtype=dtype, device=device)
    pyramid = psa.kv_pyramid(k, v)
    expected = reference.kv_pyramid(k, v)
    for level in (2, 4, 8):
        for got, ref, source in zip(pyramid[level], expected[level], (k, v)):
            assert got.shape == (2, 3, -(-length // level), 16) and got.dtype == dtype
            torch.testing.assert_close(got.double(), naive_pool(source, level), atol=TOLERANCE[dtype],
                                       rtol=TOLERANCE[dtype])
            torch.testing.assert_close(got.double(), ref.double(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_pyramid_accepts_strided_inputs(rng):
    # [B, L, H, D] seen as [B, H, L, D]: only the last dim is contiguous.
    k = randn(rng, 2, 45, 4, 32).transpose(1, 2)
    v = randn(rng, 2, 45, 4, 32).transpose(1, 2)
    for level, (k_level, v_level) in psa.kv_pyramid(k, v).items():
        torch.testing.assert_close(k_level, reference.pool_tokens(k.contiguous(), level) if level > 1 else k)
        torch.testing.assert_close(v_level, reference.pool_tokens(v.contiguous(), level) if level > 1 else v)


def test_identical_groups_pool_to_themselves(rng):
    base = randn(rng, 1, 2, 5, 8, dtype=torch.float64)
    k = base.repeat_interleave(8, dim=2)[:, :, :37]  # groups of 8 identical keys, last group partial
    for level in (2, 4, 8):
        pooled = psa.kv_pyramid(k, k)[level][0]
        torch.testing.assert_close(pooled, k[:, :, ::level])


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernel("kv_pyramid"), reason="needs a GPU and psa's CUDA kv_pyramid")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 7, 13, 1000, 4099])
def test_cuda_pyramid_matches_naive_means(rng, dtype, head_dim, length):
    # [B, L, H, D] storage seen as [B, H, L, D], as video DiTs hand it over.
    k = randn(rng, 2, length, 3, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    v = randn(rng, 2, length, 3, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    torch.cuda.set_sync_debug_mode("error")   # no host synchronisation inside the op
    try:
        pyramid = psa.kv_pyramid(k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = psa.kv_pyramid(k.cpu(), v.cpu())
    for level in (2, 4, 8):
        for got, on_cpu, source in zip(pyramid[level], cpu[level], (k, v)):
            assert got.is_cuda and got.dtype == dtype and got.is_contiguous()
            torch.testing.assert_close(got.cpu().double(), naive_pool(source.cpu(), level),
                                       atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
            torch.testing.assert_close(got.cpu(), on_cpu, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernel("kv_pyramid"), reason="needs a GPU and psa's CUDA kv_pyramid")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 13, 4099])
def test_cuda_pyramid_vector_and_scalar_kernels_agree_bit_for_bit(rng, dtype, head_dim, length):
    # Rows one element off 16-byte alignment take the scalar kernel; the same values aligned take the
    # 16-byte one (kv_pyramid.cuh). Both add each feature's tokens in the same pairs.
    def off_by_one(x):
        storage = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        view = storage[1:].view(x.shape)
        view.copy_(x)
        return view
    k = randn(rng, 2, 3, length, head_dim, dtype=dtype, device="cuda")
    v = randn(rng, 2, 3, length, head_dim, dtype=dtype, device="cuda")
    k_odd, v_odd = off_by_one(k), off_by_one(v)
    assert k_odd.data_ptr() % 16 != 0 and torch.equal(k_odd, k)
    aligned, scalar = psa.kv_pyramid(k, v), psa.kv_pyramid(k_odd, v_odd)
    for level in (2, 4, 8):
        for got, expected in zip(aligned[level], scalar[level]):
            assert torch.equal(got, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernel("kv_pyramid"), reason="needs a GPU and psa's CUDA kv_pyramid")
def test_cuda_pyramid_rejects_float32():
    k = torch.randn(1, 1, 16, 64, device="cuda")
    with pytest.raises(RuntimeError, match="k must be bfloat16 or float16 on CUDA"):
        psa.kv_pyramid(k, k)
