"""Token orders for video latents (docs/spec.md section 6).

Video tokens arrive in raster order of a latent grid `(T, H, W)`, width fastest. Pooling and blocks work
best when tokens that are neighbours in the sequence are neighbours in space-time, so psa can permute
q, k, v into one of these orders before attention and permute the output back:

- `"raster"`: the identity.
- `"gilbert"`: a generalized 3-D Hilbert curve that fills any `T x H x W` box, power of two or not,
  moving to a face-adjacent cell at almost every step.
- `"tiled"`: contiguous tiles of `tile = (t, h, w)` tokens (default 4 x 8 x 8) in raster order of
  tiles, raster order inside each tile; edge tiles may be smaller.

A `TokenLayout` holds one order as index tensors (the permutation and its exact inverse) on one device
and applies it as a single `index_select` per tensor. Text tokens before or after the video segment stay
where they are. Layouts are cached per (grid, order, tile, text counts, device), so building one is a
one-time cost and the hot path is one gather.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

ORDERS = ("raster", "gilbert", "tiled")
DEFAULT_TILE = (4, 8, 8)
Grid = Tuple[int, int, int]


def _check_grid(grid: Sequence[int], name: str = "grid") -> Grid:
    # torch.SymInt: sizes read from a tensor's shape under torch.compile(dynamic=True).
    if (not hasattr(grid, "__len__") or len(grid) != 3
            or any(isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1 for n in grid)):
        raise ValueError(f"{name} must be three positive ints (T, H, W), got {grid!r}")
    return tuple(grid)


def check_tile(tile: Sequence[int]) -> Grid:
    """The tiled order's tile: three positive ints (frames, rows, columns)."""
    return _check_grid(tile, "tile")


def check_text_counts(text_before: int, text_after: int) -> None:
    # torch.SymInt: counts derived from shapes under torch.compile(dynamic=True).
    for name, count in (("text_before", text_before), ("text_after", text_after)):
        if isinstance(count, bool) or not isinstance(count, (int, torch.SymInt)) or count < 0:
            raise ValueError(f"{name} must be a non-negative int (a number of text tokens), got {count!r}")


# --------------------------------------------------------------------------------------------------
# Generalized Hilbert curve
# --------------------------------------------------------------------------------------------------
# A box is an origin `p` and three edge vectors: `a` (the axis the curve travels along, start to end),
# `b` and `c`. The curve enters at `p` and leaves at `p + a - unit(a)`, so two boxes laid end to end
# along `a` join with a unit step. Boxes are split into halves along their long edges (a half of odd
# length is grown by one cell where the edge allows, which keeps the sub-curves' ends adjacent) and the
# halves are visited in the order of the 3-D Hilbert curve's octants, each with its edges rotated so
# that it ends where the next one starts.

def _unit(v: Tuple[int, int, int]) -> Tuple[int, int, int]:
    return tuple((x > 0) - (x < 0) for x in v)


def _length(v: Tuple[int, int, int]) -> int:
    return abs(v[0] + v[1] + v[2])   # edge vectors are axis-aligned: one nonzero component


def _add(*vectors):
    return tuple(sum(parts) for parts in zip(*vectors))


def _scale(v, k: int):
    return tuple(k * x for x in v)


def _half(v):
    """Half of an edge (rounded toward zero), grown to even length when the edge is longer than 2."""
    half = tuple(int(x / 2) for x in v)
    if _length(half) % 2 and _length(v) > 2:
        half = _add(half, _unit(v))
    return half


def _fill_box(out: List[Tuple[int, int, int]], p, a, b, c) -> None:
    w, h, d = _length(a), _length(b), _length(c)
    da, db, dc = _unit(a), _unit(b), _unit(c)
    # A line of cells: walk it.
    for length, step in ((w, da), (h, db), (d, dc)):
        if length == w * h * d:
            for i in range(length):
                out.append(_add(p, _scale(step, i)))
            return
    a2, b2, c2 = _half(a), _half(b), _half(c)
    rest_a, rest_b, rest_c = _add(a, _scale(a2, -1)), _add(b, _scale(b2, -1)), _add(c, _scale(c2, -1))
    neg = functools.partial(_scale, k=-1)
    if 2 * w > 3 * h and 2 * w > 3 * d:
        # Long along a: two boxes end to end.
        _fill_box(out, p, a2, b, c)
        _fill_box(out, _add(p, a2), rest_a, b, c)
    elif 3 * h > 4 * d:
        # Flat in c: a 2-D Hilbert step in the (a, b) plane, c carried along whole.
        _fill_box(out, p, b2, c, a2)
        _fill_box(out, _add(p, b2), a, rest_b, c)
        _fill_box(out, _add(p, _add(a, neg(da)), _add(b2, neg(db))), neg(b2), c, neg(rest_a))
    elif 3 * d > 4 * h:
        # Flat in b: the same step in the (a, c) plane.
        _fill_box(out, p, c2, a2, b)
        _fill_box(out, _add(p, c2), a, b, rest_c)
        _fill_box(out, _add(p, _add(a, neg(da)), _add(c2, neg(dc))), neg(c2), neg(rest_a), b)
    else:
        # The octant order of the 3-D Hilbert curve, with the eight octants merged into five boxes.
        _fill_box(out, p, b2, c2, a2)
        _fill_box(out, _add(p, b2), c, a2, rest_b)
        _fill_box(out, _add(p, _add(b2, neg(db)), _add(c, neg(dc))), a, neg(b2), neg(rest_c))
        _fill_box(out, _add(p, _add(a, neg(da)), b2, _add(c, neg(dc))), neg(c), neg(rest_a), rest_b)
        _fill_box(out, _add(p, _add(a, neg(da)), _add(b2, neg(db))), neg(b2), c2, neg(rest_a))


def gilbert_cells(grid: Sequence[int]) -> List[Tuple[int, int, int]]:
    """The `(t, h, w)` cells of `grid` in generalized-Hilbert order, starting at (0, 0, 0)."""
    t, h, w = _check_grid(grid)
    # The curve travels along the longest edge; the other two follow in (t, h, w) order.
    edges = sorted(((w, (0, 0, w)), (h, (0, h, 0)), (t, (t, 0, 0))), key=lambda e: -e[0])
    cells: List[Tuple[int, int, int]] = []
    _fill_box(cells, (0, 0, 0), edges[0][1], edges[1][1], edges[2][1])
    return cells


# --------------------------------------------------------------------------------------------------
# Orders as index tensors
# --------------------------------------------------------------------------------------------------

def raster_index(cells: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Raster positions (width fastest) of `(t, h, w)` rows."""
    _, h, w = grid
    return (cells[:, 0] * h + cells[:, 1]) * w + cells[:, 2]


@functools.lru_cache(maxsize=64)
def _order_cpu(grid: Grid, order: str, tile: Grid) -> torch.Tensor:
    t, h, w = grid
    if order == "raster":
        return torch.arange(t * h * w)
    if order == "gilbert":
        return raster_index(torch.tensor(gilbert_cells(grid), dtype=torch.long), grid)
    # Tiled: sort raster positions by (tile index, position inside the tile); one stable argsort.
    tt, th, tw = tile
    ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    tiles_h, tiles_w = math.ceil(h / th), math.ceil(w / tw)
    tile_index = ((ti // tt) * tiles_h + hi // th) * tiles_w + wi // tw
    inside = ((ti % tt) * th + hi % th) * tw + wi % tw
    key = (tile_index * (tt * th * tw) + inside).flatten()
    return torch.argsort(key, stable=True)


def token_order(grid: Sequence[int], order: str = "gilbert", tile: Sequence[int] = DEFAULT_TILE) -> torch.Tensor:
    """int64 `[T*H*W]` on the CPU: `order[i]` is the raster position of the i-th token in `order`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return _order_cpu(_check_grid(grid), order, _check_grid(tile, "tile")).clone()


@dataclass(frozen=True)
class TokenLayout:
    """A token order for a video segment of `T*H*W` tokens between `text_before` and `text_after` text
    tokens: `permute` moves raster order into `order`, `unpermute` moves it back."""

    grid: Grid
    order: str
    forward: torch.Tensor    # [L] permutation of the whole sequence (text positions map to themselves)
    inverse: torch.Tensor    # [L] its inverse

    @property
    def is_identity(self) -> bool:
        return self.order == "raster"

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        return x if self.is_identity else x.index_select(dim, self.forward)

    def unpermute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        return x if self.is_identity else x.index_select(dim, self.inverse)


@functools.lru_cache(maxsize=64)
def _permutation(grid: Grid, order: str, tile: Grid, text_before: int, text_after: int,
                 device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    video = _order_cpu(grid, order, tile)
    forward = torch.cat([torch.arange(text_before), text_before + video,
                         text_before + video.numel() + torch.arange(text_after)])
    inverse = torch.empty_like(forward)
    inverse[forward] = torch.arange(forward.numel())
    return forward.to(device), inverse.to(device)


# Under torch.compile the permutation is one opaque op: dynamo would otherwise trace the curve's Python
# construction token by token. Eager calls hit the cache above and copy on the device. (Its own
# namespace: torch.ops.psa holds the attention op family only.)
# The grid and text counts are SymInts in the schema, so symbolic sizes pass through unspecialised.
@torch.library.custom_op("psa_layout::token_permutation", mutates_args=(),
                         schema="(SymInt[] grid, str order, int[] tile, SymInt text_before, SymInt text_after, "
                                "Device device) -> (Tensor, Tensor)")
def _token_permutation(grid: List[int], order: str, tile: List[int], text_before: int, text_after: int,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    forward, inverse = _permutation(tuple(grid), order, tuple(tile), text_before, text_after, str(device))
    return forward.clone(), inverse.clone()


@_token_permutation.register_fake
def _token_permutation_fake(grid, order, tile, text_before, text_after, device):
    tokens = grid[0] * grid[1] * grid[2] + text_before + text_after
    return (torch.empty(tokens, dtype=torch.long, device=device),
            torch.empty(tokens, dtype=torch.long, device=device))


@functools.lru_cache(maxsize=64)
def _layout(grid: Grid, order: str, tile: Grid, text_before: int, text_after: int, device: str) -> TokenLayout:
    forward, inverse = _token_permutation(list(grid), order, list(tile), text_before, text_after,
                                          torch.device(device))
    return TokenLayout(grid, order, forward, inverse)


def get_layout(grid: Sequence[int], order: str = "gilbert", *, tile: Sequence[int] = DEFAULT_TILE,
               text_before: int = 0, text_after: int = 0, device="cpu") -> TokenLayout:
    """The cached `TokenLayout` of `grid` in `order` for sequences `[text_before | video | text_after]`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_text_counts(text_before, text_after)
    grid, tile = _check_grid(grid), _check_grid(tile, "tile")
    if torch.compiler.is_compiling():
        # Traced: the op is one node of the graph, and the sizes may be symbolic (no cache keyed on them).
        forward, inverse = _token_permutation(list(grid), order, list(tile), text_before, text_after,
                                              torch.device(device))
        return TokenLayout(grid, order, forward, inverse)
    return _layout(grid, order, tile, text_before, text_after, str(torch.device(device)))


def text_positions(length: int, text_before: int = 0, text_after: int = 0, device="cpu"):
    """bool `[length]` marking the text tokens before and after the video segment (psa forces them as
    keys and query rows), or None when there are none."""
    if not text_before and not text_after:
        return None
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    mask[:text_before] = True
    mask[length - text_after:] = True
    return mask


def neighbour_distance(grid: Sequence[int], order: str = "gilbert", tile: Sequence[int] = DEFAULT_TILE):
    """(mean, max) Euclidean distance in the grid between tokens that are consecutive in `order`."""
    t, h, w = _check_grid(grid)
    index = token_order(grid, order, tile)
    cells = torch.stack([index // (h * w), index // w % h, index % w], dim=1).double()
    steps = (cells[1:] - cells[:-1]).norm(dim=1)
    return (steps.mean().item(), steps.max().item()) if steps.numel() else (0.0, 0.0)
