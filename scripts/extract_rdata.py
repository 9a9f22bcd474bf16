#!/usr/bin/env python3
"""Extract character vectors from an R lazy-load database without R.

An R package's lazy-loaded data lives in two files:

* ``Rdata.rdx`` -- the index: a gzip'd, XDR-serialized R list
  ``list(variables = list(name = c(offset, length), ...), references = ...,
  compressed = ...)``.
* ``Rdata.rdb`` -- the records: at each ``offset`` a blob of ``length`` bytes,
  namely a 4-byte big-endian uncompressed length followed by the compressed
  serialization (zlib by default; with ``compressed`` 2 or 3 a type byte
  ``'Z'``/``'2'``/``'X'``/``'0'`` precedes zlib/bzip2/xz/raw data).

Each record is an XDR serialization (format version 2 or 3) of one R object.
This module implements enough of R's ``unserialize`` for plain data: NULL,
logical/integer/double/character vectors, lists, pairlists, symbols and
references, with attributes.

Used by ``scripts/fetch_data.sh`` on the Debian package ``r-cran-janeaustenr``
to write Jane Austen's six novels as UTF-8 text, one file per novel, each
element of the character vector (one printed line of the Project Gutenberg
text) becoming one line of the file.

Usage:
    extract_rdata.py list  RDATA_DIR
    extract_rdata.py austen RDATA_DIR OUT_DIR

Standard library only.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib

# SEXP type codes (Rinternals.h) and serialization pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP = 0, 1, 2, 3, 4
LANGSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 6, 9, 10, 13, 14, 15, 16
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 251, 247, 242, 241
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP = 238, 239, 240

NA_INTEGER = -(2**31)

# CHARSXP encoding bits (in the "levels" part of the flags).
LATIN1_MASK = 1 << 2
UTF8_MASK = 1 << 3
BYTES_MASK = 1 << 1
ASCII_MASK = 1 << 6


class RDataError(Exception):
    pass


class Sym(str):
    """An R symbol."""


class RObj:
    """A decoded R object with its attributes (``attrs``: dict name -> value)."""

    def __init__(self, kind: int, value, attrs: dict | None = None):
        self.kind = kind
        self.value = value
        self.attrs = attrs or {}

    def names(self):
        n = self.attrs.get("names")
        return list(n.value) if isinstance(n, RObj) else None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        v = self.value
        if isinstance(v, list) and len(v) > 6:
            v = v[:6] + ["..."]
        return f"RObj(type={self.kind}, value={v!r}, attrs={list(self.attrs)})"


class Unserializer:
    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []
        self.native_encoding = "UTF-8"

    # -- primitives -------------------------------------------------------
    def _take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise RDataError(f"truncated serialization at byte {self.p} (+{n})")
        b = self.d[self.p : self.p + n]
        self.p += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def ints(self, n: int) -> list:
        return list(struct.unpack(f">{n}i", self._take(4 * n)))

    def doubles(self, n: int) -> list:
        return list(struct.unpack(f">{n}d", self._take(8 * n)))

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    # -- header -----------------------------------------------------------
    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"not an XDR serialization (format {fmt!r})")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            n = self.int()
            self.native_encoding = self._take(n).decode("ascii", "replace")
        elif version != 2:
            raise RDataError(f"unsupported serialization version {version}")

    def unserialize(self):
        self.header()
        return self.item()

    # -- items ------------------------------------------------------------
    def charsxp(self, levels: int):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & BYTES_MASK:
            return raw.decode("utf-8", "surrogateescape")
        # UTF8, ASCII or native (the native encoding of these packages is UTF-8).
        enc = "utf-8" if (levels & (UTF8_MASK | ASCII_MASK)) else self.native_encoding
        try:
            return raw.decode(enc)
        except (LookupError, UnicodeDecodeError):
            return raw.decode("utf-8", "replace")

    def attributes(self) -> dict:
        pl = self.item()
        out = {}
        if isinstance(pl, RObj) and pl.kind == LISTSXP:
            for tag, val in pl.value:
                out[str(tag)] = val
        return out

    def item(self):
        flags = self.int()
        typ = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if typ == NILVALUE_SXP:
            return None
        if typ in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                   MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RObj(typ, None)
        if typ == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if typ == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = Sym(name if isinstance(name, str) else "")
            self.refs.append(sym)
            return sym
        if typ in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP):
            # Pairlist: iterate instead of recursing along the CDR.
            cells = []
            while True:
                attrs = self.attributes() if has_attr else {}
                tag = self.item() if has_tag else None
                car = self.item()
                cells.append((tag, car))
                flags = self.int()
                typ = flags & 0xFF
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
                if typ not in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP):
                    break
            if typ != NILVALUE_SXP:
                raise RDataError(f"improper pairlist ending in type {typ}")
            return RObj(LISTSXP, cells, attrs)
        if typ == CHARSXP:
            return self.charsxp(levels)
        if typ in (LGLSXP, INTSXP):
            n = self.length()
            v = [None if x == NA_INTEGER else x for x in self.ints(n)]
            if typ == LGLSXP:
                v = [None if x is None else bool(x) for x in v]
            val = v
        elif typ == REALSXP:
            val = self.doubles(self.length())
        elif typ == CPLXSXP:
            d = self.doubles(2 * self.length())
            val = [complex(d[i], d[i + 1]) for i in range(0, len(d), 2)]
        elif typ == RAWSXP:
            val = self._take(self.length())
        elif typ == STRSXP:
            n = self.length()
            val = []
            for _ in range(n):
                f = self.int()
                if f & 0xFF != CHARSXP:
                    raise RDataError(f"STRSXP element of type {f & 0xFF}")
                val.append(self.charsxp(f >> 12))
        elif typ in (VECSXP, EXPRSXP):
            n = self.length()
            val = [self.item() for _ in range(n)]
        else:
            raise RDataError(
                f"unsupported SEXP type {typ} at byte {self.p - 4} "
                "(this decoder handles plain data objects only)")
        attrs = self.attributes() if has_attr else {}
        return RObj(typ, val, attrs)


def unserialize(data: bytes):
    return Unserializer(data).unserialize()


def _decompress_record(blob: bytes, compressed: int) -> bytes:
    if len(blob) < 4:
        raise RDataError("record shorter than its length header")
    (outlen,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    if compressed in (2, 3):
        kind, body = body[:1], body[1:]
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise RDataError(f"unknown record compression type {kind!r}")
    else:
        out = zlib.decompress(body)
    if len(out) != outlen:
        raise RDataError(f"record length {len(out)} != declared {outlen}")
    return out


class LazyLoadDB:
    """An R lazy-load database: ``<base>.rdx`` + ``<base>.rdb``."""

    def __init__(self, base: str):
        self.rdb_path = base + ".rdb"
        with gzip.open(base + ".rdx", "rb") as f:
            index = unserialize(f.read())
        if not (isinstance(index, RObj) and index.kind == VECSXP):
            raise RDataError("unexpected .rdx index structure")
        fields = dict(zip(index.names() or [], index.value))
        variables = fields.get("variables")
        if not isinstance(variables, RObj):
            raise RDataError(".rdx index has no 'variables'")
        comp = fields.get("compressed")
        self.compressed = 1
        if isinstance(comp, RObj) and comp.value:
            c = comp.value[0]
            self.compressed = int(c) if not isinstance(c, bool) else int(c)
        self.variables = {}
        for name, pos in zip(variables.names() or [], variables.value):
            off, ln = (int(x) for x in pos.value[:2])
            self.variables[name] = (off, ln)

    def read(self, name: str):
        off, ln = self.variables[name]
        with open(self.rdb_path, "rb") as f:
            f.seek(off)
            blob = f.read(ln)
        if len(blob) != ln:
            raise RDataError(f"{self.rdb_path}: record {name!r} truncated")
        return unserialize(_decompress_record(blob, self.compressed))


# Variable name in janeaustenr -> output file stem.
AUSTEN_TITLES = {
    "sensesensibility": ("sense-and-sensibility", "Sense and Sensibility"),
    "prideprejudice": ("pride-and-prejudice", "Pride and Prejudice"),
    "mansfieldpark": ("mansfield-park", "Mansfield Park"),
    "emma": ("emma", "Emma"),
    "northangerabbey": ("northanger-abbey", "Northanger Abbey"),
    "persuasion": ("persuasion", "Persuasion"),
}


def lines_to_text(lines: list) -> str:
    """Join one-line-per-element text: lines joined by '\\n', blank lines kept,
    trailing spaces removed, leading/trailing blank lines dropped, one final
    newline."""
    out = [("" if s is None else s).rstrip() for s in lines]
    while out and not out[0]:
        out.pop(0)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def extract_austen(rdata_dir: str, out_dir: str) -> list:
    db = LazyLoadDB(os.path.join(rdata_dir, "Rdata"))
    missing = [v for v in AUSTEN_TITLES if v not in db.variables]
    if missing:
        raise RDataError(f"variables missing from Rdata: {missing}; "
                         f"found {sorted(db.variables)}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for var, (stem, title) in AUSTEN_TITLES.items():
        obj = db.read(var)
        if not (isinstance(obj, RObj) and obj.kind == STRSXP):
            raise RDataError(f"{var}: expected a character vector, got {obj!r}")
        text = lines_to_text(obj.value)
        path = os.path.join(out_dir, stem + ".txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
        written.append((path, title, len(obj.value), len(text.encode("utf-8"))))
    return written


def main(argv: list) -> int:
    if len(argv) >= 2 and argv[0] == "list":
        db = LazyLoadDB(os.path.join(argv[1], "Rdata"))
        for name, (off, ln) in sorted(db.variables.items()):
            obj = db.read(name)
            n = len(obj.value) if isinstance(obj, RObj) and obj.value is not None else 0
            print(f"{name}\ttype={getattr(obj, 'kind', '?')}\tlen={n}\toffset={off}\tbytes={ln}")
        return 0
    if len(argv) == 3 and argv[0] == "austen":
        for path, title, nlines, nbytes in extract_austen(argv[1], argv[2]):
            print(f"{path}\t{title}\t{nlines} lines\t{nbytes} bytes")
        return 0
    print(__doc__.split("Usage:")[1].split("Standard")[0].rstrip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RDataError, OSError, zlib.error, EOFError) as e:
        print(f"extract_rdata.py: error: {e}", file=sys.stderr)
        sys.exit(1)
