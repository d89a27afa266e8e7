"""Gradients of psa's attention in q, k and v (docs/spec.md section 7): checked numerically against the
forward kernel (gradcheck, float64, CPU), against SDPA where every block is at level 1, and on CUDA
against the float64 gradients."""

import pytest
import torch
import torch.nn.functional as F

import psa
from conftest import random_levels, requires_cuda


def inputs(rng, batch, q_heads, kv_heads, q_len, k_len, dim, dtype=torch.float64, device="cpu"):
    make = lambda heads, length: torch.randn(batch, heads, length, dim, generator=rng, dtype=torch.float64)  # noqa: E731
    q, k, v = make(q_heads, q_len), make(kv_heads, k_len), make(kv_heads, k_len)
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (q, k, v))


def level_map(rng, batch, heads, q_len, k_len, block_m, block_n, empty_row=False):
    levels = random_levels(rng, batch, heads, -(-q_len // block_m), -(-k_len // block_n))
    if empty_row:
        levels[:, :, 0] = 0
    return levels


CASES = [
    # batch, q_heads, kv_heads, q_len, k_len, dim, block_m, block_n, causal
    pytest.param(1, 2, 2, 70, 70, 8, 32, 32, False, id="plain"),
    pytest.param(2, 4, 2, 45, 77, 8, 32, 64, False, id="gqa-lq<lk-odd"),
    pytest.param(1, 3, 1, 67, 67, 16, 64, 32, True, id="causal-gqa"),
    pytest.param(1, 2, 1, 40, 72, 8, 32, 32, True, id="causal-lq<lk"),
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,k_len,dim,block_m,block_n,causal", CASES)
def test_gradcheck_against_the_forward_kernel(rng, batch, q_heads, kv_heads, q_len, k_len, dim, block_m, block_n,
                                             causal):
    q, k, v = inputs(rng, batch, q_heads, kv_heads, q_len, k_len, dim)
    levels = level_map(rng, batch, q_heads, q_len, k_len, block_m, block_n, empty_row=True)

    def attention(q, k, v):
        return psa.attention_with_levels(q, k, v, levels, block_m=block_m, block_n=block_n, causal=causal)

    # fast_mode: the Jacobian against random vectors (cheap enough for CI), not column by column.
    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_over_pyramid_gradcheck_in_every_input(rng, causal):
    # The pooled levels as independent inputs: their gradients (dK_l, dV_l) are checked, not only the
    # sum the pyramid's backward makes of them.
    q, k, v = inputs(rng, 1, 4, 2, 45, 77, 8)
    pooled = [x.detach().clone().requires_grad_(True) for x in torch.ops.psa.kv_pyramid(k, v)]
    levels = level_map(rng, 1, 4, 45, 77, 32, 32)

    def attention(q, k, v, *pooled):
        pyramid = {1: (k, v), 2: tuple(pooled[0:2]), 4: tuple(pooled[2:4]), 8: tuple(pooled[4:6])}
        return psa.attention_over_pyramid(q, pyramid, levels, block_m=32, block_n=32, causal=causal)

    assert torch.autograd.gradcheck(attention, (q, k, v, *pooled), eps=1e-6, atol=1e-6, fast_mode=True)


def test_kv_pyramid_gradcheck(rng):
    _, k, v = inputs(rng, 2, 2, 2, 8, 61, 4)
    assert torch.autograd.gradcheck(lambda k, v: torch.ops.psa.kv_pyramid(k, v), (k, v), eps=1e-6, atol=1e-6)


def spread_pooled_gradients(d_pooled, k_len):
    """(dk, dv) in float64, token by token: token t of a level-l pooled tensor averages keys [l t, l t + l)
    clipped to k_len, so each of them gets its gradient over that count."""
    totals = []
    for slot in (0, 1):
        total = torch.zeros(*d_pooled[slot].shape[:2], k_len, d_pooled[slot].shape[3], dtype=torch.float64)
        for index, level in enumerate((2, 4, 8)):
            grad = d_pooled[2 * index + slot].double().cpu()
            for token in range(grad.shape[2]):
                first, last = level * token, min(level * token + level, k_len)
                total[:, :, first:last] += grad[:, :, token:token + 1] / (last - first)
        totals.append(total)
    return totals


PYRAMID_BACKENDS = [pytest.param("cpu", dtype, id=f"cpu-{str(dtype)[6:]}")
                    for dtype in (torch.float64, torch.float32, torch.bfloat16)]
PYRAMID_BACKENDS += [pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}", marks=[pytest.mark.cuda, requires_cuda])
                     for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device,dtype", PYRAMID_BACKENDS)
@pytest.mark.parametrize("k_len,dim", [(1, 64), (7, 64), (61, 128), (200, 64), (1027, 128)])
def test_kv_pyramid_backward_op_matches_float64(rng, device, dtype, k_len, dim):
    # Lengths that leave every level's last pooled token partial (61, 1027) or whole (200), and shorter
    # than one group of 8 (1, 7); fp32 accumulation, one rounding to the output dtype.
    d_pooled = [torch.randn(2, 3, -(-k_len // level), dim, generator=rng, dtype=torch.float64)
                for level in (2, 4, 8) for _ in (0, 1)]
    expected = spread_pooled_gradients(d_pooled, k_len)
    grads = torch.ops.psa.kv_pyramid_backward(*(g.to(device=device, dtype=dtype) for g in d_pooled), k_len=k_len)
    for grad, reference in zip(grads, expected):
        assert grad.shape == reference.shape and grad.dtype == dtype and grad.device.type == device
        # Inputs of magnitude ~1: a few units of the accumulation's last place, one rounding of the result.
        tolerance = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(grad.double().cpu(), reference, rtol=tolerance, atol=2 * tolerance)


def test_kv_pyramid_backward_gradcheck(rng):
    # Its own gradient is the pyramid (the mean over the keys a pooled gradient was spread to), so double
    # backward through kv_pyramid works; gradgradcheck checks that too.
    d_pooled = [torch.randn(2, 1, -(-29 // level), 4, generator=rng, dtype=torch.float64, requires_grad=True)
                for level in (2, 4, 8) for _ in (0, 1)]
    assert torch.autograd.gradcheck(lambda *g: torch.ops.psa.kv_pyramid_backward(*g, k_len=29), d_pooled,
                                    eps=1e-6, atol=1e-6)
    _, k, v = inputs(rng, 1, 1, 1, 8, 29, 4)
    assert torch.autograd.gradgradcheck(lambda k, v: torch.ops.psa.kv_pyramid(k, v), (k, v), eps=1e-6, atol=1e-6)


def test_kv_pyramid_backward_takes_levels_without_gradient(rng):
    # Autograd hands None for the pooled outputs a loss does not use: those levels contribute nothing.
    _, k, v = inputs(rng, 1, 2, 2, 8, 37, 4)
    pooled = torch.ops.psa.kv_pyramid(k, v)
    (pooled[2].sum() * 3).backward()  # k4 only: each key gets 3 / (the keys its level-4 token averages)
    assert v.grad.abs().max() == 0
    counts = torch.tensor([min(4, 37 - 4 * (t // 4)) for t in range(37)], dtype=torch.float64)
    torch.testing.assert_close(k.grad, (3.0 / counts)[None, None, :, None].expand_as(k))


def test_kv_pyramid_backward_names_bad_arguments(rng):
    d_pooled = [torch.randn(1, 2, -(-10 // level), 8, generator=rng) for level in (2, 4, 8) for _ in (0, 1)]
    op = torch.ops.psa.kv_pyramid_backward
    with pytest.raises(RuntimeError, match=r"dk4 must have shape \[B, H, ceil\(k_len/4\), D\] = \[1, 2, 3, 8\]"):
        op(*d_pooled[:2], d_pooled[2][:, :, :2], *d_pooled[3:], k_len=10)
    with pytest.raises(RuntimeError, match=r"dk2 must have shape .* for k_len = 12"):
        op(*d_pooled, k_len=12)
    with pytest.raises(RuntimeError, match="dv8 must have the same dtype as dk2"):
        op(*d_pooled[:5], d_pooled[5].double(), k_len=10)
    with pytest.raises(RuntimeError, match="k_len must be at least 1, got 0"):
        op(*d_pooled, k_len=0)
    with pytest.raises(RuntimeError, match="dk2 must be float32, float64, bfloat16 or float16"):
        op(*(g.to(torch.int32) for g in d_pooled), k_len=10)


def test_full_gradcheck_on_a_small_causal_gqa_case(rng):
    # Column by column (not fast mode) once: every entry of the Jacobian.
    q, k, v = inputs(rng, 1, 2, 1, 40, 72, 8)
    levels = level_map(rng, 1, 2, 40, 72, 32, 32)

    def attention(q, k, v):
        return psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32, causal=True)

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-6)


def test_rows_that_see_no_key_get_zero_gradient(rng):
    q, k, v = inputs(rng, 1, 2, 2, 64, 64, 8)
    levels = level_map(rng, 1, 2, 64, 64, 32, 32, empty_row=True)
    out = psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32)
    grad_q, = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.isfinite(grad_q).all() and (grad_q[:, :, :32] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_every_block_at_level_one_has_sdpas_gradients(rng, causal):
    q, k, v = inputs(rng, 2, 4, 2, 77, 77, 16)
    levels = torch.ones(2, 4, 3, 3, dtype=torch.int8)
    out, lse = psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32, causal=causal, return_lse=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 16 ** -0.5
    if causal:
        logits = logits.masked_fill(torch.ones(77, 77, dtype=torch.bool).triu(1), float("-inf"))
    expected_lse = torch.logsumexp(logits, dim=-1)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse, dtype=torch.float64)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse.float()))
    expected_grads = torch.autograd.grad((expected, expected_lse), (q, k, v), (grad_out, grad_lse))
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-6)


def test_sparse_attention_differentiates_through_its_level_map(rng):
    q, k, v = inputs(rng, 1, 2, 1, 96, 96, 16)
    config = psa.PSAConfig(block_m=32, block_n=32, bounds=(0.3, 0.5, 0.6, 0.8), causal=True)
    out, levels = psa.sparse_attention(q, k, v, config, return_levels=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    again = psa.attention_with_levels(q, k, v, levels, block_m=32, block_n=32, causal=True)
    for grad, reference in zip(grads, torch.autograd.grad(again, (q, k, v), grad_out)):
        torch.testing.assert_close(grad, reference)


def test_a_small_training_step_lowers_the_loss(rng):
    # A layer trained through psa: its loss against a fixed target falls, as with any differentiable op.
    q, k, v = (x.detach().float() for x in inputs(rng, 1, 2, 2, 64, 64, 16))
    weight = torch.nn.Parameter(torch.eye(16) + 0.01 * torch.randn(16, 16, generator=rng))
    levels = level_map(rng, 1, 2, 64, 64, 32, 32)
    target = torch.randn(1, 2, 64, 16, generator=rng)
    optimizer = torch.optim.SGD([weight], lr=0.5)
    losses = []
    for _ in range(20):
        out = psa.attention_with_levels(q @ weight, k, v, levels, block_m=32, block_n=32)
        loss = (out - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_gradients_match_float64(rng, dtype, dim, causal):
    q, k, v = inputs(rng, 1, 4, 2, 200, 200, dim, dtype=dtype, device="cuda")
    levels = level_map(rng, 1, 4, 200, 200, 64, 64).cuda()
    out = psa.attention_with_levels(q, k, v, levels, block_m=64, block_n=64, causal=causal)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    exact = [x.detach().double().cpu().requires_grad_(True) for x in (q, k, v)]
    reference = psa.attention_with_levels(*exact, levels.cpu(), block_m=64, block_n=64, causal=causal)
    expected = torch.autograd.grad(reference, exact, grad_out.double().cpu())
    for grad, exact_grad in zip(grads, expected):
        # FlashAttention's rule: within a small multiple of the low-precision rounding of the result.
        scale = exact_grad.abs().max().item()
        assert (grad.double().cpu() - exact_grad).abs().max().item() <= 3e-2 * scale + 1e-3


def test_compile_fullgraph_traces_forward_and_backward(rng, fresh_dynamo):
    q, k, v = (x.detach().float().requires_grad_(True) for x in inputs(rng, 1, 4, 2, 96, 96, 16))
    config = psa.PSAConfig(block_m=32, block_n=32, bounds=(0.3, 0.5, 0.6, 0.8), causal=True)

    def loss(q, k, v):
        return psa.sparse_attention(q, k, v, config).square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for grad, reference in zip(compiled, eager):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(rng):
    # torch.utils.checkpoint recomputes the forward in the backward: the level map is decided again from
    # the same inputs, so the gradients equal those of the plain graph.
    q, k, v = inputs(rng, 1, 2, 1, 96, 96, 16)
    config = psa.PSAConfig(block_m=32, block_n=32, bounds=(0.3, 0.5, 0.6, 0.8))

    def block(q, k, v):
        return psa.sparse_attention(q, k, v, config).tanh()

    grad_out = torch.randn(1, 2, 96, 16, generator=rng, dtype=torch.float64)
    plain = torch.autograd.grad(block(q, k, v), (q, k, v), grad_out)
    checkpointed = torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False)
    again = torch.autograd.grad(checkpointed, (q, k, v), grad_out)
    for expected, grad in zip(plain, again):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,k_len,dim,block_m,block_n,causal", CASES)
@pytest.mark.parametrize("outputs", ["out", "lse", "both"])
def test_backward_op_matches_the_reference_backward(rng, batch, q_heads, kv_heads, q_len, k_len, dim, block_m,
                                                    block_n, causal, outputs):
    # The backend's backward op (CPU kernel: the forward's out and lse, P = exp(S - lse)) against
    # psa/backward.py (plain tensor ops that recompute the softmax), float64, an empty row included.
    from psa.backward import attention_over_pyramid_backward

    q, k, v = (x.detach() for x in inputs(rng, batch, q_heads, kv_heads, q_len, k_len, dim))
    pooled = torch.ops.psa.kv_pyramid(k, v)
    levels = level_map(rng, batch, q_heads, q_len, k_len, block_m, block_n, empty_row=True)
    kwargs = dict(block_m=block_m, block_n=block_n, causal=causal)
    out, lse = torch.ops.psa.attention_over_pyramid(q, k, v, *pooled, levels, **kwargs)
    grad_out = torch.randn(out.shape, generator=rng, dtype=out.dtype) if outputs != "lse" else None
    grad_lse = torch.randn(lse.shape, generator=rng, dtype=lse.dtype) if outputs != "out" else None
    grads = torch.ops.psa.attention_over_pyramid_backward(grad_out, grad_lse, q, k, v, *pooled, levels, out, lse,
                                                          **kwargs)
    dq, dk, dv, d_pooled = attention_over_pyramid_backward(grad_out, grad_lse, q, k, v, pooled, levels,
                                                           scale=None, **kwargs)
    expected = (dq, dk, dv, *d_pooled)
    assert len(grads) == len(expected) == 9
    for grad, reference, like in zip(grads, expected, (q, k, v, *pooled)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-9)
    assert grads[0][:, :, :block_m].abs().max() == 0  # the rows of the empty first query block


def test_backward_op_names_bad_arguments(rng):
    q, k, v = (x.detach() for x in inputs(rng, 1, 2, 1, 40, 40, 8))
    pooled = torch.ops.psa.kv_pyramid(k, v)
    levels = torch.ones(1, 2, 2, 2, dtype=torch.int8)
    out, lse = torch.ops.psa.attention_over_pyramid(q, k, v, *pooled, levels, block_m=32, block_n=32)
    op = torch.ops.psa.attention_over_pyramid_backward
    kwargs = dict(block_m=32, block_n=32)
    with pytest.raises(RuntimeError, match="grad_out and grad_lse are both None"):
        op(None, None, q, k, v, *pooled, levels, out, lse, **kwargs)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[1, 2, 40, 8\]"):
        op(out[:, :, :20], None, q, k, v, *pooled, levels, out, lse, **kwargs)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        op(out, None, q, k, v, *pooled, levels, out, lse.double(), **kwargs)
    with pytest.raises(RuntimeError, match=r"out must have shape"):
        op(out, None, q, k, v, *pooled, levels, out[..., :4], lse, **kwargs)
    with pytest.raises(RuntimeError, match="levels"):
        op(out, None, q, k, v, *pooled, levels[:, :, :1], out, lse, **kwargs)


CUDA_CASES = [
    # batch, q_heads, kv_heads, q_len, k_len, dim, block_m, block_n, causal
    pytest.param(1, 4, 2, 200, 200, 64, 64, 64, False, id="gqa-64"),
    pytest.param(2, 2, 1, 333, 290, 128, 128, 128, True, id="causal-lq>lk-odd-128"),
    pytest.param(1, 3, 3, 97, 150, 64, 32, 32, False, id="lq<lk-blocks32"),
    pytest.param(1, 4, 1, 300, 300, 128, 64, 128, True, id="causal-gqa4"),
    pytest.param(1, 2, 2, 130, 260, 64, 128, 64, True, id="causal-lq<lk"),
    pytest.param(1, 4, 2, 257, 389, 64, 128, 128, False, id="gqa-64-blocks128-odd"),
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,k_len,dim,block_m,block_n,causal", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("outputs", ["out", "lse", "both"])
@pytest.mark.parametrize("family", ["auto", "sm80"])
def test_cuda_backward_op_matches_float64(rng, monkeypatch, batch, q_heads, kv_heads, q_len, k_len, dim, block_m,
                                          block_n, causal, dtype, outputs, family):
    # The fused CUDA kernels (the forward's out and lse, every level's gradients) against psa/backward.py
    # in float64 on the CPU, an empty query block included; FlashAttention's tolerance rule. "auto" takes
    # the Hopper backward (the dq pass, the key-major dK / dV pass with 128- and 64-key CTAs) on an
    # H100 / H200 wherever it applies (block_m 64 / 128, block_n >= 64), sm80 the portable kernels.
    from psa.backward import attention_over_pyramid_backward

    monkeypatch.setenv("PSA_CUDA_KERNEL", family)

    q, k, v = (x.detach() for x in inputs(rng, batch, q_heads, kv_heads, q_len, k_len, dim))
    levels = level_map(rng, batch, q_heads, q_len, k_len, block_m, block_n, empty_row=True)
    kwargs = dict(block_m=block_m, block_n=block_n, causal=causal)
    grad_out = torch.randn(q.shape, generator=rng, dtype=torch.float64) if outputs != "lse" else None
    grad_lse = torch.randn(q.shape[:3], generator=rng, dtype=torch.float64) if outputs != "out" else None
    dq, dk, dv, d_pooled = attention_over_pyramid_backward(grad_out, grad_lse, q, k, v, torch.ops.psa.kv_pyramid(k, v),
                                                           levels, scale=None, **kwargs)
    expected = (dq, dk, dv, *d_pooled)

    qc, kc, vc = (x.to(device="cuda", dtype=dtype) for x in (q, k, v))
    pooled = torch.ops.psa.kv_pyramid(kc, vc)
    out, lse = torch.ops.psa.attention_over_pyramid(qc, kc, vc, *pooled, levels.cuda(), **kwargs)
    grads = torch.ops.psa.attention_over_pyramid_backward(
        None if grad_out is None else grad_out.to(device="cuda", dtype=dtype),
        None if grad_lse is None else grad_lse.to(device="cuda", dtype=torch.float32),
        qc, kc, vc, *pooled, levels.cuda(), out, lse, **kwargs)
    assert len(grads) == 9
    for grad, reference, like in zip(grads, expected, (qc, kc, vc, *pooled)):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.device == like.device
        scale = reference.abs().max().item()
        assert (grad.double().cpu() - reference).abs().max().item() <= 3e-2 * scale + 1e-3
    assert grads[0][:, :, :block_m].abs().max() == 0  # the rows of the empty first query block
