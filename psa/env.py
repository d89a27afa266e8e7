"""What psa runs on this machine, for bug reports: `python -m psa.env`.

Prints the versions psa was built with and runs under, the GPU, the compiled CUDA architectures and
kernel families, and which backend each op takes here (the same choice the C++ dispatch makes: see
`csrc/psa/cuda/common.h` for PSA_CUDA_KERNEL and the Hopper conditions).
"""

import os
import platform
import sys

import torch


def _kernel_family(info: dict, capability) -> tuple:
    """(family, reason) of the tensor-core kernels psa's CUDA ops pick on a GPU of `capability`."""
    requested = os.environ.get("PSA_CUDA_KERNEL", "auto") or "auto"
    if requested not in ("auto", "sm80", "sm90"):
        return "error", f"PSA_CUDA_KERNEL must be auto, sm80 or sm90, got '{requested}'"
    if requested == "sm80":
        return "sm80", "PSA_CUDA_KERNEL=sm80"
    if not info.get("sm90_kernels"):
        reason = "psa was built without sm_90a (PSA_CUDA_ARCHS) or without CUTLASS headers"
    elif tuple(capability) != (9, 0):
        reason = f"the GPU is sm_{capability[0]}{capability[1]}, not sm_90 (H100/H200)"
    else:
        return "sm90", "Hopper GPU and sm_90a kernels built"
    return ("error" if requested == "sm90" else "sm80"), reason


def report() -> str:
    lines = [f"python: {platform.python_version()} ({sys.executable})", f"platform: {platform.platform()}"]
    try:
        import psa
        from psa import _loader
        info = _loader.read_build_info()
        lines.append(f"psa: {psa.__version__} at {os.path.dirname(psa.__file__)}")
    except ImportError as error:
        lines.append(f"psa: cannot be imported: {error}")
        info = {}
    lines.append(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); psa built for torch {info.get('torch')}"
                 f" (CUDA {info.get('cuda')})")
    lines.append(f"compiled CUDA archs: {', '.join(info.get('cuda_archs') or []) or 'none (CPU-only build)'}; "
                 f"Hopper (sm_90a) kernels: {'yes' if info.get('sm90_kernels') else 'no'}")
    has_cuda_backend = bool(info.get("cuda")) and torch.cuda.is_available()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            lines.append(f"GPU {index}: {properties.name}, sm_{properties.major}{properties.minor}, "
                         f"{properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs")
    else:
        lines.append("GPU: none visible to torch")
    lines.append(f"PSA_CUDA_KERNEL: {os.environ.get('PSA_CUDA_KERNEL', 'unset (auto)')}")

    lines.append("ops on CPU tensors: the reference backend (float32/float64/bfloat16/float16)")
    if not has_cuda_backend:
        lines.append("ops on CUDA tensors: unavailable (" + ("CPU-only build" if torch.cuda.is_available()
                                                              else "no GPU") + ")")
        return "\n".join(lines)
    capability = torch.cuda.get_device_capability()
    family, reason = _kernel_family(info, capability)
    if family == "error":
        lines.append(f"ops on CUDA tensors: every call raises: {reason}")
        return "\n".join(lines)
    hopper = family == "sm90"
    lines += [
        f"ops on CUDA tensors (GPU 0, {family}: {reason}):",
        "  kv_pyramid: CUDA pooling kernel (its backward, kv_pyramid_backward: the mirror kernel)",
        "  estimate_importance sampled: " + (
            "row gather + TMA/wgmma GEMM (sm90) for 8, 16 or 32 offsets per block" if hopper
            else "mma.sync kernel (sm80) for 8, 16 or 32 offsets per block") + "; other counts: ATen (cuBLAS)",
        "  estimate_importance pooled: CUDA block means (keys from kv_pyramid's k8 if given), 3xTF32 mma.sync scores",
        "  estimate_importance antidiagonal: " + (
            "TMA/wgmma kernel (sm90; estimate_precision='fp8': quantization, then FP8 wgmma)" if hopper
            else "mma.sync kernel (sm80; estimate_precision='fp8' takes the ATen path)") +
        " where block_m / stride divides 64 and block_n / stride is 8 to 64; otherwise ATen (cuBLAS, chunked)",
        "  assign_levels: CUDA, one CTA per row (n_k <= 4096)",
        "  attention_over_pyramid (attention_with_levels = kv_pyramid + it): " + (
            "TMA/wgmma kernel (sm90) for block_m 64/128 and block_n 64/128 with TMA-compatible strides, "
            "mma.sync (sm80) otherwise" if hopper else "mma.sync kernel (sm80)"),
        "  attention_over_pyramid_backward: delta kernel; dq query-major and dK / dV key-major per level on " + (
            "TMA/wgmma kernels (sm90) where the forward takes its Hopper kernel, else mma.sync" if hopper
            else "mma.sync kernels (sm80)") + "; no atomics",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
