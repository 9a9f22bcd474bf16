#!/usr/bin/env bash
# Fetches the reference GPU kernel for the side-by-side benchmark: the selective-scan CUDA
# sources of the PyPI mamba-ssm sdist (the kernel family the DeciMamba authors' code runs),
# unpacked into .ref/selective_scan (gitignored, never committed). Run here, where PyPI is
# reachable; scripts/gpu-check.sh builds and times it on the GPU machine when the folder
# exists (carry it: run(..., carry=[".gpu", ".ref"])).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
[[ -f .ref/selective_scan/selective_scan.cpp ]] && { echo ".ref/selective_scan is there"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download --quiet --no-deps --no-build-isolation \
    --no-binary :all: "mamba-ssm==$VERSION" -d "$tmp"
tar xzf "$tmp/mamba_ssm-$VERSION.tar.gz" -C "$tmp"
mkdir -p .ref
cp -r "$tmp/mamba_ssm-$VERSION/csrc/selective_scan" .ref/
echo "mamba-ssm $VERSION" >.ref/selective_scan/VERSION
ls .ref/selective_scan
