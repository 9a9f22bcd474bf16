#!/usr/bin/env bash
# The README's method comparison on the embedded model, end to end:
#   1. split Jane Austen's six novels (scripts/fetch_data.sh) into calibration text (three
#      novels) and held-out evaluation text (the other three);
#   2. calibrate MambaExtend and Mamba Modulation at 8K and 32K, and LongMamba at the
#      embedded model's training length (1K), on the calibration text;
#   3. passkey 1K–32K and eval-ppl 1K–32K with all methods side by side;
#   4. bench: each policy's prefill cost against vanilla in the same run.
#
#   DEVICE=cuda BIN=/path/to/decimamba OUT=runs/methods bash scripts/methods_demo.sh
#
# Environment: BIN (default target/release/decimamba), DEVICE (cpu), OUT (runs/methods),
# DATA (data/austen), SAMPLES (passkey samples per cell, 4), WINDOWS (eval-ppl windows per
# document and length, 5). Each step is skipped when its output exists, so a rerun resumes.
set -euo pipefail
BIN=${BIN:-target/release/decimamba}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/methods}
DATA=${DATA:-data/austen}
SAMPLES=${SAMPLES:-4}
WINDOWS=${WINDOWS:-5}
[[ -d $DATA ]] || { echo "no $DATA: run scripts/fetch_data.sh first" >&2; exit 1; }
mkdir -p "$OUT/calibration-text" "$OUT/evaluation-text"
for book in sense-and-sensibility pride-and-prejudice mansfield-park; do
    cp -n "$DATA/$book.txt" "$OUT/calibration-text/"
done
for book in emma northanger-abbey persuasion; do
    cp -n "$DATA/$book.txt" "$OUT/evaluation-text/"
done

calibrate() { # calibrate <out-name> <args...>
    local name=$1
    shift
    if [[ ! -f $OUT/$name.json ]]; then
        echo "== calibrate $name: $*"
        local start=$SECONDS
        "$BIN" calibrate --device "$DEVICE" --data "$OUT/calibration-text" --quiet \
            --out "$OUT/$name.json" "$@"
        echo "calibrate $name: $((SECONDS - start)) s"
    fi
}
calibrate mambaextend-8k --method mambaextend --length 8k
calibrate mambaextend-32k --method mambaextend --length 32k
calibrate modulation-8k --method modulation --length 8k
calibrate modulation-32k --method modulation --length 32k
calibrate longmamba --method longmamba --length 1k

P=$OUT
METHODS="vanilla,decimamba,$P/mambaextend-8k.json,$P/mambaextend-32k.json,$P/modulation-8k.json,$P/modulation-32k.json,$P/longmamba.json"
echo "== passkey"
"$BIN" passkey --device "$DEVICE" --methods "$METHODS" --lengths 1k,2k,4k,8k,16k,32k \
    --samples "$SAMPLES" --quiet --out "$OUT/passkey"
echo "== eval-ppl"
"$BIN" eval-ppl --device "$DEVICE" --methods "$METHODS" --data "$OUT/evaluation-text" \
    --lengths 1k,2k,4k,8k,16k,32k --windows "$WINDOWS" --pred-len 100 --quiet --out "$OUT/ppl"

echo "== bench: each policy's prefill against vanilla on the embedded model"
for policy in mambaextend-32k modulation-32k longmamba; do
    "$BIN" bench --device "$DEVICE" --policy "$OUT/$policy.json" --lengths 8k,32k --decode 0 \
        --repeats 5 --json "$OUT/bench-embedded-$policy.json"
done
"$BIN" bench --device "$DEVICE" --compare-decimation --lengths 8k,32k --decode 0 --repeats 5 \
    --json "$OUT/bench-embedded-decimamba.json"
