#!/usr/bin/env bash
# One call on a GPU machine without a registry: install the carried CUTLASS wheel, build psa for
# Hopper, then run the steps named on the command line, in order, logging each to $OUT (or /tmp):
#   tests [pytest args...]  the CUDA suite (or the given test files / -k expressions) until the next step;
#                           with .whl_e2e/ carried, diffusers is installed first so its tests run too
#   sanitizer               compute-sanitizer memcheck and racecheck on tests/sanitizer_case.py
#   racecheck               racecheck alone (its whole report in the step's log)
#   bench [args...]         benchmarks/bench_attention.py with the given arguments (with FA4 beside psa
#                           when benchmarks/fa4_wheels.sh has installed it into /tmp/fa4site)
#   fa4                     benchmarks/fa4_wheels.sh collect: gather the carried FA4 wheel parts
#   e2e [args...]           benchmarks/bench_e2e.py (a Wan-sized denoising step, dense vs psa); needs
#                           diffusers: its wheel and its dependencies' carried in .whl_e2e/ (pip takes
#                           only those the environment lacks)
#   prefill [args...]       benchmarks/bench_prefill.py (causal VLM prefill attention, then a small model's
#                           per-layer level statistics on cockatoo.mp4 when .whl_demo/ is carried)
#   ulysses [args...]       benchmarks/bench_ulysses.py (needs as many GPUs as --world, default 2, and
#                           diffusers from .whl_e2e/ as e2e does)
#   rowcost [args...]       benchmarks/bench_row_cost.py (the attention kernel's fixed cost per row)
#   ncu [args...]           Nsight Compute on one attention launch (benchmarks/profile_attention.py args;
#                           with --estimator X and NCU_KERNEL=estimate_, on one estimator launch; the
#                           second call's, or NCU_COUNT launches after NCU_SKIP matching ones):
#                           the report, its per-SASS-instruction source page as CSV and the details
#                           page into $OUT; the headline metrics printed
#   train [args...]         benchmarks/train_with_psa.py (fine-tuning through psa vs dense); needs .whl_demo/
#                           carried: the PyAV wheel and clip/cockatoo.mp4
#   patch FILE              apply FILE (a `git diff` of a variant, carried untracked) with patch -p1 and
#                           rebuild (ninja recompiles what it touches): A/B of kernel variants in one call
#   unpatch FILE            take FILE back out (patch -R) and rebuild, before the next variant's patch
#   swap OLD NEW            take OLD out and apply NEW with one rebuild (A/B of several variants in a row)
# Example: bash benchmarks/gpu_session.sh tests tests/test_cuda_sm90.py bench --shapes wan1.3b_480p
# Each step is cut off after STEP_TIMEOUT seconds (default 400), so a hung kernel still leaves the
# other steps' output. Wheels in .whl/: nvidia_cutlass-4.2.0.0 and setuptools>=77 (see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
# setuptools too: pyproject.toml's SPDX license field needs setuptools >= 77, newer than some images'.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export CUTLASS_INCLUDE_DIR=/tmp/site/cutlass_library/source/include
build() {
  local start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} PSA_CUDA_ARCHS=${PSA_CUDA_ARCHS:-9.0a} \
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$log_dir/build.log" 2>&1 \
    || { tail -40 "$log_dir/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
}
build
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader

limit="timeout ${STEP_TIMEOUT:-400}"
# PyAV and cockatoo.mp4 from the carried .whl_demo/ (the machine has no registry and no apt).
demo_data() {
  [ -d .whl_demo ] || { echo "no .whl_demo/ carried: PyAV and the clip are missing"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_demo/av-*.whl \
    && mkdir -p ~/.cache/psa && cp .whl_demo/clip/cockatoo.mp4 ~/.cache/psa/
}
# diffusers and the dependencies the environment lacks, from the carried .whl_e2e/.
diffusers_wheels() { python3 -m pip install -q --no-index --find-links .whl_e2e diffusers; }
# compute-sanitizer with one tool on tests/sanitizer_case.py: the whole report into the step's log, its
# first findings (which kernel, which access) and the summary printed.
sanitize() {
  local log; log=$(step_log "$1")
  $limit compute-sanitizer --tool "$1" python3 tests/sanitizer_case.py >"$log" 2>&1
  grep -m 12 -E "^========= +(Error|Invalid|Race|Read|Write|at )" "$log"; tail -3 "$log"
}
step=""; args=(); step_number=0
# Each step logs to its own numbered file, so an A/B call keeps every variant's table.
step_log() { printf '%s/%02d_%s.log' "$log_dir" "$step_number" "$1"; }
run_step() {
  step_number=$((step_number + 1))
  case "$step" in
    tests) [ -d .whl_e2e ] && diffusers_wheels  # then tests/test_diffusers*.py run instead of skipping
           $limit python3 -m pytest -q -x -p no:cacheprovider "${args[@]:-tests}" 2>&1 | tee "$(step_log tests)" \
             | tail -25
           # What the tail cuts: which test failed first, its first assertion lines, and hypothesis's
           # falsifying example; so the call's output alone says what failed.
           if grep -q "^FAILED" "$(step_log tests)"; then
             grep -m 1 -E "^_{5,} .* _{5,}$" "$(step_log tests)"; grep -m 20 "^E " "$(step_log tests)"
             grep -m 1 -A 40 "Falsifying example" "$(step_log tests)"
           fi ;;
    sanitizer) sanitize memcheck; sanitize racecheck ;;
    racecheck) sanitize racecheck ;;
    bench)
      site=(); [ -d /tmp/fa4site ] && site=(--site /tmp/fa4site)
      $limit python3 benchmarks/bench_attention.py "${site[@]}" "${args[@]}" 2>&1 | tee "$(step_log bench)" ;;
    fa4) bash benchmarks/fa4_wheels.sh collect ;;
    e2e) diffusers_wheels
         $limit python3 benchmarks/bench_e2e.py "${args[@]}" 2>&1 | tee "$(step_log e2e)" ;;
    prefill) demo_data; $limit python3 benchmarks/bench_prefill.py "${args[@]}" 2>&1 | tee "$(step_log prefill)" ;;
    ulysses) diffusers_wheels
             $limit python3 benchmarks/bench_ulysses.py "${args[@]}" 2>&1 | tee "$(step_log ulysses)" ;;
    rowcost) $limit python3 benchmarks/bench_row_cost.py "${args[@]}" 2>&1 | tee "$(step_log rowcost)" ;;
    ncu)
      # One report per argument list (attention_map_psa, ...); --clock-control none: the lent machine's
      # clocks stay as they are (device METHOD.md).
      name=$(echo "attention ${args[*]:-}" | tr -cs 'A-Za-z0-9.' '_' | sed 's/_*$//')
      $limit ncu --clock-control none --set full --import-source no -k "regex:${NCU_KERNEL:-attention_with_levels}" \
        --launch-skip "${NCU_SKIP:-1}" --launch-count "${NCU_COUNT:-1}" -f -o "$log_dir/$name" \
        python3 benchmarks/profile_attention.py "${args[@]}" 2>&1 | tail -3
      ncu -i "$log_dir/$name.ncu-rep" --page source --print-source sass --csv >"$log_dir/${name}_sass.csv" 2>&1
      ncu -i "$log_dir/$name.ncu-rep" --page details >"$log_dir/${name}_details.txt" 2>&1
      grep -E "Duration|Issue Slots Busy|Issued Ipc Active|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Compute \(SM\) Throughput|L2 Hit Rate|Executed Ipc" \
        "$log_dir/${name}_details.txt" | head -20 ;;
    train) demo_data && $limit python3 benchmarks/train_with_psa.py "${args[@]}" 2>&1 | tee "$(step_log train)" ;;
    patch) echo "== patch ${args[0]}"; patch -p1 --forward < "${args[0]}" | tail -3 && build ;;
    unpatch) echo "== unpatch ${args[0]}"; patch -p1 -R < "${args[0]}" | tail -3 && build ;;
    swap) echo "== swap ${args[0]} -> ${args[1]}"
          { patch -p1 -R < "${args[0]}" && patch -p1 --forward < "${args[1]}"; } | tail -3 && build ;;
    "") ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
}
for word in "$@"; do
  case "$word" in
    tests|sanitizer|racecheck|bench|fa4|e2e|prefill|ulysses|rowcost|ncu|train|patch|unpatch|swap) run_step; step=$word; args=() ;;
    *) args+=("$word") ;;
  esac
done
run_step
