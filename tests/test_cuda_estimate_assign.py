"""The CUDA estimators and level assignment against psa.reference and the CPU backend."""

import pytest
import torch

import psa
from psa import PSAConfig, reference
from conftest import CUDA_DTYPES, CUDA_HEAD_DIMS, randn, reference_scores, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def check_scores(scores, q, k, causal, **kwargs):
    """Scores against the float64 reference on the same (rounded) inputs (conftest.reference_scores): the
    kernels multiply bf16/fp16 values exactly and sum in fp32, so only fp32 rounding separates them."""
    expected = reference_scores(q, k, causal=causal, **kwargs)
    assert scores.is_cuda and scores.dtype == torch.float32 and scores.shape == expected.shape
    torch.testing.assert_close(scores.cpu().double(), expected, atol=2e-5, rtol=1e-3)
    candidates = reference.candidate_blocks(q.shape[2], k.shape[2], kwargs["block_m"], kwargs["block_n"], causal)
    assert (scores.cpu()[..., ~candidates] == 0).all()


@pytest.mark.parametrize("method", ["sampled", "antidiagonal", "pooled"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 32), (32, 64)])
def test_estimators_match_reference(rng, method, dtype, head_dim, causal, block_m, block_n):
    q = randn(rng, 2, 4, 333, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, 2, 301, head_dim, dtype=dtype, device="cuda")
    config = PSAConfig(block_m=block_m, block_n=block_n, estimator=method, causal=causal)
    scores = psa.estimate_importance(q, k, config)
    check_scores(scores, q, k, causal, method=method, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n,stride", [(128, 128, 8), (64, 32, 4), (32, 64, 8), (64, 64, 2)])
def test_fp8_antidiagonal_matches_reference(rng, dtype, head_dim, causal, block_m, block_n, stride):
    # FP8 scoring: on Hopper quantize_anti_rows and the sm90 kernel on FP8 wgmma (stride * head_dim a
    # multiple of 128; off Hopper the ATen path, which test_estimate.py also runs on CUDA at head_dim 32). The
    # quantized values are the reference's bit for bit (IEEE quotient and product, e4m3 rounding to nearest
    # even);
    # FP8 wgmma sums their products with less than fp32's precision, hence a looser tolerance than
    # check_scores'. 2300 keys: two or more 256-column tiles; GQA; odd lengths.
    q = randn(rng, 2, 4, 777, head_dim, dtype=dtype, device="cuda")
    k = randn(rng, 2, 2, 2300, head_dim, dtype=dtype, device="cuda")
    config = PSAConfig(block_m=block_m, block_n=block_n, estimator="antidiagonal", causal=causal, stride=stride,
                       estimate_precision="fp8")
    scores = psa.estimate_importance(q, k, config)
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), method="antidiagonal",
                                             block_m=block_m, block_n=block_n, causal=causal, stride=stride,
                                             precision="fp8").double()
    assert scores.is_cuda and scores.dtype == torch.float32 and scores.shape == expected.shape
    torch.testing.assert_close(scores.cpu().double(), expected, atol=5e-4, rtol=1e-2)
    candidates = reference.candidate_blocks(777, 2300, block_m, block_n, causal)
    assert (scores.cpu()[..., ~candidates] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_with_drawn_offsets_and_the_aten_fallback(rng, causal):
    q = randn(rng, 1, 2, 700, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 1, 650, 128, dtype=torch.bfloat16, device="cuda")
    kwargs = dict(block_m=128, block_n=128, method="sampled", causal=causal)
    # 32 drawn offsets run the fused kernel; 5 offsets are outside what it is built for (ATen path).
    for count in (32, 5):
        q_offsets = torch.sort(torch.randperm(128, generator=rng)[:count]).values
        k_offsets = torch.sort(torch.randperm(128, generator=rng)[:count]).values
        scores = torch.ops.psa.estimate_importance(q, k, q_offsets.cuda(), k_offsets.cuda(), **kwargs)
        check_scores(scores, q, k, causal, q_offsets=q_offsets, k_offsets=k_offsets, block_m=128, block_n=128,
                     method="sampled")


@pytest.mark.parametrize("block_m,q_len,k_len", [
    (128, 256, 2048 * 32),     # 8 query blocks x 2048 key blocks: the Hopper kernel's peaks fit its shared memory
    (32, 1100, 1301 * 32 + 5),  # 32 x 1302 peaks do not (40960 at head_dim 64): they stay in the table
])
def test_sampled_long_rows(rng, block_m, q_len, k_len):
    # Long key rows: the table of block maxima (1 MiB per CTA and more) lives in global scratch.
    q = randn(rng, 1, 1, q_len, 64, dtype=torch.float16, device="cuda")
    k = randn(rng, 1, 1, k_len, 64, dtype=torch.float16, device="cuda")
    scores = psa.estimate_importance(q, k, PSAConfig(block_m=block_m, block_n=32))
    check_scores(scores, q, k, False, method="sampled", block_m=block_m, block_n=32)


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_many_ctas_share_table_slots(rng, causal):
    # 384 CTAs (2 per head) against one scratch table per SM on Hopper: every slot is taken, released
    # and taken again several times within the launch, and causal CTAs finish at different times.
    q = randn(rng, 2, 96, 1100, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 2, 48, 1000, 128, dtype=torch.bfloat16, device="cuda")
    config = PSAConfig(block_m=128, block_n=128, causal=causal)
    scores = psa.estimate_importance(q, k, config)
    check_scores(scores, q, k, causal, method="sampled", block_m=128, block_n=128)


@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("block_m,block_n,q_len,k_len", [
    (128, 128, 2563, 1531),  # several CTAs / key tiles, the last of each copied (partial blocks)
    (128, 128, 2560, 1536),  # full last blocks: every row read in place
    (64, 32, 1100, 515),     # 16 / 8 samples; in-place keys end exactly at a tile boundary
    (32, 64, 700, 510),      # fewer in-place rows than one box: all copied
])
def test_sampled_default_offsets_read_in_place(rng, monkeypatch, family, causal, layout, block_m, block_n, q_len,
                                               k_len):
    # With the default offsets the Hopper kernel reads the sampled rows of whole boxes from q and k in
    # place and copies only the rest; the same offsets passed explicitly take the copy for every row.
    # Both read the same values into the same arithmetic: the scores are equal bit for bit.
    use_kernel_family(monkeypatch, family)
    if layout == "bhld":
        q = randn(rng, 2, 4, q_len, 64, dtype=torch.bfloat16, device="cuda")
        k = randn(rng, 2, 2, k_len, 64, dtype=torch.bfloat16, device="cuda")
    else:  # video models' [B, L, H, D]: token stride H * D
        q = randn(rng, 2, q_len, 4, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
        k = randn(rng, 2, k_len, 2, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
    kwargs = dict(block_m=block_m, block_n=block_n, method="sampled", causal=causal)
    scores = torch.ops.psa.estimate_importance(q, k, **kwargs)
    check_scores(scores, q, k, causal, method="sampled", block_m=block_m, block_n=block_n)
    explicit = torch.ops.psa.estimate_importance(q, k, torch.arange(2, block_m, 4, device="cuda"),
                                                 torch.arange(2, block_n, 4, device="cuda"), **kwargs)
    assert torch.equal(scores, explicit)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("k_len", [4500, 9000])
def test_pooled_many_blocks(rng, causal, head_dim, k_len):
    # More query blocks than one scores CTA takes (32 against 16) and more key blocks than one pass of
    # its MMAs (141 or 282 against 64), with a strided [B, L, H, D] view and GQA. The scores kernel keeps
    # the logits in its ring of key means when the ring holds every pass (141 keys at head_dim 64), and in
    # the output when it is refilled (the rest).
    q = randn(rng, 1, 2001, 4, head_dim, dtype=torch.float16, device="cuda").transpose(1, 2)
    k = randn(rng, 1, k_len, 2, head_dim, dtype=torch.float16, device="cuda").transpose(1, 2)
    config = PSAConfig(block_m=64, block_n=32, estimator="pooled", causal=causal)
    scores = psa.estimate_importance(q, k, config)
    check_scores(scores, q, k, causal, method="pooled", block_m=64, block_n=32)


def test_pooled_rejects_a_batch_past_its_grid():
    # The scores kernel's grid takes the batch on z (at most 65535): a clear error, not a failed launch.
    q = torch.zeros(65536, 1, 8, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="batch of at most 65535"):
        psa.estimate_importance(q, q, PSAConfig(block_m=32, block_n=32, estimator="pooled"))


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (64, 32), (32, 64)])
def test_pooled_from_the_pyramids_k8(rng, dtype, head_dim, causal, block_m, block_n):
    # The pipeline's path: key means from kv_pyramid's k8 (the CUDA pyramid kernel) are those the
    # estimator takes by pooling k itself, bit for bit, and both match the reference; odd lengths (a
    # partial group of 8 keys, partial blocks), GQA, a [B, L, H, D] view.
    q = randn(rng, 2, 333, 4, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    k = randn(rng, 2, 301, 2, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
    k8 = psa.kv_pyramid(k, k)[8][0]
    config = PSAConfig(block_m=block_m, block_n=block_n, estimator="pooled", causal=causal)
    scores = psa.estimate_importance(q, k, config, k8=k8)
    assert torch.equal(scores, psa.estimate_importance(q, k, config))
    check_scores(scores, q, k, causal, method="pooled", block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sim", [None, (0.05, 0.0, -0.05)])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_assign_matches_cpu_backend(rng, mode, causal, sim, score_dtype):
    q_len, k_len, block_m, block_n = 700, 650, 64, 32
    scores = (torch.rand(2, 4, 11, 21, generator=rng, dtype=torch.float64) ** 4).to(score_dtype)
    k = torch.randn(2, 2, k_len, 64, generator=rng).to(torch.bfloat16)
    config = PSAConfig(mode=mode, bounds=(0.2, 0.4, 0.5, 0.8), causal=causal, block_m=block_m, block_n=block_n,
                       sim_thresholds=sim)
    keys = torch.rand(2, k_len, generator=rng) < 0.01
    queries = torch.rand(2, q_len, generator=rng) < 0.002
    args = dict(q_len=q_len, force_keys=keys, force_queries=queries)
    expected = psa.assign_levels(scores, config, k=k, **args)
    assert torch.equal(expected, reference.assign_levels(
        scores, mode=mode, bounds=config.bounds, block_m=block_m, block_n=block_n, q_len=q_len, k_len=k_len,
        causal=causal, k=k.double(), sim_thresholds=sim, force_keys=keys, force_queries=queries))
    levels = psa.assign_levels(scores.cuda(), config, k=k.cuda(), q_len=q_len, force_keys=keys.cuda(),
                               force_queries=queries.cuda())
    assert levels.is_cuda and levels.dtype == torch.int8
    assert torch.equal(levels.cpu(), expected)


# One length per launch bucket of the kernel (slots sized to the row) and each bucket's edges.
@pytest.mark.parametrize("n_k", [1, 139, 256, 300, 512, 600, 640, 641, 1024, 2048, 2100, 4096])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_assign_long_rows_and_ties(rng, n_k, mode):
    # Scores drawn from a few values make many ties: ranks must still break them by lower block index.
    scores = torch.randint(0, 4, (1, 2, 3, n_k), generator=rng).float() / 4
    config = PSAConfig(mode=mode, bounds=(0.1, 0.3, 0.5, 0.7), block_m=64, block_n=32)
    args = dict(q_len=3 * 64, k_len=n_k * 32)
    expected = psa.assign_levels(scores, config, **args)
    assert torch.equal(psa.assign_levels(scores.cuda(), config, **args).cpu(), expected)


def test_assign_rejects_too_many_key_blocks():
    scores = torch.rand(1, 1, 1, 4097, device="cuda")
    with pytest.raises(RuntimeError, match="at most 4096 on CUDA"):
        psa.assign_levels(scores, PSAConfig(block_n=32), q_len=64, k_len=4097 * 32)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_assign_rows_with_non_finite_scores_are_dense_as_on_the_cpu(rng, mode):
    scores = torch.rand(2, 3, 6, 9, generator=rng)
    scores[0, 1, 2, 3] = float("nan")
    scores[1, 2, 5, 0] = float("inf")
    config = PSAConfig(mode=mode, bounds=(0.1, 0.3, 0.5, 0.7), block_m=32, block_n=32, causal=True)
    args = dict(q_len=6 * 32, k_len=9 * 32)
    expected = psa.assign_levels(scores, config, **args)
    assert torch.equal(psa.assign_levels(scores.cuda(), config, **args).cpu(), expected)


@pytest.mark.parametrize("method", ["sampled", "pooled", "antidiagonal"])
@pytest.mark.parametrize("family", ["auto", "sm80"])
@pytest.mark.parametrize("causal", [False, True])
def test_estimators_carry_nan_as_the_cpu_does(rng, monkeypatch, method, family, causal):
    """A NaN in q, or a NaN or inf in k, makes the scores of every row whose logits it touches NaN, as the
    reference (those rows then run dense in the assignment); the other rows are unchanged."""
    monkeypatch.setenv("PSA_CUDA_KERNEL", family)
    q = randn(rng, 2, 4, 333, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 2, 2, 301, 128, dtype=torch.bfloat16, device="cuda")
    q[0, 1, 128:256] = float("nan")  # query block 1 of (batch 0, head 1): that row only
    k[1, 0, :128] = float("nan")     # key block 0 of (batch 1, kv head 0): every row of query heads 0 and 1
    k[1, 1, 6] = float("inf")        # a sampled row of key block 0 of kv head 1: query heads 2 and 3
    config = PSAConfig(block_m=128, block_n=128, estimator=method, causal=causal)
    scores = psa.estimate_importance(q, k, config).cpu().double()
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), causal=causal, method=method,
                                             block_m=128, block_n=128).double()
    assert expected[0, 1, 1].isnan().all() and expected[1].isnan().all()
    assert not expected[0, 0].isnan().any() and not expected[0, 1, 0].isnan().any()
    assert torch.equal(scores.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(scores[finite], expected[finite], atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("method", ["sampled", "pooled", "antidiagonal", "antidiagonal-fp8"])
@pytest.mark.parametrize("family", ["auto", "sm80"])
@pytest.mark.parametrize("scale", [-0.2, 0.0])
def test_estimators_take_a_negative_or_zero_scale(rng, monkeypatch, method, family, scale):
    # SDPA takes any finite scale; a kernel that scales maxima of raw products would get a negative one
    # wrong, and one that multiplies a masked -inf by the scale would make NaN of a zero one.
    monkeypatch.setenv("PSA_CUDA_KERNEL", family)
    q = randn(rng, 1, 2, 700, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, 650, 128, dtype=torch.bfloat16, device="cuda")
    estimator, _, precision = method.partition("-")
    config = PSAConfig(block_m=128, block_n=128, estimator=estimator, estimate_precision=precision or "full")
    scores = psa.estimate_importance(q, k, config, scale=scale)
    check_scores(scores, q, k, False, method=estimator, block_m=128, block_n=128, scale=scale,
                 precision=precision or "full")


def use_kernel_family(monkeypatch, family):
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need an sm_90 GPU")
    monkeypatch.setenv("PSA_CUDA_KERNEL", family)


@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(128, 128), (128, 64), (64, 128), (32, 64)])
@pytest.mark.parametrize("q_len,k_len", [(2000, 4500), (4500, 1531)])
def test_antidiagonal_fused_kernel_over_many_tiles(rng, monkeypatch, family, causal, block_m, block_n, q_len, k_len):
    # The fused kernels (block_m / 8 dividing 64 anti-rows, block_n / 8 a multiple of 8): several CTAs per
    # head, several column tiles per row (the Hopper kernel's are 256 anti-columns: 2048 keys), Lq != Lk
    # both ways (causal rows that see nothing), GQA.
    use_kernel_family(monkeypatch, family)
    q = randn(rng, 1, 4, q_len, 128, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 2, k_len, 128, dtype=torch.bfloat16, device="cuda")
    config = PSAConfig(block_m=block_m, block_n=block_n, estimator="antidiagonal", causal=causal)
    scores = psa.estimate_importance(q, k, config)
    check_scores(scores, q, k, causal, method="antidiagonal", block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("family,stride", [("sm90", 2), ("sm90", 4), ("sm80", 4), ("sm80", 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_antidiagonal_fused_kernel_strides_layouts_and_head_dim_64(rng, monkeypatch, family, stride, causal):
    # Other strides (16 is past the Hopper kernel's descriptors), fp16, head_dim 64, and q / k in the
    # [B, L, H, D] layout video models keep (token stride H * D), lengths not multiples of the stride, so
    # the last group of S tokens is partial.
    use_kernel_family(monkeypatch, family)
    q = randn(rng, 2, 2603, 4, 64, dtype=torch.float16, device="cuda").transpose(1, 2)
    k = randn(rng, 2, 2317, 2, 64, dtype=torch.float16, device="cuda").transpose(1, 2)
    config = PSAConfig(block_m=128, block_n=128, estimator="antidiagonal", causal=causal, stride=stride)
    scores = psa.estimate_importance(q, k, config)
    check_scores(scores, q, k, causal, method="antidiagonal", block_m=128, block_n=128, stride=stride)


@pytest.mark.parametrize("precision", ["full", "fp8"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_heads", [96, 64])
def test_hopper_antidiagonal_runs_on_across_work_items(rng, monkeypatch, precision, causal, q_heads):
    # The Hopper kernel is persistent: a CTA per SM walks items of 128 anti-rows of one head, in rounds
    # of one item a CTA, every other round in reverse. More items than SMs (heads x 3 = 288 or 192 on
    # 132 SMs: a last, partial round taken forwards or in reverse) make CTAs run on from one item to the
    # next, through the stage ring, the finisher warps' row buffers and the FP8 scales' buffers (3 column
    # tiles an item: an odd count, so the tile parity carries across items).
    use_kernel_family(monkeypatch, "sm90")
    q = randn(rng, 1, q_heads, 2100, 64, dtype=torch.bfloat16, device="cuda")
    k = randn(rng, 1, 32, 4500, 64, dtype=torch.bfloat16, device="cuda")
    config = PSAConfig(block_m=128, block_n=128, estimator="antidiagonal", causal=causal,
                       estimate_precision=precision)
    scores = psa.estimate_importance(q, k, config)
    expected = reference.estimate_importance(q.double().cpu(), k.double().cpu(), method="antidiagonal", block_m=128,
                                             block_n=128, causal=causal, precision=precision).double()
    atol, rtol = (5e-4, 1e-2) if precision == "fp8" else (2e-5, 1e-3)
    torch.testing.assert_close(scores.cpu().double(), expected, atol=atol, rtol=rtol)


def test_antidiagonal_forced_onto_hopper_names_why_it_cannot_run(monkeypatch):
    use_kernel_family(monkeypatch, "sm90")
    q = torch.randn(1, 2, 512, 64, dtype=torch.bfloat16, device="cuda")
    config = PSAConfig(block_m=128, block_n=128, estimator="antidiagonal", stride=16)
    with pytest.raises(RuntimeError, match="stride must be at most 8"):
        psa.estimate_importance(q, q, config)
