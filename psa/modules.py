"""`PSAAttention`: the op as an `nn.Module`, for models that hold their attention as a submodule."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import layout as _layout
from .config import PSAConfig
from .ops import _config, _position_mask, sparse_attention


class PSAAttention(nn.Module):
    """`forward(q, k, v)` with q `[B, Hq, Lq, D]` and k, v `[B, Hkv, Lk, D]`, like SDPA.

    Given the latent `grid` (T, H, W) of the video tokens, the tokens are permuted into `order`
    (psa.layout: "gilbert", "tiled" or "raster") for the attention and the output is permuted back;
    `text_before` / `text_after` text tokens around the video stay in place and become forced keys and
    forced query rows, as in the diffusers integration.
    """

    def __init__(self, config: Optional[PSAConfig] = None, *, order: str = "gilbert",
                 tile: Sequence[int] = _layout.DEFAULT_TILE):
        super().__init__()
        if order not in _layout.ORDERS:
            raise ValueError(f"order must be one of {_layout.ORDERS}, got {order!r}")
        self.config = _config(config)
        self.order, self.tile = order, _layout.check_tile(tile)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                force_keys=None, force_queries=None, grid: Optional[Sequence[int]] = None, text_before: int = 0,
                text_after: int = 0) -> torch.Tensor:
        _layout.check_text_counts(text_before, text_after)
        if grid is None:
            if text_before or text_after:
                raise ValueError("text_before / text_after place text around the video tokens of a grid: "
                                 "give grid=(T, H, W) too")
            return sparse_attention(q, k, v, self.config, scale=scale, force_keys=force_keys,
                                    force_queries=force_queries)
        tokens = grid[0] * grid[1] * grid[2] + text_before + text_after
        if q.shape[2] != tokens or k.shape[2] != tokens:
            raise ValueError(f"grid {tuple(grid)} with {text_before} + {text_after} text tokens needs "
                             f"{tokens} query and key tokens, got {q.shape[2]} and {k.shape[2]}")
        order = _layout.get_layout(grid, self.order, tile=self.tile, text_before=text_before,
                                   text_after=text_after, device=q.device)
        text = _layout.text_positions(tokens, text_before, text_after, q.device)
        masks = []
        for name, positions in (("force_keys", force_keys), ("force_queries", force_queries)):
            mask = _position_mask(name, positions, tokens, q.device)
            if text is not None:
                mask = text if mask is None else mask | text
            masks.append(None if mask is None else order.permute(mask, dim=-1))   # positions move with tokens
        out = sparse_attention(*(order.permute(x, dim=2) for x in (q, k, v)), self.config, scale=scale,
                               force_keys=masks[0], force_queries=masks[1])
        return order.unpermute(out, dim=2)

    def extra_repr(self) -> str:
        return f"{self.config!r}, order={self.order!r}"
