#!/usr/bin/env bash
# A sweep spread over the GPUs of one host, two ways, against one GPU in the same run:
#   pool:   one process, --device cuda:0,…,N-1 (a worker per GPU, one progress bar);
#   shards: N processes, --shard i/N --device cuda:i, then `decimamba merge`.
# Both sweeps (passkey 1K–128K and eval-ppl 2K–16K, vanilla and DeciMamba, a random 130m
# checkpoint in bf16) must give the same summary.json as the one-GPU run, byte for byte.
# Writes $OUT/multi-gpu.md with samples/s, speed-up and scaling efficiency.
#   BIN=dir-with-decimamba OUT=dir [GPUS=N] bash scripts/multi-gpu-sweep.sh
# With one GPU (GPUS=1) it runs the same commands: the pool of cuda:0 and shard 0/1.
# No collective communication: each GPU works on its own units.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
BIN=${BIN:-target/release}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
TOK=data/tokenizers/gpt-neox-20b.json
mkdir -p "$OUT"
[[ $GPUS -ge 1 ]] || { echo "multi-gpu-sweep: no GPU"; exit 1; }
if [[ ! -f $TOK || ! -d data/austen ]]; then
    echo "multi-gpu-sweep: $TOK or data/austen missing (scripts/fetch_data.sh data); skipped"
    exit 0
fi
WORK=${WORK:-/tmp/decimamba-multi-gpu}
rm -rf "$WORK" && mkdir -p "$WORK"
M=$WORK/random-130m
"$BIN/decimamba" bench --shape 130m --save-checkpoint "$M" >/dev/null || exit 1
COMMON=(-m "$M" --tokenizer "$TOK" --dtype bf16 --quiet --methods vanilla,decimamba
    --deci-layers 12 --deci-lbase 2000 --deci-beta 0.5)
PASSKEY=(passkey --lengths "${PASSKEY_LENGTHS:-1k,2k,4k,8k,16k,32k,64k,128k}" --depths 0,0.25,0.5,0.75,1
    --samples "${SAMPLES:-4}" --max-new-tokens 10)
PPL=(eval-ppl --data data/austen --lengths "${PPL_LENGTHS:-2k,4k,8k,16k}" --windows "${WINDOWS:-8}")
devices=$(seq -s, 0 $((GPUS - 1)))
# Warm-up, untimed: the first process on a fresh machine compiles the CUDA kernels (NVRTC,
# then the driver's cache), which would otherwise land in whichever run comes first.
for ((i = 0; i < GPUS; i++)); do
    "$BIN/decimamba" passkey -m "$M" --tokenizer "$TOK" --dtype bf16 --quiet --lengths 1k \
        --depths 0.5 --samples 1 --device "cuda:$i" --out "$WORK/warmup$i" >/dev/null 2>&1
done
status=0
report="$OUT/multi-gpu.md"
{
    echo "# Sweeps over $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    echo
    echo "| sweep | run | GPUs | units | wall s | units/s | speed-up | efficiency | summary = 1 GPU |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
} >"$report"
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
for eval in passkey eval-ppl; do
    if [[ $eval == passkey ]]; then args=("${PASSKEY[@]}"); else args=("${PPL[@]}"); fi
    # One GPU.
    t0=$(now)
    "$BIN/decimamba" "${args[@]}" "${COMMON[@]}" --device cuda:0 --out "$WORK/$eval-one" \
        >/dev/null 2>"$WORK/$eval-one.err" || { status=1; tail -3 "$WORK/$eval-one.err"; continue; }
    one=$(calc %.3f "$(now) - $t0")
    units=$(wc -l <"$WORK/$eval-one/results.jsonl")
    # The pool: one process, a worker per GPU.
    t0=$(now)
    "$BIN/decimamba" "${args[@]}" "${COMMON[@]}" --device "cuda:$devices" --out "$WORK/$eval-pool" \
        >/dev/null 2>"$WORK/$eval-pool.err" || { status=1; tail -3 "$WORK/$eval-pool.err"; }
    pool=$(calc %.3f "$(now) - $t0")
    # Shards: N processes at once, one per GPU, then merge.
    t0=$(now)
    pids=()
    for ((i = 0; i < GPUS; i++)); do
        "$BIN/decimamba" "${args[@]}" "${COMMON[@]}" --device "cuda:$i" --shard "$i/$GPUS" \
            --out "$WORK/$eval-shard$i" >/dev/null 2>"$WORK/$eval-shard$i.err" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    "$BIN/decimamba" merge "$WORK/$eval"-shard*/ --out "$WORK/$eval-merged" >"$WORK/$eval-merge.out" 2>&1 \
        || { status=1; tail -2 "$WORK/$eval-merge.out"; }
    shards=$(calc %.3f "$(now) - $t0")
    for run in one pool merged; do
        case $run in one) secs=$one ;; pool) secs=$pool ;; merged) secs=$shards ;; esac
        if cmp -s "$WORK/$eval-one/summary.json" "$WORK/$eval-$run/summary.json"; then same=yes; else same=NO; status=1; fi
        n=$([[ $run == one ]] && echo 1 || echo "$GPUS")
        rate=$(calc %.2f "$units / $secs")
        speed=$(calc %.2f "$one / $secs")
        eff=$(calc %.0f "100 * $one / ($secs * $n)")
        label=$([[ $run == merged ]] && echo "shards + merge" || echo "$run")
        echo "| $eval | $label | $n | $units | $(printf %.2f "$secs") | $rate | ${speed}× | ${eff}% | $same |" >>"$report"
    done
done
{
    echo
    echo "Wall time includes each process's model load; \`units\` are samples (passkey) or windows (eval-ppl)."
    echo "Commands: scripts/multi-gpu-sweep.sh (GPUS=$GPUS)."
} >>"$report"
cat "$report"
exit $status
