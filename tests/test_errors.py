"""Every validated condition raises a clear error that names the argument."""

import os
import subprocess
import sys

import pytest
import torch

import psa
from psa import PSAConfig
from conftest import cuda_backend_available, requires_cuda


def qkv(q_heads=4, kv_heads=2, length=100, dim=32, dtype=torch.float32):
    return (torch.randn(1, q_heads, length, dim, dtype=dtype), torch.randn(1, kv_heads, length, dim, dtype=dtype),
            torch.randn(1, kv_heads, length, dim, dtype=dtype))


def levels_for(q, k, block=64):
    return torch.ones(q.shape[0], q.shape[1], -(-q.shape[2] // block), -(-k.shape[2] // block), dtype=torch.int8)


def attend(q, k, v, levels=None, block=64, **kwargs):
    levels = levels_for(q, k, block) if levels is None else levels
    return psa.attention_with_levels(q, k, v, levels, block_m=block, block_n=block, **kwargs)


def test_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="q must be float32, float64, bfloat16 or float16"):
        attend(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(RuntimeError, match="k must have the same dtype as q"):
        attend(q, k.double(), v)
    with pytest.raises(RuntimeError, match="v must have the same dtype as q"):
        attend(q, k, v.double())


@pytest.mark.skipif(not cuda_backend_available(), reason="needs a CUDA device and psa's CUDA backend")
def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cuda:0\), got cpu"):
        attend(q.cuda(), k, v.cuda(), levels=levels_for(q, k).cuda())


def test_rank():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"q must have 4 dims \[B, H, L, D\]"):
        attend(q[0], k, v, levels=levels_for(q, k))


def test_head_count_not_divisible():
    q, k, v = qkv(q_heads=3, kv_heads=2)
    with pytest.raises(RuntimeError, match="head count of q must be a multiple of that of k"):
        attend(q, k, v)


def test_head_dim_mismatch():
    q, _, _ = qkv(dim=32)
    _, k, v = qkv(dim=64)
    with pytest.raises(RuntimeError, match="k must have the head_dim of q"):
        attend(q, k, v)


def test_kv_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        attend(q, k, v[:, :, :50])


def test_last_dim_not_contiguous():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="q must be contiguous in its last dim"):
        attend(q.transpose(-1, -2).contiguous().transpose(-1, -2)[..., :32], k, v)
    with pytest.raises(RuntimeError, match="k must be contiguous in its last dim"):
        psa.estimate_importance(q, torch.randn(1, 2, 32, 100).transpose(-1, -2))


def test_empty_sequence():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="k must hold at least one token"):
        attend(q, k[:, :, :0], v[:, :, :0], levels=torch.ones(1, 4, 2, 0, dtype=torch.int8))


def test_level_values():
    q, k, v = qkv()
    levels = levels_for(q, k)
    levels[0, 0, 0, 0] = 3
    with pytest.raises(RuntimeError, match=r"levels values must be in \{0, 1, 2, 4, 8\}"):
        attend(q, k, v, levels=levels)


def test_level_map_shape_and_dtype():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="levels must have shape"):
        attend(q, k, v, levels=torch.ones(1, 4, 3, 2, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="levels must be int8"):
        attend(q, k, v, levels=levels_for(q, k).int())


def test_block_sizes():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="block_m must be 32, 64 or 128"):
        psa.attention_with_levels(q, k, v, levels_for(q, k, 48), block_m=48, block_n=64)
    with pytest.raises(RuntimeError, match="block_n must be 32, 64 or 128"):
        torch.ops.psa.estimate_importance(q, k, block_m=64, block_n=16, method="pooled")


def test_bad_op_arguments():
    q, k, _ = qkv()
    with pytest.raises(RuntimeError, match="method must be 'sampled', 'antidiagonal' or 'pooled'"):
        torch.ops.psa.estimate_importance(q, k, block_m=64, block_n=64, method="magic")
    with pytest.raises(RuntimeError, match="stride must be a positive divisor"):
        torch.ops.psa.estimate_importance(q, k, block_m=64, block_n=64, method="antidiagonal", stride=3)
    with pytest.raises(RuntimeError, match=r"q_offsets must lie in \[0, 64\)"):
        torch.ops.psa.estimate_importance(q, k, torch.tensor([70]), block_m=64, block_n=64, method="sampled")
    k8 = psa.kv_pyramid(k, k)[8][0]
    with pytest.raises(RuntimeError, match="k8 applies to the 'pooled' method only, got method 'sampled'"):
        torch.ops.psa.estimate_importance(q, k, k8=k8, block_m=64, block_n=64, method="sampled")
    with pytest.raises(RuntimeError, match=r"k8 must have shape \[B, Hkv, ceil\(Lk/8\), D\] = \[1, 2, 13, 32\]"):
        torch.ops.psa.estimate_importance(q, k, k8=k8[:, :, :12], block_m=64, block_n=64, method="pooled")
    with pytest.raises(RuntimeError, match="k8 must have the same dtype as k"):
        torch.ops.psa.estimate_importance(q, k, k8=k8.double(), block_m=64, block_n=64, method="pooled")
    with pytest.raises(RuntimeError, match="precision must be 'full' or 'fp8', got 'fp16'"):
        torch.ops.psa.estimate_importance(q, k, block_m=64, block_n=64, method="antidiagonal", precision="fp16")
    with pytest.raises(RuntimeError, match="precision 'fp8' applies to the 'antidiagonal' method only, got method "
                                           "'pooled'"):
        torch.ops.psa.estimate_importance(q, k, block_m=64, block_n=64, method="pooled", precision="fp8")
    scores = torch.rand(1, 4, 2, 2)
    common = dict(block_m=64, block_n=64, q_len=100, k_len=100)
    with pytest.raises(RuntimeError, match="mode must be 'topk' or 'threshold'"):
        torch.ops.psa.assign_levels(scores, mode="all", bounds=[0.1, 0.2, 0.3, 0.4], **common)
    with pytest.raises(RuntimeError, match="bounds must be non-decreasing"):
        torch.ops.psa.assign_levels(scores, mode="topk", bounds=[0.4, 0.2, 0.3, 0.4], **common)
    with pytest.raises(RuntimeError, match="bounds must hold 4 values"):
        torch.ops.psa.assign_levels(scores, mode="topk", bounds=[0.4], **common)
    with pytest.raises(RuntimeError, match="scores must have n_q"):
        torch.ops.psa.assign_levels(torch.rand(1, 4, 3, 2), mode="topk", bounds=[0.1, 0.2, 0.3, 0.4], **common)
    with pytest.raises(RuntimeError, match="similarity cap .* needs k"):
        torch.ops.psa.assign_levels(scores, mode="topk", bounds=[0.1, 0.2, 0.3, 0.4], sim_thresholds=[0.1, 0.1, 0.1],
                                    **common)
    with pytest.raises(RuntimeError, match="scores must be non-negative"):
        torch.ops.psa.assign_levels(-scores, mode="topk", bounds=[0.1, 0.2, 0.3, 0.4], **common)
    with pytest.raises(RuntimeError, match="force_keys must have shape"):
        torch.ops.psa.assign_levels(scores, torch.zeros(7, dtype=torch.bool), mode="topk",
                                    bounds=[0.1, 0.2, 0.3, 0.4], **common)


def test_bad_wrapper_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="config must be a psa.PSAConfig"):
        psa.sparse_attention(q, k, v, {"block_m": 64})
    with pytest.raises(ValueError, match="needs k"):
        psa.assign_levels(torch.rand(1, 4, 1, 1), PSAConfig(sim_thresholds=(0.7, 0.6, 0.5)))
    with pytest.raises(ValueError, match="causal config needs the sequence lengths"):
        psa.assign_levels(torch.rand(1, 4, 1, 1), PSAConfig(causal=True))
    with pytest.raises(ValueError, match="generator applies to the 'sampled' estimator only"):
        psa.estimate_importance(q, k, PSAConfig(estimator="pooled"), generator=torch.Generator())
    with pytest.raises(ValueError, match="force_keys must be a bool mask or a 1-D integer tensor"):
        psa.sparse_attention(q, k, v, force_keys=torch.ones(3))


def test_pyramid_errors_name_k_and_v():
    k = torch.randn(1, 2, 40, 16)
    with pytest.raises(RuntimeError, match="k must be float32, float64, bfloat16 or float16"):
        psa.kv_pyramid(k.int(), k.int())
    with pytest.raises(RuntimeError, match="v must have the same dtype as k"):
        psa.kv_pyramid(k, k.double())
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        psa.kv_pyramid(k, k[:, :, :20])
    with pytest.raises(RuntimeError, match="v must be contiguous in its last dim"):
        psa.kv_pyramid(k, torch.randn(1, 2, 16, 40).transpose(-1, -2))


@pytest.mark.parametrize("positions,match", [
    ([10000], r"force_keys must hold integer positions in \[0, 100\), got \[10000\]"),
    ([-1], r"force_keys must hold integer positions in \[0, 100\), got \[-1\]"),
    ([1.5], r"force_keys must hold integer positions in \[0, 100\), got \[1.5\]"),
    ([True], r"force_keys must hold integer positions"),
    (5, r"force_keys must be a bool mask, an integer tensor, a list or a range of positions, got int"),
    ("0-10", r"force_keys must be a bool mask, an integer tensor, a list or a range of positions, got str"),
    (torch.tensor([3, 100]), r"force_keys must hold positions in \[0, 100\), got values from 3 to 100"),
    (torch.tensor([-2]), r"force_keys must hold positions in \[0, 100\), got values from -2 to -2"),
    (torch.tensor([1.0]), r"force_keys must be a bool mask or a 1-D integer tensor of positions"),
])
def test_forced_positions_are_checked(positions, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        psa.sparse_attention(q, k, v, PSAConfig(block_m=64, block_n=64), force_keys=positions)


def test_forced_query_positions_are_checked():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"force_queries must hold integer positions in \[0, 100\)"):
        psa.sparse_attention(q, k, v, force_queries=range(90, 110))


def test_generator_only_with_the_sampled_estimator():
    q, k, v = qkv()
    generator = torch.Generator().manual_seed(0)
    for estimator in ("antidiagonal", "pooled"):
        with pytest.raises(ValueError, match=f"generator applies to the 'sampled' estimator only, got "
                                             f"estimator='{estimator}'"):
            psa.sparse_attention(q, k, v, PSAConfig(estimator=estimator), generator=generator)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, got int"):
        psa.sparse_attention(q, k, v, generator=0)


def test_meta_tensor_beside_cpu_tensors():
    q, k, v = qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\), got meta"):
        psa.sparse_attention(q, meta, v)
    with pytest.raises(ValueError, match=r"v must be on the device of q \(cpu\), got meta"):
        attend(q, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"levels must be on the device of q \(cpu\), got meta"):
        attend(q, k, v, levels=levels_for(q, k).to("meta"))
    with pytest.raises(ValueError, match=r"force_keys must be on the device of q \(cpu\), got meta"):
        psa.sparse_attention(q, k, v, force_keys=torch.zeros(100, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\), got meta"):
        psa.estimate_importance(q, meta)
    with pytest.raises(ValueError, match=r"v must be on the device of k \(cpu\), got meta"):
        psa.kv_pyramid(k, v.to("meta"))


def test_level_stats_rejects_what_is_not_a_level_map():
    with pytest.raises(ValueError, match=r"level_stats: levels must be an int8 level map .* got torch.float32"):
        psa.level_stats(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"level_stats: levels values must be in \(0, 1, 2, 4, 8\), got \[-1, 3\]"):
        psa.level_stats(torch.tensor([[[[1, 3], [-1, 8]]]], dtype=torch.int8))
    with pytest.raises(ValueError, match="level_stats: levels must be an int8 level map"):
        psa.level_stats([[1, 2], [4, 8]])


@pytest.mark.parametrize("field,value,match", [
    ("block_m", 64.0, r"PSAConfig.block_m must be an int, one of \(32, 64, 128\), got 64.0"),
    ("block_n", "64", r"PSAConfig.block_n must be an int, one of \(32, 64, 128\), got '64'"),
    ("bounds", "0.1", r"PSAConfig.bounds must be a sequence of 4 finite numbers"),
    ("estimate_precision", "bf16", r"PSAConfig.estimate_precision must be one of \('full', 'fp8'\), got 'bf16'"),
    ("estimate_precision", "fp8", r"PSAConfig.estimate_precision 'fp8' applies to the 'antidiagonal' estimator "
                                  r"only, got estimator 'sampled'"),
])
def test_config_types(field, value, match):
    with pytest.raises(ValueError, match=match):
        PSAConfig(**{field: value})


def test_config_bounds_from_arrays():
    numpy = pytest.importorskip("numpy")
    assert PSAConfig(bounds=numpy.array([0.1, 0.2, 0.3, 0.4])).bounds == (0.1, 0.2, 0.3, 0.4)
    with pytest.raises(ValueError, match=r"PSAConfig.bounds must be a sequence of 4 finite numbers, got \[0.1, 0.2\]"):
        PSAConfig(bounds=numpy.array([0.1, 0.2]))


def test_zero_heads_say_heads():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"q must have at least one head \(dim 1 of \[B, H, L, D\]\), got 0"):
        attend(q[:, :0], k, v)
    with pytest.raises(RuntimeError, match=r"k must have at least one head"):
        psa.estimate_importance(q, k[:, :0])


def test_psa_attention_module_arguments():
    q, k, v = qkv(q_heads=2, kv_heads=2, length=2 * 3 * 4 + 2)
    with pytest.raises(ValueError, match=r"tile must be three positive ints \(T, H, W\), got \(0, 4, 4\)"):
        psa.PSAAttention(tile=(0, 4, 4))
    with pytest.raises(ValueError, match="config must be a psa.PSAConfig, got dict"):
        psa.PSAAttention({"block_m": 64})
    module = psa.PSAAttention(PSAConfig(block_m=32, block_n=32))
    with pytest.raises(ValueError, match="text_before must be a non-negative int .* got -1"):
        module(q, k, v, grid=(2, 3, 4), text_before=-1)
    with pytest.raises(ValueError, match="give grid=\\(T, H, W\\) too"):
        module(q, k, v, text_before=2)
    assert module(q, k, v, grid=(2, 3, 4), text_before=2).shape == q.shape


def test_dense_preset_is_dense_attention():
    q, k, v = qkv(dtype=torch.float64)
    out = psa.sparse_attention(q, k, v, PSAConfig.dense(block_m=64, block_n=64))
    group = q.shape[1] // k.shape[1]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                                v.repeat_interleave(group, 1))
    torch.testing.assert_close(out, expected)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kernel", ["sm80", "auto"])
@pytest.mark.parametrize("value", [3, -1])
def test_cuda_level_map_with_unknown_values_stops_the_kernel(kernel, value):
    # The check runs in the kernel (no host sync), so the error surfaces as a CUDA error at the next
    # synchronisation and the process's CUDA context is lost: run it in a child process.
    code = ("import torch, psa\n"
            "q = torch.randn(1, 1, 128, 64, device='cuda', dtype=torch.bfloat16)\n"
            f"levels = torch.full((1, 1, 1, 1), {value}, dtype=torch.int8, device='cuda')\n"
            "psa.attention_with_levels(q, q, q, levels, block_m=128, block_n=128)\n"
            "torch.cuda.synchronize()\n")
    env = dict(os.environ, PSA_CUDA_KERNEL=kernel)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "CUDA error" in result.stderr, result.stderr[-2000:]


def test_attention_over_pyramid_checks_the_pyramid():
    q, k, v = qkv()
    pyramid = psa.kv_pyramid(k, v)
    levels = levels_for(q, k)
    with pytest.raises(ValueError, match="pyramid must be the dict kv_pyramid"):
        psa.attention_over_pyramid(q, list(pyramid.values()), levels, block_m=64, block_n=64)
    with pytest.raises(RuntimeError, match=r"k4 must have shape \[B, Hkv, ceil\(Lk/4\), D\] = \[1, 2, 25, 32\]"):
        psa.attention_over_pyramid(q, {**pyramid, 4: (pyramid[4][0][:, :, :20], pyramid[4][1])}, levels,
                                   block_m=64, block_n=64)
    with pytest.raises(RuntimeError, match="v8 must have the same dtype as k"):
        psa.attention_over_pyramid(q, {**pyramid, 8: (pyramid[8][0], pyramid[8][1].double())}, levels,
                                   block_m=64, block_n=64)
    with pytest.raises(RuntimeError, match="levels values must be in"):
        psa.attention_over_pyramid(q, pyramid, levels * 3, block_m=64, block_n=64)
