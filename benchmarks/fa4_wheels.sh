#!/usr/bin/env bash
# FlashAttention-4 (`flash-attn-4`, CuTe-DSL kernels) as a benchmark peer on a GPU machine without a
# registry. Its nvidia-cutlass-dsl-libs-cu13 wheel (92 MB) is larger than what one call may carry, so:
#
#   bash benchmarks/fa4_wheels.sh prepare     # where pip works: wheels into .fa4/, the big one split
#                                             # into parts of 31 MB, one folder per call: .fa4/1 .fa4/2 ...
#   bash benchmarks/fa4_wheels.sh collect     # on the GPU machine, once per carried folder, in calls
#                                             # close enough that the machine stays warm: gathers the
#                                             # parts in /tmp/fa4-parts; once all are there, joins them
#                                             # and installs everything into /tmp/fa4site
# The DSL's Python package (cutlass.cute) is in nvidia-cutlass-dsl-libs-core, a dependency of libs-base:
# without it `import flash_attn.cute` fails with "No module named 'cutlass.cute'".
#
# bench_attention.py --site /tmp/fa4site then times FA4 dense and block-sparse beside psa (gpu_session.sh
# passes it when /tmp/fa4site exists). FA4's packages are installed with --target, so they only become
# importable through site.addsitedir (the CuTe DSL relies on a .pth file).
set -euo pipefail
cd "$(dirname "$0")/.."

FA4_VERSION=4.0.0b36
DSL_VERSION=4.8.1
PART_BYTES=31m

case "${1:-}" in
  prepare)
    rm -rf .fa4 && mkdir -p .fa4/download
    platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:)
    python3 -m pip download -q --no-deps "${platform[@]}" -d .fa4/download \
      "flash-attn-4==$FA4_VERSION" "nvidia-cutlass-dsl==$DSL_VERSION" "nvidia-cutlass-dsl-libs-base==$DSL_VERSION" \
      "nvidia-cutlass-dsl-libs-cu13==$DSL_VERSION" "nvidia-cutlass-dsl-libs-core==$DSL_VERSION" \
      "cuda-bindings>=12.8,<14" cuda-pathfinder "protobuf>=4.21.12" \
      "quack-kernels>=0.5.3" "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext "einops<0.9"
    big=$(ls .fa4/download/nvidia_cutlass_dsl_libs_cu13-*.whl)
    (cd .fa4/download && sha256sum ./*.whl > ../SHA256SUMS)
    split -b "$PART_BYTES" -d -a 2 "$big" ".fa4/download/$(basename "$big").part-"
    rm "$big"
    # One folder per call: each part, the small wheels and the checksums with the first.
    n=1
    for part in .fa4/download/*.part-*; do
      mkdir -p ".fa4/$n" && mv "$part" ".fa4/$n/" && n=$((n + 1))
    done
    mv .fa4/download/*.whl .fa4/SHA256SUMS .fa4/1/
    rmdir .fa4/download
    echo "$((n - 1))" > .fa4/1/PARTS
    du -sh .fa4/*
    ;;
  collect)
    mkdir -p /tmp/fa4-parts
    for folder in .fa4/*/; do cp -n "$folder"* /tmp/fa4-parts/ 2>/dev/null || true; done
    cd /tmp/fa4-parts
    [ -f PARTS ] || { echo "fa4: waiting for the folder with PARTS"; exit 0; }
    have=$(ls ./*.part-* 2>/dev/null | wc -l)
    if [ "$have" -lt "$(cat PARTS)" ]; then echo "fa4: $have of $(cat PARTS) parts here"; exit 0; fi
    first=$(ls ./*.part-* | head -1)
    cat $(ls ./*.part-* | sort) > "${first%.part-*}"
    sha256sum -c --quiet SHA256SUMS
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site ./*.whl
    echo "fa4: installed into /tmp/fa4site"
    ;;
  *)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
