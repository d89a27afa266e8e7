"""The backward of attention over a level map (docs/spec.md section 7), device-generic.

The reference backward, written out: for each chunk of query rows it rebuilds the columns those rows
see (every level's visible tokens, `reference.pyramid_columns`) and applies

    P = softmax(S),  dP = dO V^T,  dS = P * (dP - delta + dlse),  delta = rowsum(dO * O),
    dq = scale dS K,  dK_cols += scale dS^T q,  dV_cols += P^T dO

then sums the query heads of each key head (GQA), and spreads every pooled token's gradient over the
keys it averages, divided by their count (the backward of the mean). Plain tensor operations, so it
runs on any device and `torch.compile` traces it; memory is bounded by the chunk (rows x pyramid
tokens), time is that of dense attention over the ~1.9 L pyramid tokens: a correct baseline and the
oracle for fused kernels, not a fast path. The level map gets no gradient.
"""

from typing import Optional, Tuple

import torch

from . import reference

# Elements of one chunk's logits (batch x query heads x rows x pyramid tokens) at most.
_CHUNK_ELEMENTS = 1 << 26


def attention_with_levels_backward(grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                                   q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *,
                                   block_m: int, block_n: int, scale: Optional[float],
                                   causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_with_levels(q, k, v, levels)` given the gradients of its `out` and
    `lse` (either may be None). Computed in float32 for 16-bit inputs, in the input dtype otherwise."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    keys_f, values_f = k.to(compute), v.to(compute)
    pyramid = reference.kv_pyramid(keys_f, values_f)
    tokens = sum(k_l.shape[-2] for k_l, _ in pyramid.values())
    d_keys = q.new_zeros((batch, kv_heads, tokens, dim), dtype=compute)
    d_values = torch.zeros_like(d_keys)
    dq = torch.zeros_like(q, dtype=compute)
    rows_per_chunk = max(block_m, _CHUNK_ELEMENTS // max(1, batch * q_heads * tokens) // block_m * block_m)
    for start in range(0, q_len, rows_per_chunk):
        stop = min(q_len, start + rows_per_chunk)
        rows = torch.arange(start, stop, device=q.device)
        keys, values, bias, visible = reference.pyramid_columns(pyramid, levels, rows, q_len, k_len,
                                                                block_m=block_m, block_n=block_n, causal=causal)
        q_rows = q[:, :, start:stop].to(compute)
        keys_q, values_q = reference.repeat_kv_heads(keys, q_heads), reference.repeat_kv_heads(values, q_heads)
        logits, empty_row = reference.masked_logits(q_rows, keys_q, bias.to(compute), visible, scale)
        probs = torch.softmax(logits, dim=-1).masked_fill(empty_row, 0.0)        # [B, Hq, R, T]
        d_scores = torch.zeros_like(probs)
        if grad_out is not None:
            d_out = grad_out[:, :, start:stop].to(compute)
            delta = (d_out * torch.matmul(probs, values_q)).sum(-1, keepdim=True)
            d_scores = probs * (torch.matmul(d_out, values_q.transpose(-1, -2)) - delta)
            d_values += torch.matmul(probs.transpose(-1, -2), d_out).unflatten(1, (kv_heads, group)).sum(2)
        if grad_lse is not None:
            d_scores = d_scores + probs * grad_lse[:, :, start:stop, None].to(compute)
        dq[:, :, start:stop] = torch.matmul(d_scores, keys_q) * scale
        d_keys += (torch.matmul(d_scores.transpose(-1, -2), q_rows) * scale).unflatten(1, (kv_heads, group)).sum(2)
    dk = _unpool(d_keys, pyramid, k_len)
    dv = _unpool(d_values, pyramid, k_len)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _unpool(d_columns: torch.Tensor, pyramid, k_len: int) -> torch.Tensor:
    """Gradients of the columns `[K_1 | K_2 | K_4 | K_8]` back to the `k_len` keys: a pooled token's
    gradient, divided by the keys it covers, goes to each of them."""
    total = torch.zeros_like(d_columns[:, :, :k_len])
    offset = 0
    for level, (k_level, _) in pyramid.items():
        count = k_level.shape[-2]
        part = d_columns[:, :, offset:offset + count]
        offset += count
        counts = reference.pool_counts(k_len, level, d_columns.device).to(part.dtype)
        total += (part / counts[:, None]).repeat_interleave(level, dim=2)[:, :, :k_len]
    return total
