"""The ops trace under torch.compile with no graph break, also with dynamic sequence lengths."""

import pytest
import torch._dynamo.testing
import torch

import psa
from psa import PSAConfig
from conftest import BACKENDS, DEVICES, randn


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_compiles_fullgraph(rng, device):
    config = PSAConfig(block_m=64, block_n=64, causal=True)

    def attention(q, k, v):
        return psa.sparse_attention(q, k, v, config, force_keys=range(0, 10)) * 2

    q, k, v = (randn(rng, 1, 2, 300, 64, device=device) for _ in range(3))
    compiled = torch.compile(attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v))


@pytest.mark.parametrize("device,dtype", BACKENDS)
def test_dynamic_lengths_do_not_recompile(rng, device, dtype):
    config = PSAConfig(block_m=64, block_n=32)

    def stages(q, k, v):
        levels = psa.estimate_levels(q, k, config)
        return psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=32, return_lse=True)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(stages, fullgraph=True, dynamic=True, backend=counter)
    for length in (257, 391):
        q, k, v = (randn(rng, 1, 2, length, 64, dtype=dtype, device=device) for _ in range(3))
        for got, expected in zip(compiled(q, k, v), stages(q, k, v)):
            torch.testing.assert_close(got, expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_with_inductor_dynamic(rng, device):
    module = psa.PSAAttention(PSAConfig(block_m=32, block_n=32, estimator="pooled"))
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for length in (130, 200):
        q, k, v = (randn(rng, 1, 2, length, 64, device=device) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v))
