#!/usr/bin/env bash
# Reproducible `--features cuda` build on a machine with no GPU and no CUDA toolkit
# (recipe: ../shared/docs/cuda-build.md; candle 0.11.1, cudarc 0.19.10).
#
#   scripts/build-cuda.sh            # toolchain (once), stubs (once), release build, test build
#   scripts/build-cuda.sh --env      # only print the `export` lines (for clippy/fmt with cuda)
#   eval "$(scripts/build-cuda.sh --env)" && cargo clippy --features cuda --all-targets -- -D warnings
#
# - nvcc + headers: PyPI wheels pinned to CUDA 13.0 (driver 580 on the H200 JITs PTX ISA
#   9.0 at most; a newer nvcc writes PTX it refuses), unpacked under .cuda/ (gitignored).
# - Link-time libraries: candle links cudarc dynamically, so the linker needs libcuda,
#   libcublas(Lt), libcurand and libnvrtc. We generate link-only stubs from cudarc's own
#   symbol lists with the real SONAMEs; at run time the real libraries are found on the
#   GPU machine (scripts/gpu-check.sh).
# - The build goes to target/cuda (CARGO_TARGET_DIR) so the CPU build in target/release
#   is never replaced by a binary that needs the CUDA libraries to start. Keep target/:
#   a clean build is ~10 minutes on 2 cores, an incremental one seconds.
# - Outputs are copied to .gpu/ (gitignored) for the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_DIR=$ROOT/.cuda
export CUDA_ROOT=$CUDA_DIR/nvidia/cu13
export PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=90
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}

if [[ "${1:-}" == "--env" ]]; then
    for v in CUDA_ROOT PATH CUDA_COMPUTE_CAP CUDAFORGE_THREADS CARGO_TARGET_DIR; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    exit 0
fi

# 1. Toolchain wheels (pinned; 104 MB download, 271 MB unpacked).
if [[ ! -x $CUDA_ROOT/bin/nvcc ]]; then
    mkdir -p "$CUDA_DIR/wheels"
    python3 -m pip download --no-deps -d "$CUDA_DIR/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    for w in "$CUDA_DIR"/wheels/*.whl; do
        unzip -qo "$w" -x '*.dist-info/*' -d "$CUDA_DIR"
    done
fi
nvcc --version | grep -q 'release 13.0' || { echo "nvcc is not CUDA 13.0" >&2; exit 1; }

# 2. Link-only stub libraries from cudarc's symbol lists (sources fetched by cargo).
cargo fetch --quiet
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
STUBS=$CUDA_ROOT/lib/stubs
if [[ ! -f $STUBS/.done ]]; then
    mkdir -p "$STUBS"
    gen() { # gen <cudarc module> <soname> <link name> <return value>
        local mod=$1 soname=$2 link=$3 ret=$4
        local c=$STUBS/$link.c
        grep -ho 'load::<_F>(b\?"[A-Za-z0-9_]*' "$CUDARC/src/$mod/sys/mod.rs" \
            | sed 's/.*"//' | sort -u | sed "s/.*/int &(void){return $ret;}/" >"$c"
        [[ -s $c ]] || { echo "no symbols found in cudarc/src/$mod/sys/mod.rs" >&2; exit 1; }
        gcc -shared -fPIC -Wl,-soname,"$soname" -o "$STUBS/$soname" "$c"
        ln -sf "$soname" "$STUBS/$link.so"
    }
    gen driver libcuda.so.1 libcuda 34 # CUDA_ERROR_STUB_LIBRARY
    gen cublas libcublas.so.13 libcublas 1
    gen cublaslt libcublasLt.so.13 libcublasLt 1
    gen curand libcurand.so.10 libcurand 1
    gen nvrtc libnvrtc.so.13 libnvrtc 1
    touch "$STUBS/.done"
fi
[[ -e $CUDA_ROOT/lib/libcudart.so ]] || ln -s libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"

# 3. Build the CLI and the GPU test binary (the other test binaries are CPU tests that
#    `cargo test` runs without the feature; add them with CUDA_ALL_TESTS=1).
cargo build --release --features cuda
if [[ -n ${CUDA_ALL_TESTS:-} ]]; then
    cargo test --release --features cuda --no-run
fi
cargo test --release --features cuda --test gpu --no-run 2>&1 | tee "$CARGO_TARGET_DIR/test-build.log"
GPU_TEST=$(sed -n 's/.*(\(.*target\/cuda\/release\/deps\/gpu-[0-9a-f]*\)).*/\1/p' \
    "$CARGO_TARGET_DIR/test-build.log" | tail -1)
[[ $GPU_TEST == /* ]] || GPU_TEST=$ROOT/$GPU_TEST
echo "gpu test binary: $GPU_TEST"

# 4. What the device tool carries (scripts/gpu-check.sh): both binaries stripped and
#    xz-compressed (each holds candle's 37 MB of sm_90a MoE kernels; the device tool
#    carries at most 64 MiB with the working tree).
mkdir -p .gpu
rm -f .gpu/*
strip -o .gpu/decimamba "$CARGO_TARGET_DIR/release/decimamba"
strip -o .gpu/gpu-tests "$GPU_TEST"
xz -T2 -6 -f .gpu/decimamba .gpu/gpu-tests
ls -l .gpu
