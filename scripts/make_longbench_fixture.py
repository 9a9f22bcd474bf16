#!/usr/bin/env python3
"""Write tests/fixtures/longbench/data.zip, a tiny stand-in for THUDM/LongBench's data.zip
(the hub repo's archive, which holds data/{task}.jsonl for LongBench and
data/{task}_e.jsonl for LongBench-E, one JSON sample per line with the fields input,
context, answers, length, dataset, language, all_classes, _id).

    python3 scripts/make_longbench_fixture.py

Standard library only; deterministic (fixed timestamps, sorted entries, deflate). The
texts are short and invented for this fixture, so prompts stay small for the byte-level
test model. Tasks: the paper's six (multifieldqa_en, gov_report, multi_news, triviaqa, lcc,
repobench-p), plus trec (classification, all_classes), samsum (newline stop) and dureader
(a Chinese task decimamba refuses); three samples each, and for the LongBench-E tasks an
_e file whose length fields fall in each bucket (0-4k, 4-8k, 8k+).
"""

import json
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/longbench/data.zip"

PARAGRAPH = ("The river town of Ossing keeps a ledger of every boat that passes its lock. "
             "In the wet year the ledger filled two volumes, and the lock keeper, Mara Teal, "
             "wrote the last entries by lamplight. ")

CODE = ("def area(width, height):\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
        "class Box:\n    def __init__(self, w, h):\n        self.w = w\n        self.h = h\n\n"
        "    def area(self):\n")

TREC_CLASSES = ["Abbreviation", "Entity", "Description", "Human", "Location", "Numeric value"]


def samples(task):
    """Three (input, context, answers, all_classes) samples of `task`."""
    if task == "multifieldqa_en":
        return [("Who keeps the ledger?", PARAGRAPH * (i + 1), ["Mara Teal"], None)
                for i in range(3)]
    if task in ("gov_report", "multi_news"):
        return [("", PARAGRAPH * (i + 2), ["The lock keeper recorded every boat in a ledger."], None)
                for i in range(3)]
    if task == "triviaqa":
        shots = "Passage: " + PARAGRAPH + "\nQuestion: Which town keeps a ledger?\nAnswer: Ossing\n"
        return [("Passage: " + PARAGRAPH + "\nQuestion: Who wrote the last entries?\nAnswer:",
                 shots * (i + 1), ["Mara Teal", "Teal"], None) for i in range(3)]
    if task == "lcc":
        return [("", CODE * (i + 1), ["        return self.w * self.h"], None) for i in range(3)]
    if task == "repobench-p":
        return [("box = Box(2, 3)\n", "# path: geometry.py\n" + CODE * (i + 1),
                 ["print(box.area())"], None) for i in range(3)]
    if task == "trec":
        shots = "Question: What does NASA stand for?\nType: Abbreviation\n" \
                "Question: Who wrote Hamlet?\nType: Human\n"
        return [("Question: Where is the river town?\nType:", shots * (i + 1), ["Location"],
                 TREC_CLASSES) for i in range(3)]
    if task == "samsum":
        shots = "Dialogue: Ann: Lunch? Bob: Sure, at noon.\nSummary: Ann and Bob will have lunch at noon.\n"
        return [("Dialogue: Cy: Is the lock open? Dee: Yes, until six.\nSummary:", shots * (i + 1),
                 ["The lock is open until six."], None) for i in range(3)]
    if task == "dureader":
        return [("谁记录了船只？", "河边小镇的船闸管理员记录了每一条经过的船。" * (i + 1),
                 ["船闸管理员"], None) for i in range(3)]
    raise ValueError(task)


LONGBENCH_E = ["multifieldqa_en", "gov_report", "multi_news", "triviaqa", "lcc", "repobench-p",
               "trec", "samsum"]
TASKS = LONGBENCH_E + ["dureader"]


def lines(task, suffix, lengths):
    out = []
    for i, ((inp, ctx, answers, classes), length) in enumerate(zip(samples(task), lengths)):
        out.append(json.dumps({
            "input": inp, "context": ctx, "answers": answers, "length": length,
            "dataset": task + suffix, "language": "zh" if task == "dureader" else "en",
            "all_classes": classes, "_id": f"{task}{suffix}-{i}",
        }, ensure_ascii=False))
    return "\n".join(out) + "\n"


def main():
    OUT.parent.mkdir(parents=True, exist_ok=True)
    entries = {}
    for task in TASKS:
        entries[f"data/{task}.jsonl"] = lines(task, "", [120, 150, 180])
        if task in LONGBENCH_E:
            entries[f"data/{task}_e.jsonl"] = lines(task, "_e", [1500, 5200, 9100])
    with zipfile.ZipFile(OUT, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, entries[name].encode("utf-8"))
    print(f"wrote {len(entries)} files to {OUT}")


if __name__ == "__main__":
    main()
