"""The backward of attention over a pyramid (docs/spec.md section 7), device-generic: the oracle.

`attention_with_levels` is `kv_pyramid` followed by `attention_over_pyramid`, so its gradient is theirs.
`attention_over_pyramid_backward` here, for each chunk of query rows, rebuilds the columns those rows see
(every level's visible tokens, `reference.pyramid_columns`) and applies

    P = softmax(S),  dP = dO V^T,  dS = P * (dP - delta + dlse),  delta = rowsum(dO * O),
    dq = scale dS K,  dK_cols += scale dS^T q,  dV_cols += P^T dO

then sums the query heads of each key head (GQA) and splits the columns' gradients by level: dK, dV of
the keys themselves and dK_l, dV_l of each pooled level. (The pyramid's own gradient, a pooled token's
gradient over its count spread back to the keys it covers, is the op `kv_pyramid_backward`; the tests
check it token by token.)

Plain tensor operations, so it runs on any device and `torch.compile` traces it; memory is bounded by the
chunk (rows x pyramid tokens), time is that of dense attention over the ~1.9 L pyramid tokens. It is the
oracle the tests hold `torch.ops.psa.attention_over_pyramid_backward` to (whose CPU kernel is C++, the
CUDA one fused: kernels/attention_backward.cuh). The level map gets no gradient.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from . import reference

# Elements of one chunk's logits (batch x query heads x rows x pyramid tokens) at most.
_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_over_pyramid_backward(grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    pooled: Sequence[torch.Tensor], levels: torch.Tensor, *, block_m: int,
                                    block_n: int, scale: Optional[float],
                                    causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """`(dq, dk, dv, [dk2, dv2, dk4, dv4, dk8, dv8])` of `attention_over_pyramid(q, k, v, *pooled, levels)`
    given the gradients of its `out` and `lse` (either may be None). Computed in float32 for 16-bit
    inputs, in the input dtype otherwise; each gradient is returned in its input's dtype."""
    compute = _compute_dtype(q.dtype)
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    pyramid = {1: (k.to(compute), v.to(compute))}
    for index, level in enumerate(reference.POOLED_LEVELS):
        pyramid[level] = (pooled[2 * index].to(compute), pooled[2 * index + 1].to(compute))
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
    # Split the columns [K_1 | K_2 | K_4 | K_8] back into the stage's inputs.
    counts = [k_l.shape[-2] for k_l, _ in pyramid.values()]
    d_keys_by_level, d_values_by_level = d_keys.split(counts, dim=2), d_values.split(counts, dim=2)
    d_pooled = []
    for index in range(len(reference.POOLED_LEVELS)):
        d_pooled.append(d_keys_by_level[index + 1].to(pooled[2 * index].dtype))
        d_pooled.append(d_values_by_level[index + 1].to(pooled[2 * index + 1].dtype))
    return (dq.to(q.dtype), d_keys_by_level[0].to(k.dtype), d_values_by_level[0].to(v.dtype), d_pooled)

