#!/usr/bin/env bash
# Runs `decimamba bench` and transformers' MambaForCausalLM (scripts/bench_hf.py) on the
# same machine, shape, dtype and thread count, and prints them side by side with ratios.
#
#   scripts/bench_compare.sh [SHAPE] [LENGTHS] [THREADS] [DECODE]
#   scripts/bench_compare.sh 130m 512,2048,8192 2 64
#
# Needs a release build (cargo build --release) and python3 with torch + transformers
# (pip install -r scripts/requirements-fixtures.txt). Writes bench-*.json to $OUT_DIR (default .).
set -euo pipefail
shape=${1:-130m}
lengths=${2:-512,2048,8192}
threads=${3:-2}
decode=${4:-64}
out=${OUT_DIR:-.}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${DECIMAMBA_BIN:-$here/target/release/decimamba}
[ -x "$bin" ] || { echo "error: $bin not found: run cargo build --release" >&2; exit 1; }
echo "== decimamba ($shape, f32, $threads threads)"
"$bin" bench --shape "$shape" --lengths "$lengths" --decode "$decode" --threads "$threads" \
  --compare-decimation --json "$out/bench-decimamba.json"
echo "== transformers MambaForCausalLM ($shape, float32, $threads threads)"
python3 "$here/scripts/bench_hf.py" --shape "$shape" --lengths "$lengths" --decode "$decode" \
  --threads "$threads" --json "$out/bench-hf.json"
python3 - "$out/bench-decimamba.json" "$out/bench-hf.json" <<'PY'
import json, sys
ours, ref = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\n{'length':>8} {'decimamba tok/s':>16} {'decimated tok/s':>16} {'transformers tok/s':>19} {'ratio':>7}")
for L, r in ours["prefill"].items():
    h = ref["prefill"].get(L)
    d = ours.get("prefill_decimated", {}).get(L, {}).get("tok_per_s", float("nan"))
    ratio = r["tok_per_s"] / h["tok_per_s"] if h else float("nan")
    print(f"{L:>8} {r['tok_per_s']:>16.1f} {d:>16.1f} {(h or {}).get('tok_per_s', float('nan')):>19.1f} {ratio:>6.2f}x")
if "decode" in ours and "decode" in ref:
    a, b = ours["decode"]["tok_per_s"], ref["decode"]["tok_per_s"]
    print(f"{'decode':>8} {a:>16.1f} {'':>16} {b:>19.1f} {a / b:>6.2f}x")
PY
