import pytest
import torch

import psa
from psa import reference
from conftest import DEVICES, randn

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
