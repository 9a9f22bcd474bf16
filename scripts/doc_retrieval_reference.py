#!/usr/bin/env python3
"""An independent reference of decimamba's document-retrieval prompts (the protocol in the
doc comment of src/eval/doc_retrieval/mod.rs, after assafbk/DeciMamba's
`inject_noise_to_context`), run on the SQuAD fixture:

    pip install pyarrow
    python3 scripts/make_squad_fixture.py
    python3 scripts/doc_retrieval_reference.py

writes tests/fixtures/reference/doc_retrieval/prompts.json, which tests/doc_retrieval.rs
compares with the Rust prompts: question choice, golden position, noise paragraphs, ids,
prompt text and label, for several seeds and document counts.

The protocol, from its description:
* rows are read in file order; paragraphs are distinct `context` strings in order of first
  appearance; a question is answerable when answers.text is not empty;
* SplitMix64; below(n) = (draw * n) >> 64; take(pool, k) = partial Fisher-Yates: for
  i < k swap pool[i] with pool[i + below(len - i)], keep pool[:k];
* mix_seed(words): h = 0x9e3779b97f4a7c15; for each word: h ^= w, h += 0x9e3779b97f4a7c15,
  then the SplitMix64 finaliser;
* questions: take(answerable rows, count) with SplitMix64(mix_seed([seed]));
* a prompt for (row, N): rng = SplitMix64(mix_seed([seed, N, row])); golden position
  below(N + 1); noise = take(other paragraph indices ascending, N); ids = take(0..1000, N + 1);
  documents = noise with the golden paragraph inserted at its position; text =
  concat(" <|Query|> {q} <|Document {id}|> {doc}") + " <|Answer|> <|Document "; label
  "{golden id}|>".
"""

import json
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/squad/validation-00000-of-00001.parquet"
OUT = ROOT / "tests/fixtures/reference/doc_retrieval/prompts.json"
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def finalise(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix_seed(words):
    h = GOLDEN
    for w in words:
        h ^= w
        h = (h + GOLDEN) & M64
        h = finalise(h)
    return h


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & M64

    def next(self):
        self.state = (self.state + GOLDEN) & M64
        return finalise(self.state)

    def below(self, n):
        return (self.next() * n) >> 64

    def take(self, pool, k):
        pool = list(pool)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def load():
    table = pq.read_table(FIXTURE).to_pylist()
    contexts, index, rows = [], {}, []
    for r in table:
        c = r["context"]
        if c not in index:
            index[c] = len(contexts)
            contexts.append(c)
        rows.append({"id": r["id"], "question": r["question"], "context": index[c],
                     "answerable": len(r["answers"]["text"]) > 0})
    return contexts, rows


def prompt(contexts, rows, row, n, seed):
    q = rows[row]
    rng = SplitMix64(mix_seed([seed, n, row]))
    golden = rng.below(n + 1)
    others = [c for c in range(len(contexts)) if c != q["context"]]
    noise = rng.take(others, n)
    ids = rng.take(range(1000), n + 1)
    docs = noise[:golden] + [q["context"]] + noise[golden:]
    text = "".join(f" <|Query|> {q['question']} <|Document {i}|> {contexts[d]}"
                   for d, i in zip(docs, ids))
    text += " <|Answer|> <|Document "
    return {"row": row, "num_docs": n, "seed": seed, "golden_position": golden,
            "documents": docs, "doc_ids": ids, "text": text, "label": f"{ids[golden]}|>"}


def main():
    contexts, rows = load()
    answerable = [i for i, r in enumerate(rows) if r["answerable"]]
    cases = []
    for seed, count in [(0, 5), (7, 13), (12345678901234567890, 3)]:
        chosen = SplitMix64(mix_seed([seed])).take(answerable, count)
        prompts = [prompt(contexts, rows, row, n, seed) for n in (1, 3, 8) for row in chosen]
        cases.append({"seed": seed, "questions": count, "question_rows": chosen,
                      "prompts": prompts})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"paragraphs": len(contexts), "rows": len(rows), "cases": cases}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {sum(len(c['prompts']) for c in cases)} prompts to {OUT}")


if __name__ == "__main__":
    main()
