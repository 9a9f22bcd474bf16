#!/usr/bin/env bash
# Kernel tuning on a GPU machine, in one run: decode and prefill of the random 130m and
# 2.8b shapes (bf16, batch 1) under other kernel sources and compile-time knobs, all from
# one binary, so every number is side by side. Run after scripts/build-cuda.sh, with the
# kernel source to compare against (e.g. the last commit's) in .gpu/baseline.cu:
#   git show HEAD~1:src/model/cuda.kernels.cu > .gpu/baseline.cu
#   run(command="bash scripts/gpu-tune.sh", carry=[".gpu"])
# Knobs (README, "Knobs for GPU work"): DECIMAMBA_CUDA_SOURCE (another kernel file),
# DECIMAMBA_NVRTC_FLAGS (-DSCAN_UNROLL, -DSCAN_MIN_BLOCKS, -DTILE, -DSCAN_PREFETCH,
# -DMATVEC_UNROLL, -DMATVEC_MIN_BLOCKS, -DMATVEC_EVICT_FIRST, -DL2_PREFETCH_LINES),
# DECIMAMBA_DECODE_PREFETCH_MB (L2 prefetch lead of decode), DECIMAMBA_SCAN_TARGET_THREADS (time chunks of the
# scan), DECIMAMBA_CUDA_PDL=0 (decode without programmatic dependent launch).
# TUNE_SET=decode, TUNE_SET=scan, TUNE_SET=prefetch and TUNE_SET=prefill: see below. TUNE_TESTS=1 first runs the GPU tests (with TUNE_TEST_FLAGS as DECIMAMBA_NVRTC_FLAGS); TUNE_SET=base times only the baseline against the
# current kernels (prefill at TUNE_LENGTHS, default 32k, and decode), then the decode profiles. Writes $OUT/tune.md (one line per run) and the
# bench JSON of each run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BIN=/tmp/decimamba-gpu
mkdir -p "$BIN"
for f in decimamba gpu-tests; do
    [[ -f .gpu/$f.xz ]] && xz -dc ".gpu/$f.xz" >"$BIN/$f" && chmod +x "$BIN/$f"
done
source scripts/gpu-env.sh >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
status=0
if [[ ${TUNE_TESTS:-0} == 1 ]]; then
    # TUNE_TEST_ENV: more runs of the tests, one per space-separated NAME=VALUE (e.g.
    # DECIMAMBA_SCAN=single), after the one with the defaults.
    for test_env in DEFAULTS=1 ${TUNE_TEST_ENV:-}; do
        log="$OUT/gpu-tests-${test_env//[^A-Za-z0-9_=-]/-}.log"
        env "$test_env" DECIMAMBA_NVRTC_FLAGS=${TUNE_TEST_FLAGS:-} timeout 240 "$BIN/gpu-tests" --test-threads 1 >"$log" 2>&1
        rc=$?
        echo "gpu tests ($test_env) exit $rc: $(grep -E '^test result' "$log" | tail -1)" | tee -a "$OUT/tune.md"
        [[ $rc == 0 ]] || status=1
    done
fi
BASE=.gpu/baseline.cu

# one <name> <timeout> <env assignments...> -- <bench args...>: one bench process.
one() {
    local name=$1 secs=$2
    shift 2
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    if [[ " ${envs[*]} " == *"DECIMAMBA_CUDA_SOURCE=$BASE"* && ! -f $BASE ]]; then
        echo "| $name | skipped: no $BASE |" | tee -a "$OUT/tune.md"
        return
    fi
    env "${envs[@]}" timeout "$secs" "$BIN/decimamba" bench --device cuda --dtype bf16 \
        --repeats "${REPEATS:-5}" "$@" --json "$OUT/tune-$name.json" >"$OUT/tune-$name.log" 2>&1
    local rc=$?
    [[ $rc == 0 ]] || status=1
    python3 - "$name" "$OUT/tune-$name.json" "$rc" "${envs[*]}" <<'PY' | tee -a "$OUT/tune.md"
import json, sys
name, path, rc, envs = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    print(f"| {name} | exit {rc}, no report | {envs} |")
    sys.exit()
pre = " ".join(f"{int(k) // 1024}K {v['s'] * 1e3:.2f} ms" for k, v in sorted(
    r.get("prefill", {}).items(), key=lambda kv: int(kv[0])))
dec = r.get("decode") or {}
tps = dec.get("tok_per_s") or dec.get("tokens_per_s")
print(f"| {name} | {r.get('model')} | {pre} | decode {tps and f'{tps:.1f} tok/s'} | {envs} | exit {rc} |")
PY
}

echo "| run | model | prefill | decode | knobs | |" | tee -a "$OUT/tune.md"
# The baseline kernels have no griddep_wait: never launch them with PDL.
OLD="DECIMAMBA_CUDA_SOURCE=$BASE DECIMAMBA_CUDA_PDL=0"
# TUNE_SET=base: only the baseline source against this one (decode, and prefill at 32K).
if [[ ${TUNE_SET:-all} == base ]]; then
    for shape in 130m 2.8b; do
        D="--shape $shape --lengths ${TUNE_LENGTHS:-32k} --decode 256"
        one "$shape-base" 200 $OLD -- $D
        one "$shape" 200 X=1 -- $D
        one "$shape-nopdl" 200 DECIMAMBA_CUDA_PDL=0 -- $D
        one "$shape-stagevec" 200 DECIMAMBA_NVRTC_FLAGS=-DSTAGE_VEC=1 -- $D
        # The per-kernel decode profile (CUDA events, graphs off): where a token's time goes.
        P="--shape $shape --lengths 2k --decode 64"
        one "$shape-profile" 120 DECIMAMBA_CUDA_PROFILE=1 -- $P
        one "$shape-profile-stagevec" 120 DECIMAMBA_CUDA_PROFILE=1 DECIMAMBA_NVRTC_FLAGS=-DSTAGE_VEC=1 -- $P
    done
    exit $status
fi
# TUNE_SET=decode: the persistent decode step against the per-stage kernels
# (DECIMAMBA_DECODE_PERSISTENT=0) and .gpu/prev.cu (the previous kernel source, per stage,
# run with TUNE_PREV_FLAGS), under block caps and load depths, then both profiles;
# TUNE_DECODE_RUNS names a subset (default all of those below).
if [[ ${TUNE_SET:-all} == decode ]]; then
    STAGED=DECIMAMBA_DECODE_PERSISTENT=0 PERSIST=DECIMAMBA_DECODE_PERSISTENT=1
    PREV="DECIMAMBA_CUDA_SOURCE=.gpu/prev.cu $STAGED DECIMAMBA_NVRTC_FLAGS=${TUNE_PREV_FLAGS:-}"
    RUNS=${TUNE_DECODE_RUNS:-prev staged staged-cap3 staged-pipeline persistent persistent-pipeline persistent-1sm persistent-unroll2 persistent-unroll8 profile profile-staged}
    for shape in 130m 2.8b; do
        D="--shape $shape --lengths 2k --decode 256"
        P="--shape $shape --lengths 2k --decode 64"
        for run in $RUNS; do
            case $run in
            prev) [[ -f .gpu/prev.cu ]] && one "$shape-prev" 100 $PREV -- $D ;;
            staged) one "$shape-staged" 100 $STAGED -- $D ;;
            staged-cap3) one "$shape-staged-cap3" 100 $STAGED DECIMAMBA_DECODE_BLOCKS_PER_SM=3 -- $D ;;
            persistent) one "$shape-persistent" 100 $PERSIST -- $D ;;
            staged-pipeline) one "$shape-staged-pipeline" 100 $STAGED DECIMAMBA_NVRTC_FLAGS=-DMATVEC_PIPELINE=1 -- $D ;;
            persistent-pipeline) one "$shape-persistent-pipeline" 100 $PERSIST DECIMAMBA_NVRTC_FLAGS=-DMATVEC_PIPELINE=1 -- $D ;;
            persistent-1sm) one "$shape-persistent-1sm" 100 $PERSIST DECIMAMBA_DECODE_BLOCKS_PER_SM=1 -- $D ;;
            persistent-unroll2) one "$shape-persistent-unroll2" 100 $PERSIST DECIMAMBA_NVRTC_FLAGS=-DMATVEC_UNROLL=2 -- $D ;;
            persistent-unroll8) one "$shape-persistent-unroll8" 100 $PERSIST \
                "DECIMAMBA_NVRTC_FLAGS=-DMATVEC_UNROLL=8 -DPERSIST_MIN_BLOCKS=1" -- $D ;;
            profile) one "$shape-profile" 100 $PERSIST DECIMAMBA_CUDA_PROFILE=1 -- $P ;;
            profile-staged) one "$shape-profile-staged" 100 $STAGED DECIMAMBA_CUDA_PROFILE=1 -- $P ;;
            *) echo "gpu-tune: unknown TUNE_DECODE_RUNS entry $run" >&2; exit 2 ;;
            esac
        done
    done
    exit $status
fi
# TUNE_SET=scan: the single-pass scan (DECIMAMBA_SCAN=single, and the block shapes in
# TUNE_SCAN, TUNE_SCAN_FLAGS) against the chunked one at 32K and 128K, then both stage profiles at 32K (run
# the tests with TUNE_TEST_ENV=DECIMAMBA_SCAN=single first).
if [[ ${TUNE_SET:-all} == scan ]]; then
    for shape in 130m 2.8b; do
        P="--shape $shape --lengths 32k,128k --decode 0"
        one "$shape-chunked" 150 DECIMAMBA_SCAN=chunked -- $P
        for kind in ${TUNE_SCAN:-single single:8:4 single:4:16 single:16:4 single:8:8}; do
            one "$shape-${kind//:/-}" 150 DECIMAMBA_SCAN=$kind -- $P
        done
        # TUNE_SCAN_FLAGS: the default single-pass shape under each ';'-separated set of
        # defines (e.g. "-DSS_LOADS=16;-DSS_LOADS=4").
        IFS=';' read -ra flag_sets <<<"${TUNE_SCAN_FLAGS:-}"
        for flags in "${flag_sets[@]}"; do
            one "$shape-single${flags//[^A-Za-z0-9_]/}" 150 DECIMAMBA_SCAN=single "DECIMAMBA_NVRTC_FLAGS=$flags" -- $P
        done
        for kind in chunked single; do
            one "$shape-32k-profile-$kind" 150 DECIMAMBA_CUDA_PROFILE=1 DECIMAMBA_SCAN=$kind -- \
                --shape $shape --lengths 32k --decode 0
        done
    done
    exit $status
fi
# TUNE_SET=prefetch: decode with the weights prefetched into L2 ahead of the matvecs, at
# each lead in TUNE_PREFETCH (MiB; 0: none), then at TUNE_PREFETCH_FLAGS_AT MiB with each
# window floor in TUNE_PREFETCH_FLOORS (MiB) and under each
# ';'-separated set of defines in TUNE_PREFETCH_FLAGS (e.g. -DL2_PREFETCH_LINES=1), for the
# shapes in TUNE_SHAPES (run the tests with TUNE_TEST_ENV=DECIMAMBA_DECODE_PREFETCH_MB=24
# first).
if [[ ${TUNE_SET:-all} == prefetch ]]; then
    for shape in ${TUNE_SHAPES:-130m 2.8b}; do
        D="--shape $shape --lengths 2k --decode 256"
        for mib in ${TUNE_PREFETCH:-0 8 16 24 32 48}; do
            one "$shape-prefetch-$mib" 150 DECIMAMBA_DECODE_PREFETCH_MB=$mib -- $D
        done
        at=${TUNE_PREFETCH_FLAGS_AT:-24}
        # TUNE_PREFETCH_FLOORS: window floors (MiB) at that lead.
        for floor in ${TUNE_PREFETCH_FLOORS:-}; do
            one "$shape-prefetch-$at-floor$floor" 150 DECIMAMBA_DECODE_PREFETCH_MB=$at \
                DECIMAMBA_DECODE_PREFETCH_FLOOR_MB=$floor -- $D
        done
        IFS=';' read -ra flag_sets <<<"${TUNE_PREFETCH_FLAGS:-}"
        for flags in "${flag_sets[@]}"; do
            one "$shape-prefetch-$at${flags//[^A-Za-z0-9_]/}" 150 DECIMAMBA_DECODE_PREFETCH_MB=$at \
                "DECIMAMBA_NVRTC_FLAGS=$flags" -- $D
        done
    done
    exit $status
fi
# TUNE_SET=prefill: the scan's share of exponentials on the FMA pipe (-DSCAN_POLY_EXP=k of
# NSTATE) at 32K and 128K, then the stage profiles at 32K (run the tests with
# TUNE_TEST_FLAGS=-DSCAN_POLY_EXP=k first).
if [[ ${TUNE_SET:-all} == prefill ]]; then
    for shape in 130m 2.8b; do
        P="--shape $shape --lengths 32k,128k --decode 0"
        [[ $shape == 2.8b ]] && P="--shape $shape --lengths 32k --decode 0"
        one "$shape-prefill" 150 X=1 -- $P
        for k in ${TUNE_POLY:-2 3 4}; do
            one "$shape-prefill-poly$k" 150 DECIMAMBA_NVRTC_FLAGS=-DSCAN_POLY_EXP=$k -- $P
        done
        one "$shape-32k-profile" 150 DECIMAMBA_CUDA_PROFILE=1 -- --shape $shape --lengths 32k --decode 0
    done
    exit $status
fi
for shape in 130m 2.8b; do
    D="--shape $shape --lengths 2k --decode 256"
    one "$shape-decode-base" 200 $OLD -- $D
    one "$shape-decode" 200 X=1 -- $D
    one "$shape-decode-nopdl" 200 DECIMAMBA_CUDA_PDL=0 -- $D
    one "$shape-decode-unroll2" 200 DECIMAMBA_NVRTC_FLAGS=-DMATVEC_UNROLL=2 -- $D
    one "$shape-decode-minblocks2" 200 DECIMAMBA_NVRTC_FLAGS=-DMATVEC_MIN_BLOCKS=2 -- $D
    one "$shape-decode-minblocks4" 200 DECIMAMBA_NVRTC_FLAGS=-DMATVEC_MIN_BLOCKS=4 -- $D
done
# Prefill at 32K: the scan's knobs, then the stage profile of the default.
P="--shape 130m --lengths 32k --decode 0"
one 130m-32k-base 120 $OLD -- $P
one 130m-32k 120 X=1 -- $P
one 130m-32k-noprefetch 120 DECIMAMBA_NVRTC_FLAGS=-DSCAN_PREFETCH=0 -- $P
one 130m-32k-minblocks6 120 DECIMAMBA_NVRTC_FLAGS=-DSCAN_MIN_BLOCKS=6 -- $P
one 130m-32k-tile64 120 DECIMAMBA_NVRTC_FLAGS=-DTILE=64 -- $P
one 130m-32k-unroll2 120 DECIMAMBA_NVRTC_FLAGS=-DSCAN_UNROLL=2 -- $P
one 130m-32k-unroll8 120 DECIMAMBA_NVRTC_FLAGS=-DSCAN_UNROLL=8 -- $P
one 130m-32k-target18 120 DECIMAMBA_SCAN_TARGET_THREADS=262144 -- $P
one 130m-32k-target20 120 DECIMAMBA_SCAN_TARGET_THREADS=1048576 -- $P
one 130m-32k-profile 120 DECIMAMBA_CUDA_PROFILE=1 -- $P
P="--shape 2.8b --lengths 32k --decode 0"
one 2.8b-32k-base 150 $OLD -- $P
one 2.8b-32k 150 X=1 -- $P
one 2.8b-32k-minblocks6 150 DECIMAMBA_NVRTC_FLAGS=-DSCAN_MIN_BLOCKS=6 -- $P
one 2.8b-32k-profile 150 DECIMAMBA_CUDA_PROFILE=1 -- $P
exit $status
