#!/usr/bin/env bash
# Packaging check, run by .ci/run before the tests: the sdist builds (CPU-only, to keep CI short), the
# wheel it gives is abi3 and pins the torch it was built with, the build writes nothing into the
# unpacked source, and the wheel installed into a fresh virtual environment imports psa, psa.tools and
# psa.integrations.diffusers from outside any source tree. The venv sees the system's torch
# (--system-site-packages) instead of downloading another.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m build --sdist --no-isolation -o "$work/dist" . >"$work/sdist.log" 2>&1 || { tail -20 "$work/sdist.log"; exit 1; }
tar xzf "$work"/dist/psa-*.tar.gz -C "$work"
source_dir=$(echo "$work"/psa-*/)
(cd "$source_dir" && PSA_BUILD_CUDA=0 pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . \
   >"$work/wheel.log" 2>&1) || { tail -30 "$work/wheel.log"; exit 1; }
python - "$work/dist" "$source_dir" <<'PY'
import glob, re, sys, zipfile
import torch
dist, source = sys.argv[1], sys.argv[2]
wheels = glob.glob(f"{dist}/psa-*.whl")
assert len(wheels) == 1, wheels
name = wheels[0].rsplit("/", 1)[1]
assert re.fullmatch(r"psa-[\d.]+-cp310-abi3-linux_x86_64\.whl", name), f"not an abi3 wheel: {name}"
with zipfile.ZipFile(wheels[0]) as wheel:
    files = set(wheel.namelist())
    metadata = wheel.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
for needed in ("psa/_C.abi3.so", "psa/_build_info.json", "psa/tools/__init__.py",
               "psa/integrations/diffusers.py"):
    assert needed in files, f"{needed} missing from the wheel"
torch_release = re.match(r"[\d.]+", torch.__version__).group(0)
pins = re.findall(r"^Requires-Dist: (torch\S*)$", metadata, re.M)
assert pins == [f"torch=={torch_release}"], f"torch pin {pins}, built with torch {torch.__version__}"
assert "License-Expression: Apache-2.0" in metadata
written = glob.glob(f"{source}/psa/_C*") + glob.glob(f"{source}/psa/_build_info.json")
assert not written, f"the wheel build wrote into the source tree: {written}"
print(f"packaging: {name}, requires torch=={torch_release}")
PY
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-deps "$work"/dist/psa-*.whl
(cd "$work" && "$work/venv/bin/python" - "$work/venv" <<'PY'
import sys
import torch
import psa, psa.tools, psa.integrations.diffusers
assert psa.__file__.startswith(sys.argv[1]), f"imported {psa.__file__}, not the installed wheel"
q = torch.randn(1, 2, 200, 64)
assert psa.sparse_attention(q, q, q).shape == q.shape
print(f"packaging: the installed wheel imports and runs from {psa.__file__}")
PY
)
