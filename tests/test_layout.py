"""Token orders (psa.layout): bijections with exact inverses, locality, text tokens left in place."""

import itertools

import pytest
import torch

from psa import layout
from conftest import randn

ODD_GRIDS = [(21, 30, 52), (13, 45, 80), (31, 22, 40), (3, 5, 7), (1, 9, 4), (2, 1, 1)]


@pytest.mark.parametrize("grid", ODD_GRIDS)
@pytest.mark.parametrize("order", layout.ORDERS)
def test_orders_are_bijections_with_exact_inverses(grid, order):
    tokens = grid[0] * grid[1] * grid[2]
    index = layout.token_order(grid, order)
    assert index.dtype == torch.long and torch.equal(torch.sort(index).values, torch.arange(tokens))
    result = layout.get_layout(grid, order, text_before=3, text_after=5)
    assert torch.equal(result.forward[result.inverse], torch.arange(tokens + 8))
    assert torch.equal(result.inverse[result.forward], torch.arange(tokens + 8))


@pytest.mark.parametrize("grid", ODD_GRIDS)
def test_gilbert_moves_to_a_neighbouring_cell_at_every_step(grid):
    cells = torch.tensor(layout.gilbert_cells(grid))
    assert tuple(cells[0].tolist()) == (0, 0, 0)
    if len(cells) > 1:
        steps = (cells[1:] - cells[:-1]).abs()
        # Face neighbours, except an occasional diagonal step that odd sizes force.
        assert steps.max() <= 1 and steps.sum(1).max() <= 2
        assert (steps.sum(1) == 1).float().mean() > 0.95


@pytest.mark.parametrize("side", [2, 4, 8])
def test_gilbert_of_a_power_of_two_cube_is_a_hilbert_curve(side):
    cells = torch.tensor(layout.gilbert_cells((side, side, side)))
    assert ((cells[1:] - cells[:-1]).abs().sum(1) == 1).all()   # only face steps
    # Hilbert property: every aligned sub-cube of side s (a power of two) is one contiguous run.
    for s in (2, side // 2):
        if s >= 2 and s < side:
            cube = (cells // s).tolist()
            runs = [key for key, _ in itertools.groupby(map(tuple, cube))]
            assert len(runs) == (side // s) ** 3


def test_tiled_order_matches_a_loop_over_tiles():
    grid, tile = (5, 9, 10), (2, 4, 4)
    expected = []
    for t0, h0, w0 in itertools.product(range(0, 5, 2), range(0, 9, 4), range(0, 10, 4)):
        for t, h, w in itertools.product(range(t0, min(t0 + 2, 5)), range(h0, min(h0 + 4, 9)),
                                         range(w0, min(w0 + 4, 10))):
            expected.append((t * 9 + h) * 10 + w)
    assert layout.token_order(grid, "tiled", tile).tolist() == expected


def test_locality_ranks_gilbert_then_tiled_then_raster():
    grid = (21, 30, 52)
    raster, tiled, gilbert = (layout.neighbour_distance(grid, order)[0] for order in ("raster", "tiled", "gilbert"))
    assert gilbert < 1.01 < tiled < raster


def test_permute_keeps_text_tokens_and_round_trips(rng):
    grid = (3, 4, 5)
    result = layout.get_layout(grid, "gilbert", text_before=2, text_after=3)
    x = randn(rng, 2, 4, 2 + 60 + 3, 8)
    moved = result.permute(x)
    assert torch.equal(moved[:, :, :2], x[:, :, :2]) and torch.equal(moved[:, :, -3:], x[:, :, -3:])
    video = layout.token_order(grid, "gilbert")
    assert torch.equal(moved[:, :, 2:62], x[:, :, 2:62][:, :, video])
    assert torch.equal(result.unpermute(moved), x)
    # Any dim: [B, L, H, D] as diffusers holds it.
    assert torch.equal(result.unpermute(result.permute(x.transpose(1, 2), dim=1), dim=1), x.transpose(1, 2))


def test_layouts_are_cached_per_device():
    first = layout.get_layout((4, 6, 8), "tiled", tile=(2, 2, 2))
    assert layout.get_layout((4, 6, 8), "tiled", tile=(2, 2, 2)) is first
    assert first.forward.device.type == "cpu"
    raster = layout.get_layout((4, 6, 8), "raster")
    x = torch.randn(1, 2, 192, 4)
    assert raster.is_identity and raster.permute(x) is x and raster.unpermute(x) is x


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(0, 4, 4)), "grid"), (dict(grid=(4, 4)), "grid"), (dict(grid=(4, 4.0, 4)), "grid"),
    (dict(grid=(4, 4, 4), order="hilbert"), "order"), (dict(grid=(4, 4, 4), tile=(0, 8, 8)), "tile"),
    (dict(grid=(4, 4, 4), text_before=-1), "text_before"), (dict(grid=(4, 4, 4), text_after=1.5), "text_after"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layout.get_layout(**kwargs)


def test_permutation_op_passes_opcheck_and_compiles():
    # Under torch.compile the permutation is one opaque op (psa_layout::token_permutation), so dynamo
    # never traces the curve construction.
    op = torch.ops.psa_layout.token_permutation.default
    torch.library.opcheck(op, ([3, 4, 5], "gilbert", [4, 8, 8], 2, 3, torch.device("cpu")), {},
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def move(x):
        return layout.get_layout((3, 4, 5), "gilbert", text_before=2).permute(x)

    x = torch.randn(1, 2, 62, 4)
    torch.testing.assert_close(torch.compile(move, fullgraph=True)(x), move(x))
