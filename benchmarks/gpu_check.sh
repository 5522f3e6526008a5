#!/usr/bin/env bash
# One remote call on a GPU machine, from the repo root: build, GPU tests, benchmarks. Logs and new
# result files are collected in $OUT/gpu_check.tgz (the device tool brings back at most 8 files), and
# the summary is also $OUT/summary.txt; unpack with `tar xzf gpu_check.tgz` (results/ then logs/).
#
#   bash benchmarks/gpu_check.sh                               # build, then the gpu tests
#   bash benchmarks/gpu_check.sh tests bench:norm              # builds first only if not installed yet
#   bash benchmarks/gpu_check.sh "bench:norm:--ops rmsnorm --quick"   # bench:NAME[:ARGS]
#   bash benchmarks/gpu_check.sh tests:attention               # pytest -m gpu tests/test_attention*.py
#   steps: build, tests (pytest -m gpu), tests:NAME (one family's files), tests:all (the whole suite),
#   bench:NAME[:ARGS]
# GPU_CHECK_BUDGET_S=S: the seconds this call may take (the device call's timeout_s less ~10 s). Each step
# then runs under `timeout` of what is left, and a step with under a minute left is skipped (the summary
# says so), so the steps that finished come back packed even when the last one is cut off.
# GPU_CHECK_WORKERS=N (default 8): the kernel test files (attention, norm, paged, quant) run in N pytest-xdist
# processes where xdist is installed: Triton compiling is CPU work and the GPU has room for all of them. The
# other gpu tests (engine, models, ...) read the device's free memory, so they run alone, after those.
# Test steps set LLMFAST_AUTOTUNE=first (kernels/tuning.py): each autotuned kernel compiles and runs the
# first config that fits of each kind, not all ~50 for each of ~30 attention sets. Benchmarks tune fully.
# One call runs at most 600 s: give each benchmark a call of its own (bench_throughput: one --parts each).
# --quick runs of the benchmarks write to a temp folder: smoke tests, not collected.
# The running step's log is also $OUT/current_step.log, so a step killed at the time limit leaves it.
#
# Carried wheels in .whl/ (e.g. liger_kernel, pytest) are installed to /tmp/site first.
set -o pipefail
export PYTHONUNBUFFERED=1
export LLMFAST_REQUIRE_IMPORTS=1  # tests/conftest.py: a test skipped for a missing package (transformers?) fails
OUT=${OUT:-/tmp/gpu_check_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT" "$LOGS/logs" "$LOGS/results"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests)
summary=()
failed=0

pack() {  # after every step, so a run cut off by the time limit still brings back what it finished
    find benchmarks/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$LOGS/results/" \;
    tar czf "$OUT/gpu_check.tgz" -C "$LOGS" logs results
}

run_step() {  # run_step NAME LOG COMMAND...: times COMMAND, tees it into logs/LOG, records the outcome
    local name=$1 log=$2 start=$SECONDS rc left
    shift 2
    left=$((${GPU_CHECK_BUDGET_S:-100000} - SECONDS - 20))  # a step killed at the end: 10 s, then 10 to pack
    if [ $left -lt 60 ]; then
        summary+=("$(printf '%-32s %-8s' "$name" "skipped: ${left}s left of GPU_CHECK_BUDGET_S")")
        failed=$((failed + 1))
        return
    fi
    echo "=== $name"
    # COMMAND may be a function of this script: the child bash gets its definition
    timeout -k 10 $left bash -c "$(declare -f build gpu_tests gpu_test_files); \"\$@\"" "$name" "$@" 2>&1 |
        tee "$LOGS/logs/$log" "$OUT/current_step.log"
    rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "=== $name: stopped at the GPU_CHECK_BUDGET_S limit" | tee -a "$LOGS/logs/$log"
    [ $rc -ne 0 ] && failed=$((failed + 1))
    pack
    summary+=("$(printf '%-32s %-8s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL($rc)")" $((SECONDS - start)) "$log")")
}

build() {
    # torch takes CUDA_HOME from the nvcc on PATH, which may be a wrapper script outside the toolkit
    [ -z "${CUDA_HOME:-}" ] && [ -e /usr/local/cuda/include/cuda_runtime.h ] && export CUDA_HOME=/usr/local/cuda
    MAX_JOBS=16 LLMFAST_CUDA_ARCHS=90a python3 -m pip install --no-build-isolation --no-deps -e . &&
        python3 -c "import llmfast, llmfast_kernels, llmfast._C_cuda; print('backends:', llmfast.available_backends('add_rms_norm'))"
}

gpu_test_files() {  # [XDIST_ARGS...] -- FILES...: pytest -m gpu on FILES
    local xdist=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do xdist+=("$1"); shift; done
    shift
    LLMFAST_AUTOTUNE=${LLMFAST_AUTOTUNE:-first} python3 -m pytest -q -x -m gpu "${xdist[@]}" "$@"
    local rc=$?
    [ $rc -eq 5 ] && { echo "no tests are marked gpu in $*"; return 0; }
    return $rc
}

gpu_tests() {  # [FILES...], default tests/: the kernel files in xdist processes first, then the rest alone
    local files=("${@:-tests/}") kernels=() rest=() workers=() f
    [ "${files[*]}" = tests/ ] && files=(tests/test_*.py)
    for f in "${files[@]}"; do
        case $f in
            tests/test_attention*.py | tests/test_norm*.py | tests/test_nn_norm*.py | tests/test_paged*.py | \
                tests/test_quant*.py) kernels+=("$f") ;;
            *) rest+=("$f") ;;
        esac
    done
    if [ "${GPU_CHECK_WORKERS:-8}" -gt 1 ]; then
        if python3 -c "import xdist" 2> /dev/null; then
            workers=(-n "${GPU_CHECK_WORKERS:-8}")
        else
            echo "pytest-xdist is missing: the kernel test files run in one process"
        fi
    fi
    if [ ${#kernels[@]} -gt 0 ]; then gpu_test_files "${workers[@]}" -- "${kernels[@]}" || return; fi
    if [ ${#rest[@]} -gt 0 ]; then gpu_test_files -- "${rest[@]}"; fi
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
gpu=$(nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv)
echo "$gpu"
stamp=$(mktemp)  # results written after this are this run's

if [[ " ${steps[*]} " != *" build "* ]] && ! python3 -c "import llmfast_kernels" 2> /dev/null; then
    steps=(build "${steps[@]}")  # a fresh machine: nothing to test without the package installed
fi
for step in "${steps[@]}"; do
    case $step in
        build) run_step build build.log build ;;
        tests) run_step "pytest -m gpu" gpu_tests.log gpu_tests ;;
        tests:all) run_step "pytest (all)" all_tests.log python3 -m pytest -q tests/ ;;
        tests:*) run_step "pytest -m gpu ${step#tests:}" "gpu_tests_${step#tests:}.log" gpu_tests tests/test_"${step#tests:}"*.py ;;
        bench:*)
            spec=${step#bench:}
            name=${spec%%:*}
            args=""
            [[ $spec == *:* ]] && args=${spec#*:}
            # shellcheck disable=SC2086  # ARGS are meant to split into words
            run_step "bench $name $args" "bench_$name.log" python3 -m benchmarks.bench_$name $args ;;
        *) echo "unknown step '$step' (build, tests, tests:NAME, tests:all, bench:NAME[:ARGS])"; failed=$((failed + 1)) ;;
    esac
done

pack
rm -f "$stamp"
{
    echo "=== summary"
    echo "$gpu" | tail -n +2
    printf '%s\n' "${summary[@]}"
    echo "new results: $(ls "$LOGS/results" | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
[ $failed -eq 0 ]
