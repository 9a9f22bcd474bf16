#!/usr/bin/env bash
# The mamba_ssm fused peer: run ON the GPU machine from the repo root, with .ref/ carried
# (scripts/fetch-reference-src.sh fills it where PyPI is reachable). Builds the two CUDA
# extensions (cached in /tmp) and times mamba_ssm's MambaLMHeadModel prefill and
# generate(cg=True) decode with scripts/gpu_fused_bench.py, writing
# $OUT/fused-<shape>-<dtype>.json and the log $OUT/fused.log.
#
#   OUT=dir bash scripts/gpu-fused-peer.sh [extra gpu_fused_bench.py arguments]
#
# Environment: OUT (default ./gpu-out), FUSED_DEADLINE (seconds, build included, after which
# no measurement starts; default 300), FUSED_TIMEOUT (hard limit; default deadline + 60),
# FUSED_RUNS (default 130m:bf16,2.8b:bf16), FUSED_LENGTHS (default 2k,8k,32k,128k),
# MAX_JOBS (build parallelism; default the number of cores), PYTHON (default python3).
# Exit status: that of gpu_fused_bench.py (non-zero when a step failed or the self-check was
# out of tolerance), 124 on the hard timeout, 2 when .ref is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
DEADLINE=${FUSED_DEADLINE:-300}
TIMEOUT=${FUSED_TIMEOUT:-$(( ${DEADLINE%.*} + 60 ))}
RUNS=${FUSED_RUNS:-130m:bf16,2.8b:bf16}
LENGTHS=${FUSED_LENGTHS:-2k,8k,32k,128k}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" || { echo "gpu-fused-peer: cannot create $OUT"; exit 2; }
for f in .ref/selective_scan/selective_scan.cpp .ref/causal_conv1d/causal_conv1d.cpp \
    .ref/py/mamba_ssm/__init__.py .ref/py/causal_conv1d/__init__.py .ref/py/einops/__init__.py; do
    [[ -f $f ]] || {
        echo "gpu-fused-peer: $f missing: run scripts/fetch-reference-src.sh where PyPI is reachable, and carry .ref" | tee "$OUT/fused.log"
        exit 2
    }
done
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 16)}
echo "== mamba_ssm fused peer: runs $RUNS, lengths $LENGTHS, deadline ${DEADLINE}s, timeout ${TIMEOUT}s" | tee "$OUT/fused.log"
PYTHONUNBUFFERED=1 timeout -k 15 "$TIMEOUT" "$PYTHON" scripts/gpu_fused_bench.py \
    --runs "$RUNS" --lengths "$LENGTHS" --deadline "$DEADLINE" --out "$OUT" "$@" 2>&1 \
    | tee -a "$OUT/fused.log"
rc=${PIPESTATUS[0]}
if [[ $rc == 124 || $rc == 137 ]]; then
    echo "gpu-fused-peer: killed after the ${TIMEOUT}s timeout (JSON holds what was measured)" | tee -a "$OUT/fused.log"
fi
echo "fused peer exit $rc" | tee -a "$OUT/fused.log"
exit "$rc"
