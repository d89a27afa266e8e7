"""psa against dense attention, and against binary block-sparse attention at the same density.

    rows = psa.tools.evaluate(captures, {"default": psa.PSAConfig(), "wide": wide_config})
    print(psa.tools.format_table(rows))

For every captured call and config: the level map psa assigns, its density and coverage, and the error
of psa's output against dense attention on the same inputs (relative L2 and cosine similarity, per
head: mean and worst over heads and captures). Beside it the binary baseline: the same estimator, level
1 or skip only, `round(density * candidates)` blocks per row, so it spends the same compute. With
`without_reorder=True`, also psa on the tokens in raster order.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import layout as _layout
from ..config import PSAConfig
from ..ops import sparse_attention
from ..stats import level_stats
from .capture import Capture


def binary_config(config: PSAConfig, density: float) -> PSAConfig:
    """Keep/drop blocks with `config`'s estimator: the top `density` fraction of each row at level 1."""
    return dataclasses.replace(config, mode="topk", bounds=(density,) * 4, min_full=0.0, sim_thresholds=None)


def _dense(q, k, v, scale=None):
    """Dense attention in float32 (float64 for float64 inputs), the reference the errors refer to."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale)


def _per_head_errors(out: torch.Tensor, dense: torch.Tensor):
    """(relative L2, cosine) per (batch, head), flattened over tokens and features."""
    out, dense = out.to(dense.dtype).flatten(2), dense.flatten(2)
    rel = (out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12)
    cos = F.cosine_similarity(out, dense, dim=-1)
    return rel.flatten(), cos.flatten()


def _run(capture: Capture, config: PSAConfig, order: str, device):
    q, k, v = (t.to(device) for t in (capture.q, capture.k, capture.v))
    if capture.grid is not None and order != "raster":
        perm = _layout.get_layout(capture.grid, order, text_before=capture.text_before,
                                  text_after=capture.text_after, device=q.device)
        q, k, v = (perm.permute(t, dim=2) for t in (q, k, v))
    else:
        perm = None
    forced = _layout.text_positions(q.shape[2], capture.text_before, capture.text_after, q.device)
    out, levels = sparse_attention(q, k, v, config, force_keys=forced, force_queries=forced, return_levels=True)
    if perm is not None:
        out = perm.unpermute(out, dim=2)
    return out, level_stats(levels, causal=config.causal, q_len=q.shape[2], k_len=k.shape[2],
                                   block_m=config.block_m, block_n=config.block_n)


def evaluate(captures: Sequence[Capture], configs: Union[PSAConfig, Mapping[str, PSAConfig]], *,
             baseline: bool = True, without_reorder: bool = False, order: str = "gilbert",
             device: Optional[Union[str, torch.device]] = None, dense_cache: Optional[dict] = None) -> List[Dict]:
    """One row per (config, variant): variant "psa", "binary" (baseline) and "psa raster" (without
    reorder). Each row: density, coverage, rel_l2 and cosine (mean and worst over heads and captures).

    `device`: where to run (default: each capture's device). `dense_cache`: a dict that keeps the dense
    reference outputs between calls on the same captures and device (calibrate passes one, so its
    bisection computes dense attention once per capture, not once per step)."""
    if isinstance(configs, PSAConfig):
        configs = {"config": configs}
    if not captures:
        raise ValueError("evaluate needs at least one capture")
    if order not in _layout.ORDERS:
        raise ValueError(f"order must be one of {_layout.ORDERS}, got {order!r}")
    rows = []
    denses = {} if dense_cache is None else dense_cache
    for name, config in configs.items():
        variants = {"psa": []}
        for i, capture in enumerate(captures):
            target = device or capture.q.device
            key = (id(capture), str(target))
            if key not in denses:   # the dense reference of a capture serves every config and variant
                denses[key] = _dense(*(t.to(target) for t in (capture.q, capture.k, capture.v)))
            dense = denses[key]
            out, stats = _run(capture, config, order, target)
            variants["psa"].append((stats, *_per_head_errors(out, dense)))
            if baseline:
                binary = binary_config(config, stats["density"])
                out_b, stats_b = _run(capture, binary, order, target)
                variants.setdefault("binary", []).append((stats_b, *_per_head_errors(out_b, dense)))
            if without_reorder:
                out_r, stats_r = _run(capture, config, "raster", target)
                variants.setdefault("psa raster", []).append((stats_r, *_per_head_errors(out_r, dense)))
        for variant, results in variants.items():
            rel = torch.cat([r[1] for r in results])
            cos = torch.cat([r[2] for r in results])
            rows.append(dict(config=name, variant=variant,
                             density=sum(r[0]["density"] for r in results) / len(results),
                             coverage=sum(r[0]["coverage"] for r in results) / len(results),
                             rel_l2_mean=rel.mean().item(), rel_l2_worst=rel.max().item(),
                             cosine_mean=cos.mean().item(), cosine_worst=cos.min().item()))
    return rows


def format_table(rows: List[Dict]) -> str:
    """The rows of `evaluate` as a Markdown table."""
    columns = ("config", "variant", "density", "coverage", "rel_l2_mean", "rel_l2_worst", "cosine_mean",
               "cosine_worst")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.4f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
