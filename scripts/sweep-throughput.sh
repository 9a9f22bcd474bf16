#!/usr/bin/env bash
# Sweep throughput on a GPU: passkey samples/s and eval-ppl windows/s of a random 130m
# checkpoint in bf16 at 2K and 8K, batch 1 against batch 16, vanilla and DeciMamba (layer 12
# keeps 2,000 tokens), all in one run. Every number is the sweep's own "ran N … in T s"
# line (model loading and tokenizing excluded). Writes $OUT/sweep-throughput.md.
#   BIN=/path/to/dir-with-decimamba OUT=dir bash scripts/sweep-throughput.sh
# Needs data/tokenizers/gpt-neox-20b.json and data/austen (scripts/fetch_data.sh data).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
BIN=${BIN:-target/release}
DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-2k 8k}
BATCHES=${BATCHES:-1 16}
TOK=data/tokenizers/gpt-neox-20b.json
mkdir -p "$OUT"
if [[ ! -f $TOK || ! -d data/austen ]]; then
    echo "sweep-throughput: $TOK or data/austen missing (scripts/fetch_data.sh data); skipped"
    exit 0
fi
WORK=${WORK:-/tmp/decimamba-sweeps}
rm -rf "$WORK" && mkdir -p "$WORK"
M=$WORK/random-130m
"$BIN/decimamba" bench --shape 130m --save-checkpoint "$M" || exit 1
COMMON=(-m "$M" --tokenizer "$TOK" --device "$DEVICE" --dtype bf16 --quiet)
DECI=(--deci-layers 12 --deci-lbase 2000 --deci-beta 0.5)
status=0
table="$OUT/sweep-throughput.md"
{
    echo "| sweep | method | length | batch | units | seconds | units/s |"
    echo "|---|---|---:|---:|---:|---:|---:|"
} >"$table"
run_one() { # run_one <eval> <method> <length> <batch>
    local eval=$1 method=$2 len=$3 bs=$4
    local name="$eval-$method-$len-b$bs" extra=()
    [[ $method == decimamba ]] && extra=("${DECI[@]}")
    local args=()
    if [[ $eval == passkey ]]; then
        args=(passkey --lengths "$len" --depths 0,0.25,0.5,0.75,1 --samples 16 --max-new-tokens 10)
    else
        args=(eval-ppl --data data/austen --lengths "$len" --windows 16 --pred-len 100)
    fi
    timeout 300 "$BIN/decimamba" "${args[@]}" "${COMMON[@]}" --methods "$method" "${extra[@]}" \
        --batch-size "$bs" --out "$WORK/$name" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    local line
    line=$(grep '^ran ' "$WORK/$name.err" | tail -1)
    echo "$name exit $rc: $line" | tee -a "$OUT/sweep.log"
    [[ $rc == 0 ]] || { status=1; tail -3 "$WORK/$name.err" | tee -a "$OUT/sweep.log"; return; }
    # "ran 80 samples in 3.21 s (24.9 samples/s)"
    read -r units secs rate < <(echo "$line" | sed -E 's/^ran ([0-9]+) [a-z]+ in ([0-9.]+) s \(([0-9.]+) .*/\1 \2 \3/')
    echo "| $eval | $method | $len | $bs | $units | $secs | $rate |" >>"$table"
}
for eval in passkey eval-ppl; do
    for len in $LENGTHS; do
        for method in vanilla decimamba; do
            for bs in $BATCHES; do
                run_one "$eval" "$method" "$len" "$bs"
            done
        done
    done
done
# Batched results equal batch 1's: passkey summaries byte for byte (greedy tokens), and
# perplexity NLLs up to bf16 rounding (cuBLAS rounds a 16-row GEMM differently from a 1-row
# one; in f32 they agree to ~1e-6), so eval-ppl reports its largest per-window difference.
max_nll_diff() { # max_nll_diff <run dir> <run dir>
    python3 - "$1/results.jsonl" "$2/results.jsonl" <<'PY'
import json, sys
key = lambda r: (r["method"], r["length"], r["doc"], r["window"])
a, b = ({key(r): r["mean_nll"] for r in map(json.loads, open(p))} for p in sys.argv[1:3])
print(f"{max(abs(a[k] - b[k]) for k in a):.2e}" if a.keys() == b.keys() else "different windows")
PY
}
for eval in passkey eval-ppl; do
    for len in $LENGTHS; do
        for method in vanilla decimamba; do
            set -- $BATCHES
            a="$WORK/$eval-$method-$len-b$1"
            for bs in "${@:2}"; do
                b="$WORK/$eval-$method-$len-b$bs"
                if [[ $eval == passkey ]]; then
                    if cmp -s "$a/summary.json" "$b/summary.json"; then r=same; else r=DIFFERENT; status=1; fi
                    r="summary $r"
                else
                    d=$(max_nll_diff "$a" "$b")
                    [[ $d == "different windows" ]] && status=1
                    r="max |NLL difference| $d (bf16)"
                fi
                echo "$eval $method $len: batch $bs vs batch $1: $r" | tee -a "$OUT/sweep.log"
            done
        done
    done
done
cat "$table"
exit $status
