#!/usr/bin/env bash
# Fetches the reference GPU code for the side-by-side benchmarks into .ref/ (gitignored, never
# committed). Run here, where PyPI is reachable; the GPU machine has no network, so carry the
# folder: run(..., carry=[".gpu", ".ref"]).
#   .ref/selective_scan   csrc/selective_scan of the mamba-ssm sdist (the kernel family the
#                         DeciMamba authors' code runs; scripts/gpu_reference_bench.py)
#   .ref/py/mamba_ssm     the mamba_ssm Python package of the same sdist
#   .ref/causal_conv1d    csrc of the causal-conv1d sdist, and its Python package at
#   .ref/py/causal_conv1d (both for scripts/gpu_fused_bench.py, mamba_ssm's fused path)
#   .ref/py/einops        the einops wheel's package (pure Python; mamba_ssm imports it)
# Each part is fetched only when missing, so the script can be rerun.
#
# Archives are read straight from the package index (PEP 691 JSON, else the PEP 503 HTML
# page) and checked against pinned sha256s. `pip download` is not used: for an sdist it
# prepares the package's metadata, which runs mamba-ssm's setup.py, and that imports torch
# (and needs `wheel`), so it fails on a fresh machine.
#   MAMBA_SSM_VERSION (default 2.3.2.post1), MAMBA_SSM_SHA256 (pinned for the default),
#   CAUSAL_CONV1D_VERSION (default 1.6.2.post1, released with mamba-ssm 2.3.2.post1),
#   CAUSAL_CONV1D_SHA256, EINOPS_VERSION (default 0.8.1), EINOPS_SHA256,
#   PIP_INDEX_URL (default https://pypi.org/simple)
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { # pin <name> <version> <default version> <sha256 for it> <override>
    if [[ -n $5 ]]; then echo "$5"
    elif [[ $2 == "$3" ]]; then echo "$4"
    else echo "set the sha256 of $1 $2 (see this script's header)" >&2; return 1
    fi
}
VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
SHA256=$(pin mamba-ssm "$VERSION" 2.3.2.post1 \
    104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028 "${MAMBA_SSM_SHA256:-}")
CC_VERSION=${CAUSAL_CONV1D_VERSION:-1.6.2.post1}
CC_SHA256=$(pin causal-conv1d "$CC_VERSION" 1.6.2.post1 \
    245e314ea21064ded7a5bf6b3b842b644aa6f92e45cecfe3e935629744c35ff4 "${CAUSAL_CONV1D_SHA256:-}")
EI_VERSION=${EINOPS_VERSION:-0.8.1}
EI_SHA256=$(pin einops "$EI_VERSION" 0.8.1 \
    919387eb55330f5757c6bea9165c5ff5cfe63a642682ea788a6d472576d81737 "${EINOPS_SHA256:-}")
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() { # fetch <project> <file name> <sha256>: into $tmp/<file name>
    python3 - "$INDEX" "$1" "$2" "$3" "$tmp/$2" <<'PY'
import hashlib, html.parser, json, sys, urllib.parse, urllib.request
index, name, filename, sha256, out = sys.argv[1:]
page = f"{index.rstrip('/')}/{name}/"
req = urllib.request.Request(page, headers={
    "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        body, kind = r.read(), r.headers.get("Content-Type", "")
except OSError as e:
    sys.exit(f"cannot read {page}: {e}")
if "json" in kind:
    urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == filename]
else:
    class Links(html.parser.HTMLParser):
        urls = []
        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href")
            if tag == "a" and href and href.split("#")[0].rsplit("/", 1)[-1] == filename:
                self.urls.append(href)
    p = Links(); p.feed(body.decode())
    urls = p.urls
if not urls:
    sys.exit(f"{filename} is not on {page}")
url = urllib.parse.urljoin(page, urls[0]).split("#")[0]
try:
    with urllib.request.urlopen(url, timeout=300) as r:
        data = r.read()
except OSError as e:
    sys.exit(f"cannot download {url}: {e}")
got = hashlib.sha256(data).hexdigest()
if got != sha256:
    sys.exit(f"{filename}: sha256 {got} is not the pinned {sha256}")
open(out, "wb").write(data)
print(f"fetched {filename} ({len(data)} bytes) from {url}")
PY
}

mkdir -p .ref/py
# mamba-ssm: the selective-scan CUDA sources and the Python package.
if [[ -f .ref/selective_scan/selective_scan.cpp ]]; then
    echo ".ref/selective_scan is there"
fi
if [[ -f .ref/py/mamba_ssm/__init__.py ]]; then
    echo ".ref/py/mamba_ssm is there"
fi
if [[ ! -f .ref/selective_scan/selective_scan.cpp || ! -f .ref/py/mamba_ssm/__init__.py ]]; then
    FILE="mamba_ssm-$VERSION.tar.gz"
    fetch mamba-ssm "$FILE" "$SHA256"
    tar xzf "$tmp/$FILE" -C "$tmp"
    if [[ ! -f .ref/selective_scan/selective_scan.cpp ]]; then
        rm -rf .ref/selective_scan
        cp -r "$tmp/mamba_ssm-$VERSION/csrc/selective_scan" .ref/
        echo "mamba-ssm $VERSION" >.ref/selective_scan/VERSION
        ls .ref/selective_scan
    fi
    if [[ ! -f .ref/py/mamba_ssm/__init__.py ]]; then
        rm -rf .ref/py/mamba_ssm
        cp -r "$tmp/mamba_ssm-$VERSION/mamba_ssm" .ref/py/
        echo "mamba-ssm $VERSION" >.ref/py/mamba_ssm/VERSION
        echo "copied mamba_ssm $VERSION to .ref/py/mamba_ssm"
    fi
fi

# causal-conv1d: CUDA sources (.ref/causal_conv1d) and Python package (.ref/py/causal_conv1d).
if [[ -f .ref/causal_conv1d/causal_conv1d.cpp && -f .ref/py/causal_conv1d/__init__.py ]]; then
    echo ".ref/causal_conv1d and .ref/py/causal_conv1d are there"
else
    FILE="causal_conv1d-$CC_VERSION.tar.gz"
    fetch causal-conv1d "$FILE" "$CC_SHA256"
    tar xzf "$tmp/$FILE" -C "$tmp"
    rm -rf .ref/causal_conv1d .ref/py/causal_conv1d
    cp -r "$tmp/causal_conv1d-$CC_VERSION/csrc" .ref/causal_conv1d
    cp -r "$tmp/causal_conv1d-$CC_VERSION/causal_conv1d" .ref/py/
    echo "causal-conv1d $CC_VERSION" >.ref/causal_conv1d/VERSION
    echo "copied causal-conv1d $CC_VERSION to .ref/causal_conv1d and .ref/py/causal_conv1d"
    ls .ref/causal_conv1d
fi

# einops: pure-Python wheel, its package folder only.
if [[ -f .ref/py/einops/__init__.py ]]; then
    echo ".ref/py/einops is there"
else
    FILE="einops-$EI_VERSION-py3-none-any.whl"
    fetch einops "$FILE" "$EI_SHA256"
    rm -rf .ref/py/einops
    python3 - "$tmp/$FILE" .ref/py <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.startswith("einops/")]
    if not names:
        sys.exit(f"{sys.argv[1]} has no einops/ folder")
    z.extractall(sys.argv[2], names)
PY
    echo "einops $EI_VERSION" >.ref/py/einops/VERSION
    echo "unpacked einops $EI_VERSION to .ref/py/einops"
fi
