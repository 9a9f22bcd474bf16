#!/usr/bin/env python3
"""Write a tiny stand-in for the SQuAD v2 validation split, in both layouts decimamba reads:

* tests/fixtures/squad/validation-00000-of-00001.parquet: rajpurkar/squad_v2's parquet
  export (squad_v2/validation-00000-of-00001.parquet on the hub): columns id, title,
  context, question (strings) and answers (struct of text: list<string>,
  answer_start: list<int32>), snappy-compressed, in two row groups;
* tests/fixtures/squad/dev-v2.0.json: the official layout (data[] articles ->
  paragraphs[] -> qas[] with id, question, answers[], is_impossible), the same rows in
  the same order.

    pip install pyarrow
    python3 scripts/make_squad_fixture.py

Deterministic. The paragraphs are short invented texts (written for this fixture), so
prompts stay small for the byte-level test model: 3 articles, 9 paragraphs, 18 questions
of which 4 are unanswerable (empty answers, as SQuAD v2); paragraph "Harbor-3" is asked
about only by an unanswerable question, so it can appear only as a noise document.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/squad"

# (title, [(paragraph, [(question, answer or None)])])
ARTICLES = [
    ("Lighthouse", [
        ("The Varn lighthouse was built in 1871 on a granite ledge. Its lamp burned whale oil "
         "until 1903, when a kerosene burner replaced it.",
         [("When was the Varn lighthouse built?", "1871"),
          ("What fuel did the lamp burn first?", "whale oil"),
          ("Who designed the Varn lighthouse?", None)]),
        ("Keepers at Varn served four-month shifts. The last keeper, Ida Morrow, left in 1959 "
         "after the light was automated.",
         [("How long was a keeper's shift?", "four-month"),
          ("Who was the last keeper?", "Ida Morrow")]),
        ("A storm in 1924 cracked the lantern glass. Repairs took eleven weeks and used glass "
         "shipped from Leith.",
         [("Where did the replacement glass come from?", "Leith")]),
    ]),
    ("Orchard", [
        ("The Pell orchard grows nine apple varieties. The oldest trees, planted in 1910, are "
         "Russets that still bear fruit every second year.",
         [("How many apple varieties grow in the Pell orchard?", "nine"),
          ("When were the oldest trees planted?", "1910")]),
        ("Cider from the orchard is pressed in October and aged in oak barrels for six "
         "months before it is sold at the spring fair.",
         [("How long is the cider aged?", "six months"),
          ("What is the cider aged in?", "oak barrels"),
          ("What price does the cider fetch?", None)]),
        ("Bees from twelve hives pollinate the blossom. The beekeeper moves the hives to "
         "heather moors in late summer.",
         [("How many hives pollinate the blossom?", "twelve"),
          ("Where are the hives moved in late summer?", "heather moors")]),
    ]),
    ("Harbor", [
        ("Quay Street runs along the old harbor wall. Fishing boats unload there at dawn, "
         "and the fish market opens at six.",
         [("When does the fish market open?", "six"),
          ("Which street runs along the harbor wall?", "Quay Street")]),
        ("The harbor ferry crosses to Skell Island twice a day in winter and hourly in "
         "summer. The crossing takes forty minutes.",
         [("How long does the ferry crossing take?", "forty minutes"),
          ("How often does the ferry run in winter?", None)]),
        ("Harbor-3: a breakwater of basalt blocks shelters the inner basin from the "
         "westerly swell.",
         [("When was the breakwater finished?", None)]),
    ]),
]


def rows():
    n = 0
    for title, paragraphs in ARTICLES:
        for context, qas in paragraphs:
            for question, answer in qas:
                n += 1
                if answer is None:
                    answers = {"text": [], "answer_start": []}
                else:
                    answers = {"text": [answer], "answer_start": [context.index(answer)]}
                yield {
                    "id": f"fx{n:04d}",
                    "title": title,
                    "context": context,
                    "question": question,
                    "answers": answers,
                }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    data = list(rows())
    schema = pa.schema([
        ("id", pa.string()),
        ("title", pa.string()),
        ("context", pa.string()),
        ("question", pa.string()),
        ("answers", pa.struct([("text", pa.list_(pa.string())),
                               ("answer_start", pa.list_(pa.int32()))])),
    ])
    table = pa.Table.from_pylist(data, schema=schema)
    pq.write_table(table, OUT / "validation-00000-of-00001.parquet",
                   compression="snappy", row_group_size=12)

    articles = []
    for title, paragraphs in ARTICLES:
        ps = []
        for context, qas in paragraphs:
            ps.append({"context": context, "qas": []})
        articles.append({"title": title, "paragraphs": ps})
    # Fill qas in row order from the table rows (same ids as the parquet).
    it = iter(data)
    for a, (_, paragraphs) in zip(articles, ARTICLES):
        for p, (_, qas) in zip(a["paragraphs"], paragraphs):
            for _ in qas:
                r = next(it)
                answers = [{"text": t, "answer_start": s}
                           for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
                qa = {"question": r["question"], "id": r["id"], "answers": answers,
                      "is_impossible": not answers}
                if not answers:
                    qa["plausible_answers"] = [{"text": "unknown", "answer_start": 0}]
                p["qas"].append(qa)
    with open(OUT / "dev-v2.0.json", "w", encoding="utf-8") as f:
        json.dump({"version": "v2.0", "data": articles}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(data)} questions to {OUT}")


if __name__ == "__main__":
    main()
