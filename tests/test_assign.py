import pytest
import torch

import psa
from psa import PSAConfig, reference
from conftest import DEVICES

ROW = [0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.05]


def one_row(values, permutation=None):
    scores = torch.tensor(values, dtype=torch.float32)
    if permutation is not None:
        scores = scores[permutation]
    return scores.view(1, 1, 1, -1)


def assign(scores, config, **kwargs):
    kwargs.setdefault("q_len", scores.shape[2] * config.block_m)
    return psa.assign_levels(scores, config, **kwargs)[0, 0].tolist()


def test_threshold_keeps_the_crossing_block():
    # Mass ranked ahead: 0, .30, .50, .65, .75, .83, .90, .95. Block 1 reaches e1 = 0.5 and stays at level 1.
    config = PSAConfig(mode="threshold", bounds=(0.5, 0.6, 0.7, 0.8), min_full=0.0)
    assert assign(one_row(ROW), config) == [[1, 1, 2, 4, 8, 0, 0, 0]]


def test_threshold_ranks_by_score_not_position():
    permutation = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    config = PSAConfig(mode="threshold", bounds=(0.5, 0.6, 0.7, 0.8), min_full=0.0)
    expected = torch.tensor([1, 1, 2, 4, 8, 0, 0, 0])[permutation].tolist()
    assert assign(one_row(ROW, permutation), config) == [expected]


def test_topk_quotas():
    # m = 8: round(0.25*8)=2 at level 1, up to 4 at level 2, none at 4, up to 6 at level 8.
    config = PSAConfig(mode="topk", bounds=(0.25, 0.5, 0.5, 0.75), min_full=0.0)
    assert assign(one_row(ROW), config) == [[1, 1, 2, 2, 8, 8, 0, 0]]


def test_min_full_floor():
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 1.0), min_full=0.3)   # ceil(2.4) = 3
    assert assign(one_row(ROW), config) == [[1, 1, 1, 8, 8, 8, 8, 8]]
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 0.0), min_full=0.0)   # never below one block
    assert assign(one_row(ROW), config) == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_min_full_counts_exact_products_exactly():
    scores = torch.linspace(1.0, 0.5, 50).view(1, 1, 1, 50)
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 0.0), min_full=0.06, block_n=32)  # 0.06*50 = 3
    assert sum(level == 1 for level in assign(scores, config)[0]) == 3


def test_ties_go_to_the_lower_block_index():
    config = PSAConfig(mode="topk", bounds=(0.5, 0.5, 0.5, 0.5), min_full=0.0)
    assert assign(one_row([0.25] * 4), config) == [[1, 1, 0, 0]]


def test_causal_diagonal_and_sink():
    # 4 query and key blocks of 32 over 128 tokens; scores favour nothing in particular.
    scores = torch.full((1, 1, 4, 4), 0.25)
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 0.0), min_full=0.0, causal=True, block_m=32,
                       block_n=32)
    levels = assign(scores, config, q_len=128, k_len=128)
    assert levels == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    no_sink = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 0.0), min_full=0.0, causal=True, sink=False,
                        block_m=32, block_n=32)
    scores[..., 1] = 0.5   # the floor keeps the best candidate; the diagonal stays
    assert assign(scores, no_sink, q_len=128, k_len=128) == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0],
                                                             [0, 1, 0, 1]]


def test_causal_with_fewer_queries_than_keys():
    # Lq = 64, Lk = 128, bottom-right aligned: query block 0 (rows 0-31) sees keys up to 95.
    scores = torch.full((1, 1, 2, 4), 0.25)
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 0.0), min_full=0.0, causal=True, block_m=32,
                       block_n=32)
    assert assign(scores, config, q_len=64, k_len=128) == [[1, 0, 1, 0], [1, 0, 0, 1]]


def test_forced_key_and_query_positions():
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3).view(1, 1, 3, 4)
    config = PSAConfig(mode="topk", bounds=(0.25, 0.25, 0.25, 0.25), min_full=0.0, block_m=32, block_n=32)
    levels = assign(scores, config, q_len=96, force_keys=range(100, 110), force_queries=[40])
    assert levels == [[1, 0, 0, 1], [1, 1, 1, 1], [1, 0, 0, 1]]
    mask = torch.zeros(128, dtype=torch.bool)
    mask[100:110] = True
    assert assign(scores, config, q_len=96, force_keys=mask, force_queries=torch.tensor([40])) == levels


def test_similarity_cap():
    torch.manual_seed(0)
    dim, block = 16, 32
    smooth = torch.randn(1, 1, 4, dim).repeat_interleave(8, 2)     # block 0: groups of 8 identical keys
    pairs = torch.randn(1, 1, 16, dim).repeat_interleave(2, 2)     # block 1: identical pairs only
    noise = torch.randn(1, 1, 64, dim)                             # blocks 2 and 3: unrelated keys
    k = torch.cat([smooth, pairs, noise], dim=2)
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7]).view(1, 1, 1, 4)   # the one floor block is block 3
    config = PSAConfig(mode="topk", bounds=(0.0, 0.0, 0.0, 1.0), min_full=0.0, block_n=block, block_m=32,
                       sim_thresholds=(0.9, 0.9, 0.9))
    # Blocks 0-2 asked for level 8; the cap refines them to what their keys allow.
    assert assign(scores, config, k=k, q_len=32) == [[8, 2, 1, 1]]
    torch.testing.assert_close(reference.similarity_cap(k, block, (0.9, 0.9, 0.9))[0, 0], torch.tensor([8, 2, 1, 1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sim", [None, (0.05, 0.0, -0.05)])
def test_random_scores_match_reference(rng, device, mode, causal, sim):
    q_len, k_len, block_m, block_n = 700, 650, 64, 32
    scores = torch.rand(2, 4, 11, 21, generator=rng, dtype=torch.float64)
    scores = (scores ** 4).to(device)   # peaked rows, like real attention
    k = torch.randn(2, 2, k_len, 16, generator=rng).to(device)
    config = PSAConfig(mode=mode, bounds=(0.2, 0.4, 0.5, 0.8), causal=causal, block_m=block_m, block_n=block_n,
                       sim_thresholds=sim)
    keys = torch.rand(2, k_len, generator=rng) < 0.01
    levels = psa.assign_levels(scores, config, k=k, q_len=q_len, force_keys=keys.to(device))
    expected = reference.assign_levels(scores.cpu(), mode=mode, bounds=config.bounds, block_m=block_m,
                                       block_n=block_n, q_len=q_len, k_len=k_len, causal=causal, k=k.cpu(),
                                       sim_thresholds=sim, force_keys=keys)
    assert levels.dtype == torch.int8
    assert torch.equal(levels.cpu(), expected)
    assert torch.equal(levels, psa.assign_levels(scores, config, k=k, q_len=q_len, force_keys=keys.to(device)))


def test_topk_counts_per_row(rng):
    scores = torch.rand(1, 2, 5, 40, generator=rng)
    levels = psa.assign_levels(scores, PSAConfig(bounds=(0.1, 0.2, 0.3, 0.5), min_full=0.0, block_n=32))
    for level, count in ((1, 4), (2, 4), (4, 4), (8, 8), (0, 20)):
        assert ((levels == level).sum(-1) == count).all()


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_non_finite_scores_are_dense(rng, mode, causal):
    scores = torch.rand(2, 3, 4, 5, generator=rng, dtype=torch.float64)
    scores[0, 1, 2, 3] = float("nan")
    scores[1, 0, 1, 0] = float("inf")
    config = dict(mode=mode, bounds=(0.1, 0.2, 0.3, 0.4), block_m=32, block_n=32, q_len=128, k_len=160,
                  causal=causal)
    expected = reference.assign_levels(scores, **config)
    levels = psa.assign_levels(scores, psa.PSAConfig(**{key: config[key] for key in ("mode", "bounds", "block_m",
                                                                                        "block_n", "causal")}),
                               q_len=128, k_len=160)
    assert torch.equal(levels, expected)
    candidates = reference.candidate_blocks(128, 160, 32, 32, causal)
    assert (levels[0, 1, 2][candidates[2]] == 1).all() and (levels[1, 0, 1][candidates[1]] == 1).all()
    assert (levels[0, 0, 0] != 1).any()   # finite rows stay sparse


def test_overflowing_inputs_give_nan_like_sdpa_instead_of_an_error(rng):
    q = torch.randn(1, 2, 256, 32, generator=rng) * 1e30
    k = torch.randn(1, 2, 256, 32, generator=rng) * 1e30
    v = torch.randn(1, 2, 256, 32, generator=rng)
    out = psa.sparse_attention(q, k, v, psa.PSAConfig(block_m=64, block_n=64))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
