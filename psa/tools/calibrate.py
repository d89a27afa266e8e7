"""Search a config: the least error at a target density, or the least density at a target error.

    config = psa.tools.calibrate(captures, target_density=0.15)
    open("psa_wan.json", "w").write(config.to_json())

The search space is a family of level mixes ("shapes"): a shape gives the relative share of the kept
blocks at levels 1, 2, 4, 8; a scale `s` turns it into cumulative bounds `s * cumsum(shape)`. In
`topk` mode the bounds are fractions of blocks, in `threshold` mode fractions of score mass; in both
the measured density grows with `s`, so a bisection on `s` meets the target for each shape, and the
shape with the least error (or least density) wins. `per_layer=True` calibrates each captured layer
on its own captures and returns `{layer: PSAConfig}`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ..config import PSAConfig
from .capture import Capture
from .evaluate import evaluate

# Shares of the kept blocks at levels (1, 2, 4, 8). The first is the default mix of PSAConfig.
DEFAULT_SHAPES: Tuple[Tuple[float, float, float, float], ...] = (
    (0.10 / 0.35, 0.05 / 0.35, 0.0, 0.20 / 0.35),
    (0.5, 0.5, 0.0, 0.0),
    (0.4, 0.2, 0.2, 0.2),
    (0.25, 0.25, 0.25, 0.25),
    (0.3, 0.0, 0.0, 0.7),
    (1.0, 0.0, 0.0, 0.0),
)


def _config_for(base: PSAConfig, mode: str, shape, scale: float) -> PSAConfig:
    total, bounds = 0.0, []
    for share in shape:
        total += share
        bounds.append(min(1.0, scale * total))
    return dataclasses.replace(base, mode=mode, bounds=tuple(bounds))


def _measure(captures, config, order, device, dense_cache):
    row = evaluate(captures, config, baseline=False, order=order, device=device, dense_cache=dense_cache)[0]
    return row["density"], row["rel_l2_mean"]


def _bisect(captures, base, mode, shape, order, target_density, target_error, tolerance, iterations, measure):
    """The scale meeting the target for one shape: (config, density, error), or None if unreachable."""
    low, high = 0.0, 1.0 / max(1e-9, sum(shape))    # high keeps every bound at 1: the densest of the shape
    best = None
    for _ in range(iterations):
        middle = (low + high) / 2
        config = _config_for(base, mode, shape, middle)
        density, error = measure(captures, config, order)
        if target_density is not None:
            if abs(density - target_density) <= tolerance:
                return config, density, error
            low, high = (middle, high) if density < target_density else (low, middle)
        else:
            if error <= target_error:
                best = (config, density, error)
                high = middle                      # meets the error: try sparser
            else:
                low = middle
    if target_density is None and best is None:
        config = _config_for(base, mode, shape, high)
        density, error = measure(captures, config, order)
        best = (config, density, error) if error <= target_error else None
    return best


def _calibrate_one(captures, target_density, target_error, base, mode, shapes, order, tolerance, iterations,
                   measure):
    results = []
    for shape in shapes:
        found = _bisect(captures, base, mode, shape, order, target_density, target_error, tolerance, iterations,
                        measure)
        if found is not None:
            results.append(found)
    if not results:
        goal = f"density {target_density} +- {tolerance}" if target_density is not None else f"error {target_error}"
        raise ValueError(f"calibrate: no shape reached {goal}; widen the tolerance or add shapes")
    key = (lambda r: r[2]) if target_density is not None else (lambda r: (r[1], r[2]))
    return min(results, key=key)[0]


def calibrate(captures: Sequence[Capture], *, target_density: Optional[float] = None,
              target_error: Optional[float] = None, mode: str = "topk", base: Optional[PSAConfig] = None,
              shapes: Sequence[Sequence[float]] = DEFAULT_SHAPES, order: str = "gilbert",
              tolerance: float = 0.01, iterations: int = 20, per_layer: bool = False,
              device: Optional[Union[str, torch.device]] = None) -> Union[PSAConfig, Dict[int, PSAConfig]]:
    """Give exactly one of `target_density` (least mean relative L2 error within `tolerance` of it) or
    `target_error` (least density whose mean relative L2 error is at most it). `base` supplies the
    fields that are not searched (block sizes, estimator, similarity cap...). `device`: where psa and
    the dense reference run (default: each capture's device, the CPU for saved captures; a GPU is much
    faster at real sizes). The dense reference of each capture is computed once for the whole search."""
    if (target_density is None) == (target_error is None):
        raise ValueError("calibrate needs exactly one of target_density and target_error")
    if target_density is not None and not 0.0 < target_density <= 1.0:
        raise ValueError(f"target_density must lie in (0, 1], got {target_density}")
    if target_error is not None and not target_error > 0.0:
        raise ValueError(f"target_error must be positive, got {target_error}")
    if mode not in ("topk", "threshold"):
        raise ValueError(f"mode must be 'topk' or 'threshold', got {mode!r}")
    if not captures:
        raise ValueError("calibrate needs at least one capture")
    base = PSAConfig() if base is None else base
    dense_cache = {}

    def measure(group, config, order):
        return _measure(group, config, order, device, dense_cache)

    args = (target_density, target_error, base, mode, [tuple(s) for s in shapes], order, tolerance, iterations,
            measure)
    if not per_layer:
        return _calibrate_one(list(captures), *args)
    by_layer = defaultdict(list)
    for capture in captures:
        by_layer[capture.layer].append(capture)
    return {layer: _calibrate_one(group, *args) for layer, group in sorted(by_layer.items())}


def configs_to_json(configs: Dict[int, PSAConfig]) -> str:
    """A per-layer mapping as JSON: `{"<layer>": <PSAConfig JSON object>}`."""
    return json.dumps({str(layer): json.loads(config.to_json()) for layer, config in sorted(configs.items())},
                      indent=2)


def configs_from_json(text: str) -> Dict[int, PSAConfig]:
    """The mapping `configs_to_json` wrote; `psa.integrations.diffusers.apply` accepts it as `config`."""
    return {int(layer): PSAConfig.from_json(json.dumps(fields)) for layer, fields in json.loads(text).items()}
