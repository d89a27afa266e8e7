"""The sm_90a machine code of the build: the Hopper kernels really run on wgmma and TMA.

Reads psa/_C's SASS with cuobjdump (the CUDA toolkit's, or the copy Triton ships), so it needs no GPU
and runs in CI wherever psa was built with sm_90a and CUTLASS.
"""

import glob
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

import psa
from psa import _loader


def find_cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else None


def library_path():
    matches = glob.glob(os.path.join(os.path.dirname(psa.__file__), "_C*.so"))
    return matches[0] if matches else None


CUOBJDUMP = find_cuobjdump()
pytestmark = pytest.mark.skipif(
    not _loader.read_build_info().get("sm90_kernels") or CUOBJDUMP is None or library_path() is None,
    reason="needs a build with the sm_90a kernels and cuobjdump")


@pytest.fixture(scope="module")
def sm90_instructions():
    """{mangled kernel name: Counter of opcodes} of the sm_90a code in psa/_C."""
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", "-arch", "sm_90a", library_path()], check=True,
                          capture_output=True, text=True).stdout
    kernels, current = {}, None
    for line in sass.splitlines():
        function = re.match(r"\s*Function : (\S+)", line)
        if function:
            current = kernels.setdefault(function.group(1), Counter())
            continue
        instruction = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]+)?\b", line)
        if current is not None and instruction:
            current[instruction.group(1)] += 1
    return kernels


def kernels_named(instructions, pattern):
    return {name: counts for name, counts in instructions.items() if re.search(pattern, name)}


def test_hopper_attention_kernels_use_wgmma_and_tma_without_spills(sm90_instructions):
    kernels = kernels_named(sm90_instructions, r"attention_with_levels_sm90_kernel")
    # bf16/fp16 x head_dim 64/128 x block_m 64/128 (generate_instantiations.py), each as the forward and as
    # the backward's dq pass (the template's last argument, kDq: "Lb0E" / "Lb1E" in the mangled name).
    assert len(kernels) == 16, sorted(kernels)
    assert sum("Lb1E" in name for name in kernels) == 8, sorted(kernels)
    for name, counts in kernels.items():
        assert counts["HGMMA"] > 0, f"{name}: no HGMMA"
        assert counts["UTMALDG"] > 0, f"{name}: no TMA loads"
        assert counts["STL"] == 0 and counts["LDL"] == 0, f"{name}: local memory (register spills)"


def test_hopper_key_major_backward_uses_wgmma_and_tma_without_spills(sm90_instructions):
    kernels = kernels_named(sm90_instructions, r"attention_backward_dkdv_sm90_kernel")
    # bf16/fp16 x head_dim 64/128 x 64/128 keys per CTA (generate_instantiations.py).
    assert len(kernels) == 8, sorted(kernels)
    for name, counts in kernels.items():
        assert counts["HGMMA"] > 0, f"{name}: no HGMMA"
        assert counts["UTMALDG"] > 0, f"{name}: no TMA loads"
        assert counts["STL"] == 0 and counts["LDL"] == 0, f"{name}: local memory (register spills)"


@pytest.mark.parametrize("estimator,hopper_variants,fp8_variants", [("sampled", 12, 0), ("antidiagonal", 6, 2)])
def test_hopper_estimators_use_wgmma_and_tma_without_spills(sm90_instructions, estimator, hopper_variants,
                                                            fp8_variants):
    hopper = kernels_named(sm90_instructions, rf"estimate_{estimator}_sm90_kernel")
    portable = kernels_named(sm90_instructions, rf"estimate_{estimator}_kernel")
    # bf16/fp16 x head_dim 64/128 (x 8/16/32 key samples for sampled; antidiagonal also FP8 scoring's e4m3
    # operands x 64/128); the portable kernel: bf16/fp16 x 64/128.
    assert len(hopper) == hopper_variants and len(portable) == 4, (sorted(hopper), sorted(portable))
    assert sum("fp8" in name for name in hopper) == fp8_variants, sorted(hopper)
    for name, counts in hopper.items():
        # FP8 wgmma is QGMMA in SASS, the 16-bit one HGMMA.
        mma, other = ("QGMMA", "HGMMA") if "fp8" in name else ("HGMMA", "QGMMA")
        assert counts[mma] > 0 and counts[other] == 0 and counts["UTMALDG"] > 0, f"{name}: no {mma} or no TMA loads"
        assert counts["STL"] == 0 and counts["LDL"] == 0, f"{name}: local memory (register spills)"
    # The portable kernel, compiled for the same target, stays on mma.sync.
    assert all(counts["HGMMA"] == 0 and counts["HMMA"] > 0 for counts in portable.values())
