"""torch.library.opcheck on every op of torch.ops.psa (schema, fake kernel, autograd registration)."""

import pytest
import torch

import psa  # noqa: F401
from conftest import DEVICES

TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def samples(device, dtype=torch.float32):
    """Sample arguments for every op (CUDA takes bf16/fp16; test_cuda_pipeline.py passes bfloat16)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rand(1, 4, 100, 64), rand(1, 2, 90, 64), rand(1, 2, 90, 64)
    levels = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (1, 4, 2, 3), generator=g)]
    scores = torch.rand(1, 4, 2, 3, generator=g).to(device)
    keys = torch.zeros(90, dtype=torch.bool, device=device)
    keys[80:] = True
    return {
        "kv_pyramid": [((k, v), {})],
        "kv_pyramid_backward": [(tuple(torch.ops.psa.kv_pyramid(k, v)), dict(k_len=90))],
        "estimate_importance": [
            ((q, k), dict(block_m=64, block_n=32, method=method, causal=causal))
            for method in ("sampled", "antidiagonal", "pooled") for causal in (False, True)] + [
            ((q, k, None, None, torch.ops.psa.kv_pyramid(k, v)[4]), dict(block_m=64, block_n=32, method="pooled")),
            ((q, k), dict(block_m=64, block_n=32, method="antidiagonal", causal=True, precision="fp8"))],
        "assign_levels": [
            ((scores,), dict(mode="topk", bounds=[0.2, 0.4, 0.6, 0.8], block_m=64, block_n=32, q_len=100, k_len=90)),
            ((scores, keys, None, k), dict(mode="threshold", bounds=[0.5, 0.6, 0.7, 0.8], block_m=64, block_n=32,
                                           q_len=100, k_len=90, causal=True, sim_thresholds=[0.1, 0.0, -0.1])),
        ],
        "attention_over_pyramid": [
            ((q, k, v, *torch.ops.psa.kv_pyramid(k, v), levels.to(device)), dict(block_m=64, block_n=32, causal=causal))
            for causal in (False, True)],
        "attention_over_pyramid_backward": [
            ((grad_out, grad_lse, q, k, v, *pyramid, levels.to(device), *forward),
             dict(block_m=64, block_n=32, causal=causal))
            for causal in (False, True)
            for pyramid in [torch.ops.psa.kv_pyramid(k, v)]
            for forward in [torch.ops.psa.attention_over_pyramid(q, k, v, *pyramid, levels.to(device), block_m=64,
                                                                 block_n=32, causal=causal)]
            for grad_out, grad_lse in ((rand(1, 4, 100, 64), rand(1, 4, 100).float()), (rand(1, 4, 100, 64), None))],
        "attention_with_levels": [
            ((q, k, v, levels.to(device)), dict(block_m=64, block_n=32, causal=causal)) for causal in (False, True)],
        "sparse_attention": [
            ((q, k, v, keys), dict(block_m=64, block_n=32, mode="topk", bounds=[0.2, 0.4, 0.6, 0.8],
                                   estimator="sampled", min_full=0.06, sim_thresholds=None, causal=False, sink=True,
                                   stride=8)),
            ((q, k, v), dict(block_m=64, block_n=32, mode="topk", bounds=[0.2, 0.4, 0.6, 0.8],
                             estimator="antidiagonal", min_full=0.06, sim_thresholds=None, causal=True, sink=True,
                             stride=8, precision="fp8")),
        ],
    }


def registered_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("psa::"))


def test_every_op_has_samples():
    assert registered_ops() == sorted(samples("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(samples("cpu")))
def test_opcheck(device, name):
    op = getattr(torch.ops.psa, name).default
    for args, kwargs in samples(device)[name]:
        torch.library.opcheck(op, args, kwargs, test_utils=TESTS)


def test_stages_that_decide_the_level_map_have_no_gradient():
    # As torch.argmax's: outputs that do not require grad, even from inputs that do.
    q = torch.randn(1, 1, 40, 16, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, requires_grad=True)
    config = psa.PSAConfig(block_m=32, block_n=32)
    scores = psa.estimate_importance(q, k, config)
    levels = psa.assign_levels(scores, config, k=k, q_len=40)
    assert not scores.requires_grad and not levels.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        scores.sum().backward()


def test_composite_ops_record_their_stages():
    # attention_with_levels and sparse_attention decompose into the stage ops under tracing.
    q, k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    levels = torch.ones(1, 2, 3, 3, dtype=torch.int8)
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v, levels: torch.ops.psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32))(
            q, k, v, levels)
    called = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert called == ["psa.kv_pyramid.default"] + ["<built-in function getitem>"] * 6 + [
        "psa.attention_over_pyramid.default"] + ["<built-in function getitem>"] * 2
