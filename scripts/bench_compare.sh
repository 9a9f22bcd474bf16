#!/usr/bin/env bash
# Runs `decimamba bench`, llama.cpp's llama-bench (f32 and f16 GGUF of the same weights) and
# transformers' MambaForCausalLM (scripts/bench_hf.py) in one run, on the same machine, shape,
# prompt lengths, thread count and decode count, and prints one table with the ratios.
#
#   scripts/bench_compare.sh [SHAPE] [LENGTHS] [THREADS] [DECODE]
#   scripts/bench_compare.sh 130m 512,2048,8192 2 64
#
# Needs a release build (cargo build --release; or DECIMAMBA_BIN), a C/C++ compiler and cmake
# (apt-get install cmake, or pip install cmake), and a python ($PYTHON, default python3) with
# torch, transformers and numpy for llama.cpp's converter, needed only until the GGUFs are
# cached (pip install -r scripts/requirements-fixtures.txt). transformers' own timing is
# skipped with a note when that python lacks torch/transformers.
# Writes bench-decimamba.json, bench-llamacpp-f32.json, bench-llamacpp-f16.json and
# bench-hf.json to $OUT_DIR (default .).
#
# Environment: REPEATS (prefills per length, median reported; default 3), PYTHON, CMAKE,
# DECIMAMBA_BIN, LLAMA_CACHE (default .cache/llama.cpp, git-ignored), LLAMA_CPP_PYTHON_VERSION
# (the PyPI sdist whose vendor/llama.cpp is built; default 0.3.36), SKIP_HF=1.
set -euo pipefail
shape=${1:-130m}
lengths=${2:-512,2048,8192}
threads=${3:-2}
decode=${4:-64}
out=${OUT_DIR:-.}
repeats=${REPEATS:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${DECIMAMBA_BIN:-$here/target/release/decimamba}
py=${PYTHON:-python3}
cache=${LLAMA_CACHE:-$here/.cache/llama.cpp}
lcp_version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
die() { echo "error: $*" >&2; exit 1; }
[ -x "$bin" ] || die "$bin not found: run cargo build --release (or set DECIMAMBA_BIN)"
mkdir -p "$out" "$cache" || die "cannot create $out or $cache"
# bench_hf.py and llama-bench take plain token counts; decimamba also reads 8k as 8192.
lengths=$("$py" -c 'import sys; print(",".join(str(int(p[:-1]) * 1024 if p.lower().endswith("k") else int(p)) for p in sys.argv[1].split(",") if p.strip()))' "$lengths" 2>/dev/null) \
  || die "cannot parse lengths '$2'"
max_len=$("$py" -c 'import sys; print(max(int(x) for x in sys.argv[1].split(",")))' "$lengths")

# --- llama.cpp: build llama-bench once from the llama-cpp-python sdist's vendored source ---
# The sdist pins a llama.cpp commit under vendor/llama.cpp. `--no-binary llama-cpp-python`
# (not :all:) so pip fetches the sdist but takes wheels for its build backend (cmake, ninja),
# which it installs to read the sdist's metadata; with :all: it would compile cmake itself.
src=$cache/llama_cpp_python-$lcp_version/vendor/llama.cpp
build=$cache/build-$lcp_version
llama_bench=$build/bin/llama-bench
if [ ! -x "$llama_bench" ]; then
  if [ ! -f "$src/CMakeLists.txt" ]; then
    sdist=$cache/llama_cpp_python-$lcp_version.tar.gz
    if [ ! -f "$sdist" ]; then
      echo "== downloading llama-cpp-python $lcp_version (sdist) from PyPI"
      "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$cache" \
        "llama-cpp-python==$lcp_version" >"$cache/download.log" 2>&1 \
        || die "pip download of llama-cpp-python==$lcp_version failed (see $cache/download.log)"
    fi
    tar -xzf "$sdist" -C "$cache" || die "cannot unpack $sdist"
    [ -f "$src/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp"
  fi
  # cmake from PATH, else beside $PYTHON (a virtualenv with pip's cmake wheel).
  cmake=${CMAKE:-$(command -v cmake || true)}
  pybin=$(dirname "$(command -v "$py")")
  [ -n "$cmake" ] || { [ -x "$pybin/cmake" ] && cmake=$pybin/cmake; } || true
  [ -n "$cmake" ] || die "cmake not found: apt-get install cmake, or pip install cmake (or set CMAKE)"
  echo "== building llama-bench from $src (once; cached in $build)"
  # Native CPU code and OpenMP threads, as a user's own CPU build of llama.cpp would have;
  # static libraries so the binary stands alone; no HTTPS (no model downloads), no tests,
  # examples or server: only the llama-bench target and what it links.
  "$cmake" -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON >"$cache/configure.log" 2>&1 \
    || die "cmake configure of llama.cpp failed (see $cache/configure.log)"
  "$cmake" --build "$build" --target llama-bench -j "$(nproc)" >"$cache/build.log" 2>&1 \
    || die "llama.cpp build failed (see $cache/build.log)"
fi

# --- the same random weights as `decimamba bench --shape`, as GGUF ---
# decimamba writes them (seed 0) in mamba_ssm's layout; scripts/gguf_from_random.py renames
# them into transformers' layout with the GPT-NeoX-20B tokenizer, and the vendored
# convert_hf_to_gguf.py (its Mamba class: vendor/llama.cpp/conversion/mamba.py) writes the GGUF.
# Cached per shape and sdist version: the weights are the same on every run (delete
# $cache/gguf-* if bench::random_weights ever changes).
gguf_dir=$cache/gguf-$lcp_version
missing=()
for t in f32 f16; do [ -f "$gguf_dir/random-$shape-$t.gguf" ] || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  "$py" -c 'import torch, transformers, numpy' 2>/dev/null \
    || die "$py lacks torch/transformers/numpy, which $src/convert_hf_to_gguf.py imports: pip install -r scripts/requirements-fixtures.txt (or set PYTHON)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "== converting the random $shape weights to GGUF (${missing[*]})"
  "$bin" bench --shape "$shape" --save-checkpoint "$tmp/ckpt" >/dev/null
  "$py" "$here/scripts/gguf_from_random.py" --checkpoint "$tmp/ckpt" \
    --tokenizer "$here/assets/gpt-neox-20b-tokenizer.json.gz" --out "$tmp/hf" >/dev/null
  mkdir -p "$gguf_dir"
  for t in "${missing[@]}"; do
    "$py" "$src/convert_hf_to_gguf.py" "$tmp/hf" --outtype "$t" --outfile "$tmp/$t.gguf" \
      >"$cache/convert-$shape-$t.log" 2>&1 \
      || die "convert_hf_to_gguf.py --outtype $t failed (see $cache/convert-$shape-$t.log)"
    mv "$tmp/$t.gguf" "$gguf_dir/random-$shape-$t.gguf"
  done
  rm -rf "$tmp"
  trap - EXIT
fi

echo "== decimamba ($shape, f32, $threads threads)"
"$bin" bench --shape "$shape" --lengths "$lengths" --decode "$decode" --threads "$threads" \
  --repeats "$repeats" --compare-decimation --json "$out/bench-decimamba.json"

# llama-bench (vendor/llama.cpp/tools/llama-bench/llama-bench.cpp): `-p` lengths are one
# prompt-processing test each (random tokens, last-token logits, n_ctx = the prompt length)
# and `-n` one generation test of single-token steps from an empty state (decimamba decodes
# after a 128-token prompt; a Mamba step costs the same at any position). -b/-ub at the
# longest prompt so each prompt is one llama_decode call (one ubatch), as decimamba
# prefills a prompt in one call (the default -ub 512 would split longer prompts).
for ftype in f32 f16; do
  echo "== llama.cpp llama-bench ($shape, $ftype GGUF, $threads threads)"
  "$llama_bench" -m "$gguf_dir/random-$shape-$ftype.gguf" -t "$threads" -p "$lengths" -n "$decode" \
    -b "$max_len" -ub "$max_len" -r "$repeats" -o json >"$out/llama-bench-$ftype.raw.json" \
    2>"$out/llama-bench-$ftype.log" || die "llama-bench ($ftype) failed (see $out/llama-bench-$ftype.log)"
  # Into bench_hf.py's layout (median of the repeats, as decimamba reports), raw records kept.
  "$py" - "$out/llama-bench-$ftype.raw.json" "$out/bench-llamacpp-$ftype.json" "$shape" "$ftype" <<'PY'
import json, statistics, sys
raw, dst, shape, ftype = sys.argv[1:5]
tests = json.load(open(raw))
rep = {"impl": "llama.cpp", "model": f"random-{shape}", "dtype": ftype, "device": "cpu",
       "threads": tests[0]["n_threads"], "build_commit": tests[0]["build_commit"],
       "build_number": tests[0]["build_number"], "prefill": {}, "raw": tests}
for t in tests:
    s = statistics.median(t["samples_ns"]) / 1e9
    if t["n_prompt"] and not t["n_gen"]:
        rep["prefill"][str(t["n_prompt"])] = {"s": s, "tok_per_s": t["n_prompt"] / s, "runs_s": [x / 1e9 for x in t["samples_ns"]]}
        print(f"{t['n_prompt']:>8}  {s:>10.3f}  {t['n_prompt'] / s:>12.1f}")
    elif t["n_gen"] and not t["n_prompt"]:
        rep["decode"] = {"prompt_tokens": 0, "new_tokens": t["n_gen"], "s": s, "tok_per_s": t["n_gen"] / s}
        print(f"decode: {t['n_gen']} tokens: {s:.3f} s, {t['n_gen'] / s:.1f} tokens/s")
json.dump(rep, open(dst, "w"), indent=2)
PY
  rm -f "$out/llama-bench-$ftype.raw.json" "$out/llama-bench-$ftype.log"
done

# transformers is optional: skipped with a note (and no bench-hf.json) without torch/transformers.
rm -f "$out/bench-hf.json"
if [ "${SKIP_HF:-0}" = 1 ]; then
  echo "note: SKIP_HF=1: transformers not measured"
elif "$py" -c 'import torch, transformers' 2>/dev/null; then
  echo "== transformers MambaForCausalLM ($shape, float32, $threads threads)"
  "$py" "$here/scripts/bench_hf.py" --shape "$shape" --lengths "$lengths" --decode "$decode" \
    --threads "$threads" --repeats "$repeats" --json "$out/bench-hf.json"
else
  echo "note: $py has no torch/transformers: transformers not measured (pip install -r scripts/requirements-fixtures.txt)"
fi

"$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, f"bench-{name}.json")
    return json.load(open(p)) if os.path.exists(p) else None
ours = load("decimamba")
peers = [(label, load(f)) for label, f in
         [("transformers", "hf"), ("llama.cpp f32", "llamacpp-f32"), ("llama.cpp f16", "llamacpp-f16")]]
peers = [(label, r) for label, r in peers if r]
nan = float("nan")
cols = ["decimamba", "decimated"] + [label for label, _ in peers] + [f"/{label}" for label, _ in peers]
w = [max(10, len(c) + 1) for c in cols]
print("\ntokens/s (decimated = decimamba with DeciMamba's prefill; /peer = decimamba / peer)")
print(f"{'':>8}" + "".join(f"{c:>{n}}" for c, n in zip(cols, w)))
def row(name, a, dec, peer_rates):
    cells = [f"{a:.1f}", "" if dec is None else f"{dec:.1f}"] + [f"{p:.1f}" for p in peer_rates]
    cells += [f"{a / p:.2f}x" if p == p and p > 0 else "-" for p in peer_rates]
    print(f"{name:>8}" + "".join(f"{c:>{n}}" for c, n in zip(cells, w)))
for L, r in sorted(ours["prefill"].items(), key=lambda kv: int(kv[0])):
    d = ours.get("prefill_decimated", {}).get(L, {}).get("tok_per_s", nan)
    row(L, r["tok_per_s"], d, [p["prefill"].get(str(L), {}).get("tok_per_s", nan) for _, p in peers])
if ours.get("decode"):
    row("decode", ours["decode"]["tok_per_s"], None, [(p.get("decode") or {}).get("tok_per_s", nan) for _, p in peers])
PY
