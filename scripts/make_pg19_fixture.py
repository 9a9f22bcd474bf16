#!/usr/bin/env python3
"""Write tests/fixtures/pg19/test-00000-of-00001.parquet, a tiny stand-in for the
PG-19 test split as the Hugging Face hub serves it (emozilla/pg19's
data/test-00000-of-00001.parquet; deepmind/pg19 at refs/convert/parquet).

    pip install pyarrow
    python3 scripts/make_pg19_fixture.py

Deterministic; rewrites the same files. Three "books" cut from the public-domain
tests/fixtures/text/austen-excerpt.txt (Pride and Prejudice, chapters 1-6) at the
"Chapter 3" and "Chapter 5" headings, so each book's text is a verbatim slice of
that file. The PG-19 columns in PG-19's order: short_book_title (string),
publication_date (int32), url (string), text (string). Snappy compression like
the hub's files; two row groups (2 + 1 rows) so readers must walk row groups;
dictionary encoding for the short columns and plain encoding for the text (as
pyarrow falls back to for multi-megabyte books).

Also tests/fixtures/pg19/zstd-codec.parquet: one short row compressed with zstd,
which decimamba's parquet build leaves out (to test that error).
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests/fixtures/text/austen-excerpt.txt"
OUT = ROOT / "tests/fixtures/pg19/test-00000-of-00001.parquet"
# One tiny zstd row: a codec this build of decimamba leaves out, for its error test.
ZSTD = ROOT / "tests/fixtures/pg19/zstd-codec.parquet"


def books():
    text = SOURCE.read_text(encoding="utf-8")
    cuts = [0, text.index("\nChapter 3\n") + 1, text.index("\nChapter 5\n") + 1, len(text)]
    titles = [
        "Pride and Prejudice, chapters 1-2",
        "Pride and Prejudice, chapters 3-4",
        "Pride and Prejudice, chapters 5-6",
    ]
    return [(t, text[a:b]) for t, a, b in zip(titles, cuts, cuts[1:])]


def main():
    rows = books()
    schema = pa.schema(
        [
            ("short_book_title", pa.string()),
            ("publication_date", pa.int32()),
            ("url", pa.string()),
            ("text", pa.string()),
        ]
    )
    table = pa.table(
        {
            "short_book_title": [t for t, _ in rows],
            "publication_date": [1813] * len(rows),
            "url": ["http://www.gutenberg.org/ebooks/1342"] * len(rows),
            "text": [b for _, b in rows],
        },
        schema=schema,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        OUT,
        compression="snappy",
        row_group_size=2,
        use_dictionary=["short_book_title", "url"],
        data_page_version="1.0",
        write_statistics=False,
    )
    back = pq.read_table(OUT)
    assert back.column("text").to_pylist() == [b for _, b in rows]
    meta = pq.ParquetFile(OUT).metadata
    pq.write_table(
        pa.table({"short_book_title": ["zstd"], "text": ["Compressed with zstd."]}),
        ZSTD,
        compression="zstd",
        write_statistics=False,
    )
    print(f"wrote {ZSTD.relative_to(ROOT)}: {ZSTD.stat().st_size} bytes")
    print(f"wrote {OUT.relative_to(ROOT)}: {OUT.stat().st_size} bytes, "
          f"{meta.num_rows} rows in {meta.num_row_groups} row groups")


if __name__ == "__main__":
    main()
