"""psa: Pyramid Sparse Attention for PyTorch.

Attention over a KV pyramid: each (query block, key block) pair sees the keys at full resolution,
pooled by 2, 4 or 8, or not at all, chosen from a cheap importance estimate. The ops live in
`torch.ops.psa`; this package adds typed wrappers, a config and a pure-PyTorch reference.
"""

from ._loader import load_library as _load_library

_load_library()

from . import layout, reference  # noqa: E402
from .config import PSAConfig  # noqa: E402
from .modules import PSAAttention  # noqa: E402
from .ops import (  # noqa: E402
    assign_levels,
    attention_over_pyramid,
    attention_with_levels,
    estimate_importance,
    estimate_levels,
    kv_pyramid,
    sparse_attention,
)
from .stats import level_stats  # noqa: E402

__all__ = [
    "PSAAttention",
    "PSAConfig",
    "assign_levels",
    "attention_over_pyramid",
    "attention_with_levels",
    "estimate_importance",
    "estimate_levels",
    "kv_pyramid",
    "layout",
    "level_stats",
    "reference",
    "sparse_attention",
]
__version__ = "0.1.0"
