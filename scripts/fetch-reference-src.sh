#!/usr/bin/env bash
# Fetches the reference GPU kernel for the side-by-side benchmark: the selective-scan CUDA
# sources of the PyPI mamba-ssm sdist (the kernel family the DeciMamba authors' code runs),
# unpacked into .ref/selective_scan (gitignored, never committed). Run here, where PyPI is
# reachable; scripts/gpu-check.sh builds and times it on the GPU machine when the folder
# exists (carry it: run(..., carry=[".gpu", ".ref"])).
#
# The archive is read straight from the package index (PEP 691 JSON, else the PEP 503 HTML
# page) and checked against a pinned sha256. `pip download` is not used: for an sdist it
# prepares the package's metadata, which runs mamba-ssm's setup.py, and that imports torch
# (and needs `wheel`), so it fails on a fresh machine.
#   MAMBA_SSM_VERSION (default 2.3.2.post1), MAMBA_SSM_SHA256 (pinned for the default),
#   PIP_INDEX_URL (default https://pypi.org/simple)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${MAMBA_SSM_VERSION:-2.3.2.post1}
if [[ $VERSION == 2.3.2.post1 ]]; then
    SHA256=${MAMBA_SSM_SHA256:-104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028}
else
    SHA256=${MAMBA_SSM_SHA256:?"set MAMBA_SSM_SHA256 to the sha256 of mamba_ssm-$VERSION.tar.gz"}
fi
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
[[ -f .ref/selective_scan/selective_scan.cpp ]] && { echo ".ref/selective_scan is there"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
FILE="mamba_ssm-$VERSION.tar.gz"
python3 - "$INDEX" mamba-ssm "$FILE" "$SHA256" "$tmp/$FILE" <<'PY'
import hashlib, html.parser, json, sys, urllib.parse, urllib.request
index, name, filename, sha256, out = sys.argv[1:]
page = f"{index.rstrip('/')}/{name}/"
req = urllib.request.Request(page, headers={
    "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
with urllib.request.urlopen(req, timeout=120) as r:
    body, kind = r.read(), r.headers.get("Content-Type", "")
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
with urllib.request.urlopen(url, timeout=300) as r:
    data = r.read()
got = hashlib.sha256(data).hexdigest()
if got != sha256:
    sys.exit(f"{filename}: sha256 {got} is not the pinned {sha256}")
open(out, "wb").write(data)
print(f"fetched {filename} ({len(data)} bytes) from {url}")
PY
tar xzf "$tmp/$FILE" -C "$tmp"
mkdir -p .ref
cp -r "$tmp/mamba_ssm-$VERSION/csrc/selective_scan" .ref/
echo "mamba-ssm $VERSION" >.ref/selective_scan/VERSION
ls .ref/selective_scan
