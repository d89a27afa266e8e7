"""Density, coverage and level histogram of a level map (docs/spec.md section 3)."""

from __future__ import annotations

from typing import Optional

import torch

from .reference import LEVEL_VALUES, candidate_blocks


def level_stats(levels: torch.Tensor, *, causal: bool = False, q_len: Optional[int] = None,
                k_len: Optional[int] = None, block_m: Optional[int] = None,
                block_n: Optional[int] = None) -> dict:
    """`density` (mean of 1/level, skip counting 0), `sparsity`, `coverage` (fraction kept) and
    `histogram` (fraction of pairs at each level in {0, 1, 2, 4, 8}), over candidate pairs.

    Causal maps count only the pairs on or below the diagonal: from `q_len, k_len, block_m, block_n`
    when given, else assuming equal block sizes aligned at the bottom-right (`j <= i + n_k - n_q`).
    Returns Python floats, so it synchronises with the device: keep it off the hot path.
    """
    if not isinstance(levels, torch.Tensor) or levels.dtype != torch.int8 or levels.dim() < 2:
        raise ValueError("level_stats: levels must be an int8 level map [..., n_q, n_k], got "
                         + (f"{levels.dtype} of shape {tuple(levels.shape)}" if isinstance(levels, torch.Tensor)
                            else type(levels).__name__))
    known = torch.zeros_like(levels, dtype=torch.bool)
    for level in LEVEL_VALUES:
        known |= levels == level
    if not bool(known.all()):
        raise ValueError(f"level_stats: levels values must be in {tuple(LEVEL_VALUES)}, got "
                         f"{sorted(set(levels[~known].unique().tolist()))}")
    n_q, n_k = levels.shape[-2], levels.shape[-1]
    if not causal:
        candidates = torch.ones(n_q, n_k, dtype=torch.bool, device=levels.device)
    elif None not in (q_len, k_len, block_m, block_n):
        candidates = candidate_blocks(q_len, k_len, block_m, block_n, True, levels.device)
        if candidates.shape != (n_q, n_k):
            raise ValueError(f"level_stats: levels has {n_q}x{n_k} blocks but q_len/k_len/block_m/block_n give "
                             f"{tuple(candidates.shape)}")
    else:
        rows = torch.arange(n_q, device=levels.device)[:, None]
        candidates = torch.arange(n_k, device=levels.device)[None, :] <= rows + (n_k - n_q)
    values = levels.long()
    weight = candidates.expand_as(values)
    pairs = weight.sum().clamp(min=1).double()
    inverse = torch.where(values > 0, 1.0 / values.clamp(min=1).double(), 0.0)
    density = (inverse * weight).sum() / pairs
    histogram = {level: float(((values == level) & weight).sum() / pairs) for level in LEVEL_VALUES}
    return {
        "density": float(density),
        "sparsity": 1.0 - float(density),
        "coverage": 1.0 - histogram[0],
        "histogram": histogram,
    }


def counts_summary(counts) -> Optional[dict]:
    """`density`, `coverage` and `histogram` from pair counts per level in `LEVEL_VALUES` order (as the
    integrations keep them on the device), or None when nothing was counted."""
    counts = [float(c) for c in counts]
    total = sum(counts)
    if total == 0:
        return None
    histogram = {level: count / total for level, count in zip(LEVEL_VALUES, counts)}
    density = sum(fraction / level for level, fraction in histogram.items() if level)
    return {"density": density, "coverage": 1.0 - histogram[0], "histogram": histogram}
