#!/usr/bin/env bash
# The CUDA gate: run ON a GPU machine (an H200 here) with the binaries that
# scripts/build-cuda.sh built and copied into .gpu/ (gitignored):
#   .gpu/decimamba.xz   the CLI, built with --features cuda (stripped, xz-compressed)
#   .gpu/gpu-tests.xz   the tests/gpu.rs test binary
# It finds the CUDA 13 libraries, runs the GPU tests (CUDA vs CPU vs fixtures), then the
# benchmarks, writing logs and JSON into $OUT (default ./gpu-out). Every step has a
# timeout, so a slow step leaves the results of the earlier ones.
#
# Through this workplace's device tool (run from the repo root here, after
# scripts/build-cuda.sh):
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu", ".ref"], timeout_s=600)
# Elsewhere: copy the repo (tests/fixtures is read by the tests) and .gpu/ to the GPU
# machine and run `OUT=results bash scripts/gpu-check.sh`.
#
# GPU_CHECK_QUICK=1 runs only the tests and the 130m bf16 benchmarks (vanilla, DeciMamba and
# each other method). GPU_CHECK_PEERS=1 runs the tests, then only the bf16 130m and 2.8b
# prefill and decode, beside both peers (the comparison the performance issue asks for,
# in one call of the device tool). GPU_CHECK_TESTS=0 skips the tests. Benchmarks report the
# median of REPEATS (default 5) prefills. With .ref/selective_scan present (scripts/
# fetch-reference-src.sh), the reference kernel path is built and timed in the same run and
# scripts/gpu_compare.py writes the side-by-side table to $OUT/compare.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BIN=/tmp/decimamba-gpu
status=0
mkdir -p "$BIN"
for f in decimamba gpu-tests; do
    if [[ -f .gpu/$f.xz ]]; then
        xz -dc ".gpu/$f.xz" >"$BIN/$f" 2>/dev/null \
            || python3 -c 'import lzma,sys;sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' ".gpu/$f.xz" >"$BIN/$f"
    else
        cp ".gpu/$f" "$BIN/$f"
    fi
    chmod +x "$BIN/$f"
done

# Run-time libraries: scripts/gpu-env.sh finds them and sets LD_LIBRARY_PATH.
source scripts/gpu-env.sh
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    LD_LIBRARY_PATH=$LD_LIBRARY_PATH ldd "$BIN/decimamba" | grep -E 'cu|nvrtc|not found'
} 2>&1 | tee "$OUT/env.txt"

# 1. Tests: CUDA logits vs CPU and fixtures, decimation, prefill + decode, 130m shape, and
#    the Candle-ops backend on CUDA against the kernels.
echo "== GPU tests"
if [[ ${GPU_CHECK_TESTS:-1} == 0 ]]; then
    echo "skipped (GPU_CHECK_TESTS=0)"
else
    timeout 240 "$BIN/gpu-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/gpu-tests.log"
    rc=${PIPESTATUS[0]}
    echo "gpu tests exit $rc"
    [[ $rc == 0 ]] || status=1
fi

# 2. Benchmarks (random weights, batch 1), anchors in ../shared/bench/gpu-anchors.md.
bench() { # bench <seconds> <name> <args...>
    local secs=$1 name=$2
    shift 2
    echo "== bench $name: $*"
    timeout "$secs" "$BIN/decimamba" bench --device cuda --repeats "${REPEATS:-5}" "$@" --json "$OUT/bench-$name.json" 2>&1 \
        | tee -a "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    echo "bench $name exit $rc" | tee -a "$OUT/bench.log"
    [[ $rc == 0 ]] || status=1
}
# DeciMamba as the reference times it (and as the anchors): layer 12 keeps 2,000 tokens.
DECI="--compare-decimation --deci-layers 12 --deci-lbase 2000"
bench 120 130m-bf16 --shape 130m --dtype bf16 --lengths 2k,8k,32k,128k --decode 256 $DECI
PEERS=${GPU_CHECK_PEERS:-}
if [[ -n $PEERS ]]; then
    bench 200 2.8b-bf16 --shape 2.8b --dtype bf16 --lengths 2k,8k,32k,128k --decode 256 $DECI
    # The stage profile with each stage's share of the roofline (synchronised, so slower;
    # its log only: gpu_compare.py reads the JSON in $OUT).
    for shape in 130m 2.8b; do
        echo "== profile $shape bf16, 32K" | tee -a "$OUT/profile.log"
        DECIMAMBA_CUDA_PROFILE=1 timeout 120 "$BIN/decimamba" bench --device cuda --repeats 1 \
            --shape $shape --dtype bf16 --lengths 32k --decode 0 2>&1 | tee -a "$OUT/profile.log"
    done
fi
if [[ -z $PEERS ]]; then
    # Each other method's prefill against vanilla in the same run (plan values do not change
    # the work; scripts/bench_policies.py writes policies that fit the shape).
    python3 scripts/bench_policies.py 130m "$OUT/policies" >/dev/null
    for policy in mambaextend mambaextend-channel modulation longmamba; do
        bench 90 "130m-bf16-$policy" --shape 130m --dtype bf16 --lengths 2k,8k,32k,128k --decode 0 \
            --policy "$OUT/policies/$policy-130m.json"
    done
    # The Candle-ops backend (--backend candle) beside the CUDA kernels, in the same run.
    bench 150 130m-bf16-backends --shape 130m --dtype bf16 --lengths 2k,8k --decode 64 \
        --compare-backends
    if [[ -z ${GPU_CHECK_QUICK:-} ]]; then
        bench 200 2.8b-bf16 --shape 2.8b --dtype bf16 --lengths 2k,8k,32k,128k --decode 256 $DECI
        bench 120 130m-f32 --shape 130m --dtype f32 --lengths 2k,8k,32k,128k --decode 256 $DECI
        bench 120 2.8b-f32 --shape 2.8b --dtype f32 --lengths 2k,8k --decode 0 $DECI
        # Memory: 2.8b bf16, vanilla, 512K tokens in one prefill on one GPU.
        REPEATS=1 bench 150 2.8b-bf16-512k --shape 2.8b --dtype bf16 --lengths 512k --decode 0
    fi
fi

# 2b. Sweep throughput: passkey and eval-ppl at batch 1 against batch 16 (scripts/
#     sweep-throughput.sh; needs data/tokenizers and data/austen carried with .gpu).
if [[ -z $PEERS ]]; then
    echo "== sweep throughput"
    BIN=$BIN OUT=$OUT timeout 420 bash scripts/sweep-throughput.sh || status=1
fi
# 2c. Several GPUs: the worker pool and shards + merge against one GPU (MULTI_GPU=1 runs the
#     same commands on one GPU).
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [[ $ngpu -ge 2 || ${MULTI_GPU:-0} == 1 ]]; then
    echo "== multi-GPU sweeps on $ngpu GPU(s)"
    BIN=$BIN OUT=$OUT timeout 420 bash scripts/multi-gpu-sweep.sh || status=1
fi

# 3. The reference in the same run: mamba_ssm's selective-scan kernel around PyTorch (the
#    authors' non-fused path), built here from .ref/selective_scan (scripts/
#    fetch-reference-src.sh fetches it; carry it with .gpu). Then the side-by-side table.
REF_RUNS=130m:bf16,2.8b:bf16,130m:fp32,2.8b:fp32
[[ -n $PEERS ]] && REF_RUNS=130m:bf16,2.8b:bf16
if [[ -z ${GPU_CHECK_QUICK:-} && -f .ref/selective_scan/selective_scan.cpp ]]; then
    echo "== reference: mamba_ssm selective_scan (non-fused PyTorch path)"
    PYTHONUNBUFFERED=1 timeout $(( ${REF_DEADLINE:-250} + 40 )) python3 scripts/gpu_reference_bench.py --src .ref/selective_scan \
        --runs $REF_RUNS --lengths 2k,8k,32k,128k --decimated \
        --deadline ${REF_DEADLINE:-250} --out "$OUT" 2>&1 | tee "$OUT/reference.log"
fi
# 3b. The fused peer (mamba_inner_fn + causal-conv1d + Triton add+norm, generate with
#     cg=True), built from the sdists in .ref (scripts/fetch-reference-src.sh); after the
#     reference, whose selective-scan build it reuses.
if [[ -z ${GPU_CHECK_QUICK:-} && -f .ref/py/mamba_ssm/__init__.py ]]; then
    echo "== peer: mamba_ssm fused inference path"
    OUT=$OUT FUSED_DEADLINE=${FUSED_DEADLINE:-240} bash scripts/gpu-fused-peer.sh || status=1
fi
if [[ -z ${GPU_CHECK_QUICK:-} && -d .ref ]]; then
    python3 scripts/gpu_compare.py "$OUT" | tee "$OUT/compare.md"
fi
exit $status
