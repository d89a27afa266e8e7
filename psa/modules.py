"""`PSAAttention`: the op as an `nn.Module`, for models that hold their attention as a submodule."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import PSAConfig
from .ops import sparse_attention


class PSAAttention(nn.Module):
    """`forward(q, k, v)` with q `[B, Hq, Lq, D]` and k, v `[B, Hkv, Lk, D]`, like SDPA."""

    def __init__(self, config: Optional[PSAConfig] = None):
        super().__init__()
        self.config = config if config is not None else PSAConfig()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                force_keys=None, force_queries=None) -> torch.Tensor:
        return sparse_attention(q, k, v, self.config, scale=scale, force_keys=force_keys,
                                force_queries=force_queries)

    def extra_repr(self) -> str:
        return repr(self.config)
