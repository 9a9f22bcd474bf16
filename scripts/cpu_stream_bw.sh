#!/usr/bin/env bash
# The read bandwidth this machine gives THREADS threads (default 2) streaming one buffer
# of MIB MiB (default 520, the f32 weights of one 130m decode step): the bound of a
# weight-streaming decode, to print beside `decimamba bench --decode` in the same run.
# A plain C loop of 32-byte loads and adds (no FMA, no software prefetch), OpenMP split in
# contiguous halves; five passes, GB/s of each. Needs gcc with OpenMP; not part of CI.
#   scripts/cpu_stream_bw.sh [THREADS] [MIB]
set -euo pipefail
threads=${1:-2}
mib=${2:-520}
for v in "$threads" "$mib"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "cpu_stream_bw.sh: THREADS and MIB must be positive integers, got '$v'" >&2; exit 2; }
done
command -v gcc >/dev/null || { echo "cpu_stream_bw.sh: needs gcc (with OpenMP)" >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/bw.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char** argv) {
    size_t bytes = (size_t)atol(argv[1]) << 20, n = bytes / sizeof(float);
    float* a = aligned_alloc(64, bytes);
    if (!a) {
        fprintf(stderr, "cpu_stream_bw.sh: cannot allocate %zu bytes\n", bytes);
        return 1;
    }
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    for (int pass = 0; pass < 5; pass++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
        for (size_t b = 0; b < n; b += 1 << 16) {
            float s[8] = {0};
            size_t e = b + (1 << 16) < n ? b + (1 << 16) : n;
            for (size_t i = b; i < e; i += 8)
                for (int l = 0; l < 8; l++) s[l] += a[i + l];
            for (int l = 0; l < 8; l++) total += s[l];
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        printf("pass %d: %.1f GB/s (checksum %.0f)\n", pass + 1, bytes / secs / 1e9, total);
    }
    return 0;
}
C
gcc -O3 -march=native -fopenmp "$dir/bw.c" -o "$dir/bw"
echo "read bandwidth, $threads threads, $mib MiB:"
OMP_NUM_THREADS=$threads "$dir/bw" "$mib"
