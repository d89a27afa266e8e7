"""The backward of attention over a level map (docs/spec.md section 7), device-generic.

This is the reference backward: for each chunk of query rows it recomputes the section-3 attention of
those rows (`reference.attention_rows`, dense over the visible tokens of every level) and lets
autograd differentiate it, accumulating dq for the rows and the gradients of every pooled key and
value; one pass back through the pooling then spreads a pooled token's gradient over the tokens it
averages (divided by their count). Memory is bounded by the chunk (rows x all pyramid tokens per
head), time is that of dense attention over the pyramid: correct on any device, not fast. Fused
backward kernels (CPU, sm80, sm90) replace it later; the level map gets no gradient.
"""

from typing import Optional, Tuple

import torch

from . import reference

# Elements of one chunk's logits (batch x heads x rows x pyramid tokens) at most.
_CHUNK_ELEMENTS = 1 << 26


def attention_with_levels_backward(grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                                   q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *,
                                   block_m: int, block_n: int, scale: Optional[float],
                                   causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_with_levels(q, k, v, levels)` given the gradients of its `out` and
    `lse` (either may be None). Computed in float32 for 16-bit inputs, in the input dtype otherwise."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[-2]
    with torch.enable_grad():
        keys = k.detach().to(compute).requires_grad_(True)
        values = v.detach().to(compute).requires_grad_(True)
        pyramid = reference.kv_pyramid(keys, values)
        # The pooled tensors as leaves: every chunk adds into their gradients, and one pass through the
        # pooling at the end carries them to k and v.
        leaves = {level: (k_l.detach().requires_grad_(True), v_l.detach().requires_grad_(True))
                  for level, (k_l, v_l) in pyramid.items()}
        flat_leaves = [t for pair in leaves.values() for t in pair]
        leaf_grads = [torch.zeros_like(t) for t in flat_leaves]
        dq = torch.zeros_like(q, dtype=compute)
        tokens = sum(k_l.shape[-2] for k_l, _ in pyramid.values())
        rows_per_chunk = max(block_m, _CHUNK_ELEMENTS // max(1, batch * q_heads * tokens) // block_m * block_m)
        for start in range(0, q_len, rows_per_chunk):
            stop = min(q_len, start + rows_per_chunk)
            q_rows = q[:, :, start:stop].detach().to(compute).requires_grad_(True)
            out, lse = reference.attention_rows(q_rows, leaves, levels, start, q_len, k_len, block_m=block_m,
                                                block_n=block_n, scale=scale, causal=causal)
            outputs, grads = [], []
            if grad_out is not None:
                outputs.append(out)
                grads.append(grad_out[:, :, start:stop].to(compute))
            if grad_lse is not None:
                outputs.append(lse)
                grads.append(grad_lse[:, :, start:stop].to(lse.dtype))
            if not outputs:
                break
            chunk_grads = torch.autograd.grad(outputs, [q_rows, *flat_leaves], grads, allow_unused=True)
            dq[:, :, start:stop] = chunk_grads[0]
            for total, grad in zip(leaf_grads, chunk_grads[1:]):
                if grad is not None:
                    total.add_(grad)
        pooled = [t for pair in pyramid.values() for t in pair]
        dk, dv = torch.autograd.grad(pooled, [keys, values], leaf_grads, allow_unused=True)
    dk = torch.zeros_like(keys) if dk is None else dk
    dv = torch.zeros_like(values) if dv is None else dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
