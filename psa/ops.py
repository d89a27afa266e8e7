"""Typed wrappers over `torch.ops.psa`, with their fake kernels and autograd registrations.

The wrappers convert arguments and fill defaults from a `PSAConfig`: no device queries, no `.item()`
on the GPU, no prints, so they trace under `torch.compile(fullgraph=True)`. Tensors are validated in
C++ (each op's preparation, csrc/psa/<op>.cpp); the wrappers check only host-side arguments (positions,
generator, the pyramid dict) and that every tensor shares one device, which the dispatcher would
otherwise route around (a meta tensor among CPU ones selects the fake kernel).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .config import PSAConfig

_ops = torch.ops.psa
Positions = Union[None, torch.Tensor, Sequence[int], range]


def _ceil_div(a, b):
    return (a + b - 1) // b


def _config(config: Optional[PSAConfig]) -> PSAConfig:
    if config is None:
        return PSAConfig()
    if not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a psa.PSAConfig, got {type(config).__name__}")
    return config


def _position_mask(name: str, positions: Positions, length: int, device) -> Optional[torch.Tensor]:
    """A bool mask `[L]` or `[B, L]` from a mask, an index tensor, a range or a list of positions.

    Positions must lie in [0, length): negative ones are not counted from the end. Host lists and
    ranges are checked here; an index tensor on the GPU is checked on the device (torch._assert_async:
    no host sync on the hot path)."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        return positions
    if isinstance(positions, torch.Tensor):
        if positions.dtype not in (torch.int32, torch.int64) or positions.dim() != 1:
            raise ValueError(f"{name} must be a bool mask or a 1-D integer tensor of positions, got "
                             f"{positions.dtype} of shape {tuple(positions.shape)}")
        index = positions.to(device=device, dtype=torch.long)
        in_range = ((index >= 0) & (index < length)).all()
        if index.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range):
                raise ValueError(f"{name} must hold positions in [0, {length}), got values from "
                                 f"{int(index.min())} to {int(index.max())}")
        else:
            torch._assert_async(in_range, f"{name} must hold positions in [0, {length})")
        return torch.zeros(length, dtype=torch.bool, device=device).index_fill_(0, index, True)
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise ValueError(f"{name} must be a bool mask, an integer tensor, a list or a range of positions, got "
                         f"{type(positions).__name__}")
    values = list(positions)
    bad = [p for p in values if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < length]
    if bad:
        raise ValueError(f"{name} must hold integer positions in [0, {length}), got {bad[:5]!r}")
    index = torch.as_tensor(values, dtype=torch.long, device=device)
    return torch.zeros(length, dtype=torch.bool, device=device).index_fill_(0, index, True)


def _check_generator(generator, config: PSAConfig) -> None:
    if generator is not None and config.estimator != "sampled":
        raise ValueError(f"generator applies to the 'sampled' estimator only, got estimator={config.estimator!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_same_device(**tensors) -> None:
    """Every tensor argument on one device (a meta tensor among CPU ones would otherwise dispatch to
    the fake kernel and return uninitialised memory)."""
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def _sample_offsets(block: int, generator: Optional[torch.Generator], device) -> Optional[torch.Tensor]:
    """`block // 4` distinct offsets drawn from `generator`, sorted (None: the op's strided default)."""
    if generator is None:
        return None
    draw = torch.randperm(block, generator=generator, device=generator.device)[: block // 4]
    return torch.sort(draw).values.to(device)


# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------

def kv_pyramid(k: torch.Tensor, v: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """`{l: (K_l, V_l)}` for l in 1, 2, 4, 8 (level 1 is `k, v` themselves)."""
    _check_same_device(k=k, v=v)
    k2, v2, k4, v4, k8, v8 = _ops.kv_pyramid(k, v)
    return {1: (k, v), 2: (k2, v2), 4: (k4, v4), 8: (k8, v8)}


def estimate_importance(q: torch.Tensor, k: torch.Tensor, config: Optional[PSAConfig] = None, *,
                        scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
                        k8: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block scores, float32 `[B, Hq, n_q, n_k]`; rows sum to 1 over their candidate blocks.

    `generator` (sampled estimator only) draws the sampled offsets; without it they are evenly strided,
    so the same inputs always give the same scores. `k8` (pooled estimator only) is `kv_pyramid(k, v)[8][0]`
    when you have it: the key means are then taken from it instead of from a pass over `k` (the same
    scores, docs/spec.md section 4), as `sparse_attention` does.
    """
    c = _config(config)
    _check_generator(generator, c)
    _check_same_device(q=q, k=k, k8=k8)
    return _ops.estimate_importance(
        q, k, block_m=c.block_m, block_n=c.block_n, method=c.estimator, scale=scale, causal=c.causal,
        stride=c.stride, precision=c.estimate_precision, q_offsets=_sample_offsets(c.block_m, generator, q.device),
        k_offsets=_sample_offsets(c.block_n, generator, q.device), k8=k8)


def assign_levels(scores: torch.Tensor, config: Optional[PSAConfig] = None, *, k: Optional[torch.Tensor] = None,
                  q_len: Optional[int] = None, k_len: Optional[int] = None, force_keys: Positions = None,
                  force_queries: Positions = None) -> torch.Tensor:
    """int8 level map `[B, Hq, n_q, n_k]` with values in {0, 1, 2, 4, 8} (docs/spec.md section 5).

    `q_len`/`k_len` default to `k`'s length when `k` is given, else to whole blocks; causal maps need
    the true lengths (give `q_len`, and `k` or `k_len`). `force_keys`/`force_queries` are positions
    (mask, index tensor, list or range) whose key blocks / query rows are kept at level 1.
    The similarity cap (`config.sim_thresholds`) needs `k`.
    """
    c = _config(config)
    n_q, n_k = scores.shape[-2], scores.shape[-1]
    if k_len is None:
        k_len = k.shape[-2] if k is not None else n_k * c.block_n
    if q_len is None:
        if c.causal and k is None:
            raise ValueError("assign_levels: a causal config needs the sequence lengths: pass q_len and k or k_len")
        q_len = k_len if c.causal else n_q * c.block_m
    if c.sim_thresholds is not None and k is None:
        raise ValueError("assign_levels: config.sim_thresholds (the similarity cap) needs k")
    _check_same_device(scores=scores, k=k, force_keys=force_keys, force_queries=force_queries)
    return _ops.assign_levels(
        scores, mode=c.mode, bounds=list(c.bounds), block_m=c.block_m, block_n=c.block_n, q_len=q_len,
        k_len=k_len, min_full=c.min_full, causal=c.causal, sink=c.sink,
        force_keys=_position_mask("force_keys", force_keys, k_len, scores.device),
        force_queries=_position_mask("force_queries", force_queries, q_len, scores.device), k=k,
        sim_thresholds=None if c.sim_thresholds is None else list(c.sim_thresholds))


def estimate_levels(q: torch.Tensor, k: torch.Tensor, config: Optional[PSAConfig] = None, *,
                    scale: Optional[float] = None, force_keys: Positions = None, force_queries: Positions = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`assign_levels(estimate_importance(q, k))`: the level map psa would use for these inputs."""
    scores = estimate_importance(q, k, config, scale=scale, generator=generator)
    return assign_levels(scores, config, k=k, q_len=q.shape[-2], force_keys=force_keys,
                         force_queries=force_queries)


def attention_with_levels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *,
                          block_m: int, block_n: int, scale: Optional[float] = None, causal: bool = False,
                          return_lse: bool = False):
    """Attention over a given level map (docs/spec.md section 3). q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lk, D]`.

    Returns `out` (and float32 `lse [B, Hq, Lq]` with `return_lse`). Rows that see no key get zeros
    and `lse = -inf`.
    """
    _check_same_device(q=q, k=k, v=v, levels=levels)
    out, lse = _ops.attention_with_levels(q, k, v, levels, block_m=block_m, block_n=block_n, scale=scale,
                                          causal=causal)
    return (out, lse) if return_lse else out


def attention_over_pyramid(q: torch.Tensor, pyramid: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                           levels: torch.Tensor, *, block_m: int, block_n: int, scale: Optional[float] = None,
                           causal: bool = False, return_lse: bool = False):
    """`attention_with_levels` with the pyramid given: `pyramid` is what `kv_pyramid(k, v)` returns
    (`{1: (k, v), 2: (K_2, V_2), 4: ..., 8: ...}`), so several calls over one K and V (or a training step
    that keeps it) pool them once. Returns `out` (and `lse` with `return_lse`)."""
    if not isinstance(pyramid, dict) or sorted(pyramid) != [1, 2, 4, 8]:
        raise ValueError("pyramid must be the dict kv_pyramid(k, v) returns, keyed 1, 2, 4 and 8, got "
                         f"{type(pyramid).__name__}" + (f" with keys {sorted(pyramid)}" if isinstance(pyramid, dict)
                                                         else ""))
    (k, v), (k2, v2), (k4, v4), (k8, v8) = (pyramid[level] for level in (1, 2, 4, 8))
    _check_same_device(q=q, k=k, v=v, k2=k2, v2=v2, k4=k4, v4=v4, k8=k8, v8=v8, levels=levels)
    out, lse = _ops.attention_over_pyramid(q, k, v, k2, v2, k4, v4, k8, v8, levels, block_m=block_m,
                                           block_n=block_n, scale=scale, causal=causal)
    return (out, lse) if return_lse else out


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Optional[PSAConfig] = None, *,
                     scale: Optional[float] = None, force_keys: Positions = None, force_queries: Positions = None,
                     generator: Optional[torch.Generator] = None, return_lse: bool = False,
                     return_levels: bool = False):
    """Pyramid sparse attention: a drop-in for `F.scaled_dot_product_attention(q, k, v)` on long inputs.

    Returns `out`, or a tuple `(out, lse?, levels?)` with the `return_*` flags.
    """
    c = _config(config)
    _check_generator(generator, c)
    _check_same_device(q=q, k=k, v=v, force_keys=force_keys, force_queries=force_queries)
    out, lse, levels = _ops.sparse_attention(
        q, k, v, block_m=c.block_m, block_n=c.block_n, mode=c.mode, bounds=list(c.bounds),
        estimator=c.estimator, min_full=c.min_full,
        sim_thresholds=None if c.sim_thresholds is None else list(c.sim_thresholds), causal=c.causal,
        sink=c.sink, stride=c.stride, scale=scale, precision=c.estimate_precision,
        force_keys=_position_mask("force_keys", force_keys, k.shape[-2], q.device),
        force_queries=_position_mask("force_queries", force_queries, q.shape[-2], q.device),
        q_offsets=_sample_offsets(c.block_m, generator, q.device),
        k_offsets=_sample_offsets(c.block_n, generator, q.device))
    if not (return_lse or return_levels):
        return out
    return (out,) + ((lse,) if return_lse else ()) + ((levels,) if return_levels else ())


# --------------------------------------------------------------------------------------------------
# Fake kernels: output shapes only, so torch.compile traces without running anything
# --------------------------------------------------------------------------------------------------

@torch.library.register_fake("psa::kv_pyramid")
def _kv_pyramid_fake(k, v):
    batch, heads, length, dim = k.shape
    return tuple(x.new_empty(batch, heads, _ceil_div(length, level), dim)
                 for level in (2, 4, 8) for x in (k, v))


@torch.library.register_fake("psa::kv_pyramid_backward")
def _kv_pyramid_backward_fake(dk2, dv2, dk4, dv4, dk8, dv8, *, k_len):
    batch, heads, _, dim = dk2.shape
    return dk2.new_empty(batch, heads, k_len, dim), dv2.new_empty(batch, heads, k_len, dim)


@torch.library.register_fake("psa::estimate_importance")
def _estimate_importance_fake(q, k, q_offsets=None, k_offsets=None, k8=None, *, block_m, block_n, method,
                              scale=None, causal=False, stride=8, precision="full"):
    return q.new_empty(q.shape[0], q.shape[1], _ceil_div(q.shape[2], block_m), _ceil_div(k.shape[2], block_n),
                       dtype=torch.float32)


@torch.library.register_fake("psa::assign_levels")
def _assign_levels_fake(scores, force_keys=None, force_queries=None, k=None, *, mode, bounds, block_m, block_n,
                        q_len, k_len, min_full=0.06, causal=False, sink=True, sim_thresholds=None):
    return scores.new_empty(scores.shape, dtype=torch.int8)


@torch.library.register_fake("psa::attention_over_pyramid")
def _attention_over_pyramid_fake(q, k, v, k2, v2, k4, v4, k8, v8, levels, *, block_m, block_n, scale=None,
                                 causal=False):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("psa::attention_over_pyramid_backward")
def _attention_over_pyramid_backward_fake(grad_out, grad_lse, q, k, v, k2, v2, k4, v4, k8, v8, levels, out, lse, *,
                                          block_m, block_n, scale=None, causal=False):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, k2, v2, k4, v4, k8, v8))


# attention_with_levels and sparse_attention are composite ops (C++, CompositeImplicitAutograd): traced
# through their stages, they need no fake kernel and no autograd formula of their own.


# --------------------------------------------------------------------------------------------------
# Autograd: the two stages of attention differentiate through their backward ops
# (attention_over_pyramid_backward, kv_pyramid_backward), so attention_with_levels and sparse_attention
# do through them; the stages that decide the level map give outputs without gradient (their autograd
# kernel is C++: csrc/psa/autograd.cpp)
# --------------------------------------------------------------------------------------------------

def _kv_pyramid_setup(ctx, inputs, output, keyword_only_inputs=None):
    # The backward needs k's shape only: saving k and v would keep them alive.
    k, v = inputs
    ctx.k_shape = k.shape


def _kv_pyramid_backward(ctx, *grads):
    # The backward op (kv_pyramid_backward: each pooled token's gradient over its count, spread back), with
    # zeros for a level no gradient reached.
    if all(grad is None for grad in grads):
        return None, None
    batch, heads, k_len, dim = ctx.k_shape
    like = next(grad for grad in grads if grad is not None)
    grads = [grad if grad is not None else like.new_zeros(batch, heads, _ceil_div(k_len, 2 << (index // 2)), dim)
             for index, grad in enumerate(grads)]
    return _ops.kv_pyramid_backward(*grads, k_len=k_len)


def _kv_pyramid_backward_backward(ctx, grad_dk, grad_dv):
    # kv_pyramid_backward is linear and spreads each pooled gradient evenly over the keys it covers, so its
    # transpose averages over those keys: kv_pyramid itself (double backward through the pyramid).
    if grad_dk is None and grad_dv is None:
        return (None,) * 6
    grad_dk = grad_dk if grad_dk is not None else torch.zeros_like(grad_dv)
    grad_dv = grad_dv if grad_dv is not None else torch.zeros_like(grad_dk)
    return tuple(_ops.kv_pyramid(grad_dk, grad_dv))


def _attention_over_pyramid_setup(ctx, inputs, output, keyword_only_inputs=None):
    ctx.save_for_backward(*inputs, *output)
    ctx.attention = dict(block_m=keyword_only_inputs["block_m"], block_n=keyword_only_inputs["block_n"],
                         scale=keyword_only_inputs.get("scale"), causal=keyword_only_inputs.get("causal", False))


def _attention_over_pyramid_backward(ctx, grad_out, grad_lse):
    # The backward op takes the forward's out and lse (delta = rowsum(dO * O), P = exp(S - lse)).
    grads = torch.ops.psa.attention_over_pyramid_backward(grad_out, grad_lse, *ctx.saved_tensors, **ctx.attention)
    return (*grads, None)


torch.library.register_autograd("psa::kv_pyramid", _kv_pyramid_backward, setup_context=_kv_pyramid_setup)
torch.library.register_autograd("psa::kv_pyramid_backward", _kv_pyramid_backward_backward)
torch.library.register_autograd("psa::attention_over_pyramid", _attention_over_pyramid_backward,
                                setup_context=_attention_over_pyramid_setup)
