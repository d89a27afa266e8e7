"""Pure-PyTorch reference of every psa stage (the spec, written as tensor code).

Tests and users share this oracle. Each function computes in the dtype of its inputs (pass float64
tensors for a float64 reference, bf16 tensors for the "same reference in the input dtype" of the
tolerance rule) and favours the plainest formulation over speed: attention is built as one dense
masked softmax over the concatenation of all pyramid levels, so it shares no code path with the
block-gathering kernels it checks.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .config import ESTIMATE_PRECISIONS

POOLED_LEVELS = (2, 4, 8)
LEVEL_VALUES = (0, 1, 2, 4, 8)

# Slack for the floor `ceil(min_full * m)` and the quotas `round(e * m)`, so that products such as
# 0.06 * 50 = 3.0000000000000004 count as the integer they denote. Shared with the C++ backend.
COUNT_EPS = 1e-9


# --------------------------------------------------------------------------------------------------
# Section 2: KV pyramid
# --------------------------------------------------------------------------------------------------

def pool_counts(length: int, level: int, device=None) -> torch.Tensor:
    """`c_l[t]`: how many original positions pooled token `t` covers (int64 `[ceil(length/level)]`)."""
    starts = torch.arange(0, length, level, device=device)
    return torch.clamp(length - starts, max=level)


def pool_tokens(x: torch.Tensor, level: int) -> torch.Tensor:
    """Mean of `x` over groups of `level` consecutive positions along dim -2, real positions only.

    Accumulates in float32 (float64 for float64 input) and rounds once to `x.dtype`.
    """
    length = x.shape[-2]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_tokens = -(-length // level)
    padded = torch.nn.functional.pad(x.to(acc_dtype), (0, 0, 0, n_tokens * level - length))
    sums = padded.unflatten(-2, (n_tokens, level)).sum(-2)
    counts = pool_counts(length, level, x.device).to(acc_dtype)
    return (sums / counts[:, None]).to(x.dtype)


def kv_pyramid(k: torch.Tensor, v: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """`{l: (K_l, V_l)}` for l in 1, 2, 4, 8; level 1 is the input itself."""
    pyramid = {1: (k, v)}
    for level in POOLED_LEVELS:
        pyramid[level] = (pool_tokens(k, level), pool_tokens(v, level))
    return pyramid


# --------------------------------------------------------------------------------------------------
# Section 3: attention with a level map
# --------------------------------------------------------------------------------------------------

def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def candidate_blocks(q_len: int, k_len: int, block_m: int, block_n: int, causal: bool,
                     device=None) -> torch.Tensor:
    """bool `[n_q, n_k]`: key blocks a query block may attend to.

    Causal (bottom-right aligned, offset `k_len - q_len`): block `j` is a candidate of block `i` when
    its first key is visible to the last query of block `i`.
    """
    n_q, n_k = num_blocks(q_len, block_m), num_blocks(k_len, block_n)
    if not causal:
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    last_query = torch.clamp(torch.arange(1, n_q + 1, device=device) * block_m, max=q_len) - 1
    first_key = torch.arange(n_k, device=device) * block_n
    return first_key[None, :] <= (last_query + k_len - q_len)[:, None]


def repeat_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """`[B, Hkv, ...]` to `[B, Hq, ...]`: each key/value head repeated for the query heads of its group."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def attention_with_levels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *,
                          block_m: int, block_n: int, scale: Optional[float] = None,
                          causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spec section 3 as one dense masked softmax. Returns `(out [B,Hq,Lq,D], lse float32 [B,Hq,Lq])`.

    Columns are the tokens of all levels side by side `[K_1 | K_2 | K_4 | K_8]`; token `t` of level `l`
    is visible to row `r` iff `levels[r // block_m, key block of t] == l` (and, causal, its last covered
    position is visible), and carries the logit bias `ln c_l[t]`.
    """
    out, lse = attention_rows(q, kv_pyramid(k, v), levels, 0, q.shape[-2], k.shape[-2], block_m=block_m,
                              block_n=block_n, scale=scale, causal=causal)
    return out, lse.float()


def pyramid_columns(pyramid: Dict[int, Tuple[torch.Tensor, torch.Tensor]], levels: torch.Tensor, rows: torch.Tensor,
                    q_len: int, k_len: int, *, block_m: int, block_n: int, causal: bool):
    """The key columns `[K_1 | K_2 | K_4 | K_8]` that query `rows` (absolute positions) see: `(keys,
    values [B, Hkv, T, D], bias [T] (ln of the keys a token covers), visible bool [B, Hq, rows, T])`."""
    device = rows.device
    row_blocks = levels.long()[:, :, rows // block_m, :]                      # [B, Hq, rows, n_k]
    keys, values, biases, visible = [], [], [], []
    for level, (k_level, v_level) in pyramid.items():
        counts = pool_counts(k_len, level, device)
        tokens = torch.arange(counts.numel(), device=device)
        token_block = tokens * level // block_n
        last_position = tokens * level + counts - 1
        mask = row_blocks[..., token_block] == level                           # [B, Hq, rows, T_l]
        if causal:
            mask = mask & (last_position[None, :] <= rows[:, None] + (k_len - q_len))
        keys.append(k_level)
        values.append(v_level)
        biases.append(torch.log(counts.to(k_level.dtype)))
        visible.append(mask)
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), torch.cat(biases), torch.cat(visible, dim=-1)


def masked_logits(q_rows: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, visible: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(logits, empty_row)` for `keys` with q's heads: scaled logits plus bias, -inf where not visible;
    a row that sees no key gets logits 0 (not all -inf), so neither value nor gradient becomes NaN, and
    is flagged."""
    logits = torch.matmul(q_rows, keys.transpose(-1, -2)) * scale + bias
    empty_row = ~visible.any(-1, keepdim=True)
    return logits.masked_fill(~visible & ~empty_row, float("-inf")).masked_fill(empty_row, 0.0), empty_row


def attention_rows(q_rows: torch.Tensor, pyramid: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                   levels: torch.Tensor, row_start: int, q_len: int, k_len: int, *, block_m: int, block_n: int,
                   scale: Optional[float] = None, causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Section 3 for the query rows `[row_start, row_start + q_rows.shape[-2])` of a `q_len`-row query
    over a pyramid (`kv_pyramid`) of `k_len` keys: `(out, lse)`; a row that sees no key gets zeros and
    lse -inf."""
    scale = q_rows.shape[-1] ** -0.5 if scale is None else scale
    rows = torch.arange(row_start, row_start + q_rows.shape[-2], device=q_rows.device)
    keys, values, bias, visible = pyramid_columns(pyramid, levels, rows, q_len, k_len, block_m=block_m,
                                                  block_n=block_n, causal=causal)
    q_heads = q_rows.shape[1]
    logits, empty_row = masked_logits(q_rows, repeat_kv_heads(keys, q_heads), bias.to(q_rows.dtype), visible, scale)
    lse = torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    lse = lse.masked_fill(empty_row[..., 0], float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(empty_row, 0.0)
    out = torch.matmul(probs, repeat_kv_heads(values, q_heads))
    return out, lse


# --------------------------------------------------------------------------------------------------
# Section 4: block importance
# --------------------------------------------------------------------------------------------------

def default_sample_offsets(block: int, device=None) -> torch.Tensor:
    """`block // 4` evenly strided offsets, each in the middle of its stride."""
    count = block // 4
    step = block // count
    return torch.arange(count, device=device) * step + step // 2


def _sample_block_rows(x: torch.Tensor, block: int, offsets: torch.Tensor) -> torch.Tensor:
    """`[B, H, n_blocks, s, D]`: rows `j*block + offsets` of every block, clamped into the last one."""
    length = x.shape[-2]
    starts = torch.arange(num_blocks(length, block), device=x.device) * block
    positions = torch.clamp(starts[:, None] + offsets.to(x.device)[None, :], max=length - 1)
    return x[:, :, positions.flatten()].unflatten(2, positions.shape)


def _normalize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; an all-zero row stays zero, a row holding NaN or inf becomes NaN
    (docs/spec.md section 5 then runs it dense)."""
    total = scores.sum(-1, keepdim=True)
    return torch.where(total == 0, 0.0, scores / torch.where(total == 0, 1.0, total))


def estimate_sampled(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                     scale: Optional[float] = None, causal: bool = False,
                     q_offsets: Optional[torch.Tensor] = None,
                     k_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    q_len, k_len, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    q_offsets = default_sample_offsets(block_m, q.device) if q_offsets is None else q_offsets
    k_offsets = default_sample_offsets(block_n, q.device) if k_offsets is None else k_offsets
    q_samples = _sample_block_rows(q, block_m, q_offsets)                     # [B, Hq, n_q, s_q, D]
    k_samples = _sample_block_rows(repeat_kv_heads(k, q.shape[1]), block_n, k_offsets)
    logits = torch.einsum("bhiqd,bhjkd->bhiqjk", q_samples, k_samples) * scale
    block_max = logits.amax(-1)                                                # [B, Hq, n_q, s_q, n_k]
    candidates = candidate_blocks(q_len, k_len, block_m, block_n, causal, q.device)
    block_max = block_max.masked_fill(~candidates[:, None, :], float("-inf"))
    row_max = block_max.amax(-1, keepdim=True)
    relative = torch.exp(block_max - torch.where(row_max.isfinite(), row_max, 0.0))
    return _normalize_rows(relative.amax(-2)).float()


FP8_E4M3_MAX = 448.0


def quantize_anti_rows(x: torch.Tensor, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(x8, scales)`: `x` quantized to float8 e4m3 per group of `stride` tokens (docs/spec.md section 4,
    FP8 scoring), `x8` as float32 values `[B, H, L, D]`, `scales` float32 `[B, H, ceil(L / stride)]`."""
    length = x.shape[-2]
    groups = num_blocks(length, stride)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, groups * stride - length)).unflatten(2, (groups, stride))
    peak = padded.abs().amax(dim=(3, 4))
    scales = torch.where(peak == 0, torch.ones_like(peak), peak / FP8_E4M3_MAX)
    # A tensor numerator: `448 / peak` would be torch's peak.reciprocal() * 448, not the quotient.
    multipliers = torch.where(peak == 0, torch.ones_like(peak), torch.full_like(peak, FP8_E4M3_MAX) / peak)
    finite_max = torch.finfo(torch.float32).max
    multipliers = torch.where(multipliers > finite_max, torch.full_like(peak, finite_max), multipliers)
    x8 = (padded * multipliers[..., None, None]).to(torch.float8_e4m3fn).float()
    return x8.flatten(2, 3)[:, :, :length], scales


def estimate_antidiagonal(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                          scale: Optional[float] = None, causal: bool = False,
                          stride: int = 8, precision: str = "full") -> torch.Tensor:
    batch, q_heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    scale = head_dim ** -0.5 if scale is None else scale
    q_tiles, k_tiles = num_blocks(q_len, stride), num_blocks(k_len, stride)
    if precision not in ESTIMATE_PRECISIONS:
        raise ValueError(f"unknown estimate precision {precision!r}")
    if precision == "fp8":
        (q8, q_scales), (k8, k_scales) = quantize_anti_rows(q, stride), quantize_anti_rows(k, stride)
        q, k = q8.to(q.dtype), k8.to(k.dtype)  # e4m3 values are exact in every floating dtype psa takes
        wide = torch.promote_types(q.dtype, torch.float32)  # the scales are float32 values
        tile_scales = q_scales[..., :, None].to(wide) * repeat_kv_heads(k_scales, q_heads)[..., None, :].to(wide)
    k = repeat_kv_heads(k, q_heads)
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, q_tiles * stride - q_len))
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, k_tiles * stride - k_len))
    # Row i' of q_anti is q[S*i' + S-1-t] for t = 0..S-1 side by side, row j' of k_anti is
    # k[S*j' + t]: their dot product is the sum of the antidiagonal of tile (i', j') of Q K^T.
    q_anti = q_pad.unflatten(2, (q_tiles, stride)).flip(3).flatten(3)
    k_anti = k_pad.unflatten(2, (k_tiles, stride)).flatten(3)
    logits = torch.matmul(q_anti, k_anti.transpose(-1, -2))
    if precision == "fp8":
        logits = logits * tile_scales
    logits = logits * (scale / stride)
    if causal:
        last_query = torch.clamp(torch.arange(1, q_tiles + 1, device=q.device) * stride, max=q_len) - 1
        first_key = torch.arange(k_tiles, device=q.device) * stride
        visible = first_key[None, :] <= (last_query + k_len - q_len)[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
    row_has_key = (logits != float("-inf")).any(-1, keepdim=True)  # NaN counts: it must reach the scores
    probs = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    probs = probs.masked_fill(~row_has_key, 0.0)
    n_q, n_k = num_blocks(q_len, block_m), num_blocks(k_len, block_n)
    row_tiles, col_tiles = block_m // stride, block_n // stride
    probs = torch.nn.functional.pad(probs, (0, n_k * col_tiles - k_tiles, 0, n_q * row_tiles - q_tiles))
    block_sums = probs.unflatten(3, (n_k, col_tiles)).sum(-1).unflatten(2, (n_q, row_tiles)).sum(3)
    return _normalize_rows(block_sums).float()


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    return pool_tokens(x.double() if x.dtype == torch.float64 else x.float(), block)


def key_block_means(k: torch.Tensor, block_n: int, dtype: torch.dtype) -> torch.Tensor:
    """`kbar_j` of the pooled estimator in `dtype`: key block `j`'s level-8 pooled keys (rounded to
    `k.dtype`), each weighted by how many keys it covers."""
    k_len = k.shape[-2]
    k8 = pool_tokens(k, 8).to(dtype)
    counts = pool_counts(k_len, 8, k.device).to(dtype)
    per_block = block_n // 8
    n_k = num_blocks(k_len, block_n)
    weighted = torch.nn.functional.pad(k8 * counts[:, None], (0, 0, 0, n_k * per_block - k8.shape[-2]))
    sums = weighted.unflatten(-2, (n_k, per_block)).sum(-2)
    return sums / pool_counts(k_len, block_n, k.device).to(dtype)[:, None]


def estimate_pooled(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                    scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """`k` may be of a lower precision than `q`: its level-8 keys are rounded to `k.dtype` (the
    kernels' bfloat16 / float16), everything after that is computed in `q`'s precision."""
    q_len, k_len, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    q_mean = _block_means(q, block_m)
    k_mean = key_block_means(repeat_kv_heads(k, q.shape[1]), block_n, q_mean.dtype)
    logits = torch.matmul(q_mean, k_mean.transpose(-1, -2)) * scale
    candidates = candidate_blocks(q_len, k_len, block_m, block_n, causal, q.device)
    logits = logits.masked_fill(~candidates, float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(~candidates.any(-1, keepdim=True), 0.0)
    return probs.float()


def estimate_importance(q: torch.Tensor, k: torch.Tensor, *, method: str, block_m: int, block_n: int,
                        scale: Optional[float] = None, causal: bool = False, stride: int = 8,
                        q_offsets: Optional[torch.Tensor] = None,
                        k_offsets: Optional[torch.Tensor] = None, precision: str = "full") -> torch.Tensor:
    common = dict(block_m=block_m, block_n=block_n, scale=scale, causal=causal)
    if precision != "full" and method != "antidiagonal":
        raise ValueError(f"estimate precision {precision!r} applies to the antidiagonal estimator only")
    if method == "sampled":
        return estimate_sampled(q, k, q_offsets=q_offsets, k_offsets=k_offsets, **common)
    if method == "antidiagonal":
        return estimate_antidiagonal(q, k, stride=stride, precision=precision, **common)
    if method == "pooled":
        return estimate_pooled(q, k, **common)
    raise ValueError(f"unknown estimator {method!r}")


# --------------------------------------------------------------------------------------------------
# Section 5: level assignment
# --------------------------------------------------------------------------------------------------

def similarity_cap(k: torch.Tensor, block_n: int, thresholds: Sequence[float]) -> torch.Tensor:
    """int64 `[B, Hkv, n_k]`: the coarsest level each key block may take (docs/spec.md section 5).

    `sim_l` is the mean, over the groups of `l` keys inside the block, of the cosine similarity of
    the group's first and last real key (a group holding one key counts as 1).
    """
    k_len = k.shape[-2]
    n_k = num_blocks(k_len, block_n)
    x = k.double()
    cap = torch.ones(k.shape[0], k.shape[1], n_k, dtype=torch.long, device=k.device)
    for level, threshold in zip(POOLED_LEVELS, thresholds):
        first = torch.arange(0, k_len, level, device=k.device)
        last = torch.clamp(first + level - 1, max=k_len - 1)
        a, b = x[:, :, first], x[:, :, last]
        norms = a.norm(dim=-1) * b.norm(dim=-1)
        cosine = (a * b).sum(-1) / torch.clamp(norms, min=1e-12)
        group_block = first // block_n
        sums = torch.zeros_like(cap, dtype=torch.float64).index_add_(2, group_block, cosine)
        groups = torch.zeros(n_k, dtype=torch.float64, device=k.device).index_add_(
            0, group_block, torch.ones_like(group_block, dtype=torch.float64))
        cap = torch.where(sums / groups > threshold, torch.clamp(cap, min=level), cap)
    return cap


def _positions_to_blocks(mask: Optional[torch.Tensor], length: int, block: int,
                         batch: int) -> Optional[torch.Tensor]:
    """bool `[B, n_blocks]` from a bool `[L]`/`[B, L]` mask of positions (None stays None)."""
    if mask is None:
        return None
    mask = mask.expand(batch, length)
    padded = torch.nn.functional.pad(mask, (0, num_blocks(length, block) * block - length))
    return padded.unflatten(-1, (-1, block)).any(-1)


def assign_levels(scores: torch.Tensor, *, mode: str, bounds: Sequence[float], block_m: int, block_n: int,
                  q_len: int, k_len: int, min_full: float = 0.06, causal: bool = False, sink: bool = True,
                  force_keys: Optional[torch.Tensor] = None, force_queries: Optional[torch.Tensor] = None,
                  k: Optional[torch.Tensor] = None,
                  sim_thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """int8 level map `[B, Hq, n_q, n_k]` from block scores (docs/spec.md section 5)."""
    batch, q_heads, n_q, n_k = scores.shape
    device = scores.device
    candidates = candidate_blocks(q_len, k_len, block_m, block_n, causal, device)   # [n_q, n_k]
    scores = scores.double().masked_fill(~candidates, 0.0)
    # Rank candidates by score, descending; the stable sort breaks ties by lower block index, and
    # non-candidates sort last.
    # (NaN ranks first, so that a non-finite row still orders its candidates before the rest; such a
    # row becomes dense below anyway.)
    sort_key = torch.where(candidates, torch.nan_to_num(-scores, nan=float("-inf")), float("inf"))
    order = torch.sort(sort_key, dim=-1, stable=True).indices
    num_candidates = candidates.sum(-1).double()[:, None]                           # [n_q, 1]
    ranks = torch.arange(n_k, device=device, dtype=torch.float64)

    level_per_rank = torch.zeros(batch, q_heads, n_q, n_k, dtype=torch.long, device=device)
    if mode == "threshold":
        # The mass ahead is (sum of the scores ranked ahead) / (row total): one division at the end,
        # so sums of exactly representable scores compare exactly in every backend.
        ranked = torch.gather(scores, -1, order)
        total = scores.sum(-1, keepdim=True)
        ahead = torch.cat([torch.zeros_like(ranked[..., :1]), torch.cumsum(ranked, dim=-1)[..., :-1]], dim=-1)
        mass_before = torch.where(total > 0, ahead / torch.where(total > 0, total, 1.0), 0.0)
        for level, bound in reversed(list(zip((1, 2, 4, 8), bounds))):
            level_per_rank = torch.where(mass_before < bound, level, level_per_rank)
    elif mode == "topk":
        for level, bound in reversed(list(zip((1, 2, 4, 8), bounds))):
            quota = torch.floor(bound * num_candidates + 0.5 + COUNT_EPS)
            level_per_rank = torch.where(ranks < quota, level, level_per_rank)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    floor = torch.clamp(torch.ceil(min_full * num_candidates - COUNT_EPS), min=1)
    level_per_rank = torch.where(ranks < floor, 1, level_per_rank)
    level_per_rank = torch.where(ranks < num_candidates, level_per_rank, 0)
    levels = torch.zeros_like(level_per_rank).scatter_(-1, order, level_per_rank)

    forced = torch.zeros(batch, 1, n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        # The diagonal block is the last candidate of the row; the sink is the first.
        block_ids = torch.arange(n_k, device=device)
        last_candidate = torch.where(candidates, block_ids, -1).amax(-1, keepdim=True)
        forced |= block_ids == last_candidate
        if sink:
            forced[..., 0] = True
    key_blocks = _positions_to_blocks(force_keys, k_len, block_n, batch)
    if key_blocks is not None:
        forced |= key_blocks[:, None, None, :]
    query_blocks = _positions_to_blocks(force_queries, q_len, block_m, batch)
    if query_blocks is not None:
        forced |= query_blocks[:, None, :, None]
    # A row with a non-finite score is computed densely: every candidate at level 1.
    forced = forced | ~torch.isfinite(scores).all(-1, keepdim=True)
    levels = torch.where(forced & candidates, 1, levels)

    if sim_thresholds is not None:
        cap = repeat_kv_heads(similarity_cap(k, block_n, sim_thresholds), q_heads)[:, :, None, :]
        levels = torch.where(levels > 0, torch.minimum(levels, cap), levels)
    return levels.to(torch.int8)


# --------------------------------------------------------------------------------------------------
# Statistics and the whole pipeline
# --------------------------------------------------------------------------------------------------

def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config, *,
                     scale: Optional[float] = None, force_keys=None, force_queries=None,
                     q_offsets=None, k_offsets=None):
    """Estimate, assign, attend. Returns `(out, lse, levels)`."""
    c = config
    scores = estimate_importance(q, k, method=c.estimator, block_m=c.block_m, block_n=c.block_n,
                                 scale=scale, causal=c.causal, stride=c.stride,
                                 q_offsets=q_offsets, k_offsets=k_offsets,
                                 precision=c.estimate_precision)
    levels = assign_levels(scores, mode=c.mode, bounds=c.bounds, block_m=c.block_m, block_n=c.block_n,
                           q_len=q.shape[-2], k_len=k.shape[-2], min_full=c.min_full, causal=c.causal,
                           sink=c.sink, force_keys=force_keys, force_queries=force_queries, k=k,
                           sim_thresholds=c.sim_thresholds)
    out, lse = attention_with_levels(q, k, v, levels, block_m=c.block_m, block_n=c.block_n,
                                     scale=scale, causal=c.causal)
    return out, lse, levels

