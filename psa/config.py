"""`PSAConfig`: every knob of the pipeline, validated once at construction."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Tuple

BLOCK_SIZES = (32, 64, 128)
MODES = ("topk", "threshold")
ESTIMATORS = ("sampled", "antidiagonal", "pooled")
ESTIMATE_PRECISIONS = ("full", "fp8")
LEVELS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class PSAConfig:
    """Configuration of pyramid sparse attention (see the spec, sections 4 and 5).

    bounds are the cumulative ends ``(e1, e2, e4, e8)`` of levels 1, 2, 4 and 8: in ``topk`` mode
    fractions of the candidate blocks of a row, in ``threshold`` mode fractions of its score mass.
    The defaults give density 0.15 and coverage 0.35 in ``topk`` mode:
    ``0.10 * 1 + 0.05 / 2 + 0 / 4 + 0.20 / 8``.
    """

    block_m: int = 128
    block_n: int = 128
    mode: str = "topk"
    bounds: Tuple[float, float, float, float] = (0.10, 0.15, 0.15, 0.35)
    estimator: str = "sampled"
    min_full: float = 0.06
    sim_thresholds: Optional[Tuple[float, float, float]] = None
    causal: bool = False
    # Causal only: keep the first key block (the attention sink) at level 1.
    sink: bool = True
    # Antidiagonal estimator only: side of the tiles whose antidiagonals are summed.
    stride: int = 8
    # Antidiagonal estimator only: "fp8" quantizes Q and K to float8 e4m3 (a scale per group of `stride`
    # tokens) before the anti-logits, an opt-in approximation for the FP8 tensor cores (docs/spec.md
    # section 4); "full" computes them at the inputs' precision.
    estimate_precision: str = "full"

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCK_SIZES:
                raise ValueError(f"PSAConfig.{name} must be an int, one of {BLOCK_SIZES}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"PSAConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"PSAConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        object.__setattr__(self, "bounds", _float_tuple("bounds", self.bounds, 4))
        if any(not 0.0 <= b <= 1.0 for b in self.bounds):
            raise ValueError(f"PSAConfig.bounds must lie in [0, 1], got {self.bounds}")
        if any(a > b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"PSAConfig.bounds must be non-decreasing (e1 <= e2 <= e4 <= e8), got {self.bounds}")
        if not _is_real(self.min_full) or not 0.0 <= self.min_full <= 1.0:
            raise ValueError(f"PSAConfig.min_full must be a number in [0, 1], got {self.min_full!r}")
        if self.sim_thresholds is not None:
            object.__setattr__(self, "sim_thresholds", _float_tuple("sim_thresholds", self.sim_thresholds, 3))
            if any(not -1.0 <= t <= 1.0 for t in self.sim_thresholds):
                raise ValueError(f"PSAConfig.sim_thresholds must lie in [-1, 1] (cosine similarities), "
                                 f"got {self.sim_thresholds}")
        for name in ("causal", "sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PSAConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.estimate_precision not in ESTIMATE_PRECISIONS:
            raise ValueError(f"PSAConfig.estimate_precision must be one of {ESTIMATE_PRECISIONS}, "
                             f"got {self.estimate_precision!r}")
        if self.estimate_precision != "full" and self.estimator != "antidiagonal":
            raise ValueError(f"PSAConfig.estimate_precision {self.estimate_precision!r} applies to the "
                             f"'antidiagonal' estimator only, got estimator {self.estimator!r}")
        smallest_block = min(self.block_m, self.block_n)
        if (isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1
                or smallest_block % self.stride != 0):
            raise ValueError(f"PSAConfig.stride must be a positive divisor of block_m and block_n "
                             f"(<= {smallest_block}), got {self.stride!r}")

    @classmethod
    def dense(cls, **overrides) -> "PSAConfig":
        """Every block at level 1: dense attention computed by psa's kernels (a baseline, or a layer
        that must stay exact in a per-layer mapping)."""
        return cls(**{"bounds": (1.0, 1.0, 1.0, 1.0), "mode": "topk", **overrides})

    @property
    def nominal_density(self) -> float:
        """Density a ``topk`` config asks for before the floor, forced blocks and the cap."""
        edges = (0.0,) + tuple(self.bounds)
        return sum((hi - lo) / level for lo, hi, level in zip(edges, edges[1:], LEVELS))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PSAConfig":
        return cls(**json.loads(text))


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _float_tuple(name: str, values, length: int) -> tuple:
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a numpy array or a tensor
        values = values.tolist()
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"PSAConfig.{name} must be a sequence of {length} numbers, got {values!r}") from None
    if len(items) != length or not all(_is_real(v) for v in items):
        raise ValueError(f"PSAConfig.{name} must be a sequence of {length} finite numbers, got {values!r}")
    return tuple(float(v) for v in items)
