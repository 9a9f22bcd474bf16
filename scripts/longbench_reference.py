#!/usr/bin/env python3
"""Independent reference for decimamba's LongBench (v1) / LongBench-E scoring
(src/eval/longbench.rs), written from the official THUDM/LongBench sources
(LongBench/metrics.py, eval.py, pred.py) but not copied from them.

Run from the repository root (CPU only, about a second, no network):

    pip install rouge==1.0.1 fuzzywuzzy==0.18.0 python-Levenshtein==0.27.5 numpy==2.4.6
    python3 scripts/longbench_reference.py

Pinned versions this fixture was made with (Python 3.11.7):
    rouge==1.0.1  fuzzywuzzy==0.18.0  python-Levenshtein==0.27.5 (Levenshtein==0.27.5,
    RapidFuzz==3.14.6)  numpy==2.4.6.  LongBench's requirements.txt names `rouge`,
    `jieba` and `fuzzywuzzy` without versions and does not name python-Levenshtein.
    jieba==0.42.1 is the official tokenizer of the Chinese qa_f1_zh / rouge_zh; those
    two metrics are not implemented in Rust (jieba-rs segments differently), so this
    script does not import it.

Writes tests/fixtures/reference/longbench/metrics.json (deterministic: seeded
`random.Random`, no clock). What the official dependencies compute here:
  * rouge-L: `rouge.Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]`, any
    exception -> 0.0 (as LongBench's rouge_score does), called with the same Python
    stack headroom as `python eval.py` has (see `rouge_l`), so the RecursionError of
    rouge's recursive LCS traceback happens at the same length as in eval.py.
  * fuzz.ratio: fuzzywuzzy backed by python-Levenshtein ("levenshtein") and, loaded a
    second time with Levenshtein hidden, by difflib.SequenceMatcher ("difflib"), which
    is what a plain `pip install -r requirements.txt` of LongBench gives.
Everything else (normalisation, token F1, classification, retrieval, count, code
line pick, dataset scoring and aggregation) is written below.
"""

import difflib
import importlib
import json
import os
import random
import re
import string
import sys
import warnings
from collections import Counter

import numpy as np
from rouge import Rouge

from fuzzywuzzy import fuzz as fuzz_lev

OUT = os.path.join("tests", "fixtures", "reference", "longbench", "metrics.json")


def load_difflib_fuzz():
    """A second fuzzywuzzy.fuzz whose SequenceMatcher is difflib's."""
    saved = {k: v for k, v in sys.modules.items() if k.startswith("fuzzywuzzy")}
    lev = sys.modules.get("Levenshtein")
    for k in saved:
        del sys.modules[k]
    sys.modules["Levenshtein"] = None  # `from Levenshtein import *` now fails
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module("fuzzywuzzy.fuzz")
    finally:
        for k in [k for k in sys.modules if k.startswith("fuzzywuzzy")]:
            del sys.modules[k]
        sys.modules.update(saved)
        if lev is None:
            del sys.modules["Levenshtein"]
        else:
            sys.modules["Levenshtein"] = lev
    assert mod.SequenceMatcher is difflib.SequenceMatcher
    return mod


fuzz_dl = load_difflib_fuzz()
assert fuzz_lev.SequenceMatcher is not difflib.SequenceMatcher


# ---------------------------------------------------------------- English answers
def norm_en(text):
    """lower -> drop ASCII punctuation -> articles to spaces -> collapse whitespace."""
    low = text.lower()
    kept = "".join(c for c in low if c not in string.punctuation)
    no_art = re.sub(r"\b(?:a|an|the)\b", " ", kept)
    return " ".join(no_art.split())


def bag_f1(pred_tokens, gt_tokens):
    same = sum((Counter(pred_tokens) & Counter(gt_tokens)).values())
    if same == 0:
        return 0.0
    p = 1.0 * same / len(pred_tokens)
    r = 1.0 * same / len(gt_tokens)
    return (2 * p * r) / (p + r)


def qa_f1(pred, gt):
    return bag_f1(norm_en(pred).split(), norm_en(gt).split())


# ---------------------------------------------------------------- rouge-L
# `python eval.py`: <module> -> scorer/scorer_e -> rouge_score -> Rouge.get_scores.
EVAL_PY_FRAMES_AT_METRIC = 3


def stack_depth():
    f, d = sys._getframe(1), 0
    while f is not None:
        d += 1
        f = f.f_back
    return d


def rouge_l(pred, gt):
    here = stack_depth()  # frames down to and including this one
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(old + here - EVAL_PY_FRAMES_AT_METRIC)
    try:
        return Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0
    finally:
        sys.setrecursionlimit(old)


# ---------------------------------------------------------------- small metrics
DIGITS = re.compile(r"\d+")


def share_equal(numbers, target):
    if not numbers:
        return 0.0
    return float(sum(1 for n in numbers if n == target) / len(numbers))


def count_metric(pred, gt):
    return share_equal(DIGITS.findall(pred), gt)


def retrieval_metric(pred, gt, label):
    found = re.findall(label + r"(\d+)", gt)
    if not found:  # official code raises IndexError here
        return 0.0
    return share_equal(DIGITS.findall(pred), found[0])


def classification_metric(pred, gt, classes):
    hits = [c for c in classes if c in pred]
    # LongBench removes from the list it is iterating over, so the entry right after
    # a removed one is never looked at: walk it by index the same way.
    k = 0
    while k < len(hits):
        c = hits[k]
        if c in gt and c != gt:
            del hits[hits.index(c)]
        k += 1
    return 1.0 / len(hits) if gt in hits else 0.0


def first_code_line(pred):
    for line in pred.lstrip("\n").split("\n"):
        if "`" in line or "#" in line or "//" in line:
            continue
        return line
    return ""


def code_sim(pred, gt, fuzz):
    return fuzz.ratio(first_code_line(pred), gt) / 100


# ---------------------------------------------------------------- eval.py scoring
METRIC_OF = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge",
    "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge",
    "lsht": "classification", "passage_retrieval_en": "retrieval",
    "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}


def metric(name, pred, gt, classes):
    if name == "qa_f1":
        return qa_f1(pred, gt)
    if name == "rouge":
        return rouge_l(pred, gt)
    if name == "classification":
        return classification_metric(pred, gt, classes)
    if name == "retrieval":
        return retrieval_metric(pred, gt, "Paragraph ")
    if name == "retrieval_zh":
        return retrieval_metric(pred, gt, "段落")
    if name == "count":
        return count_metric(pred, gt)
    if name == "code_sim":
        return code_sim(pred, gt, fuzz_lev)
    raise ValueError(name)


def score_one(dataset, pred, answers, classes):
    if dataset in FIRST_LINE_ONLY:
        pred = pred.lstrip("\n").split("\n")[0]
    best = 0.0
    for gt in answers:
        best = max(best, metric(METRIC_OF[dataset], pred, gt, classes))
    return best


def mean_sequential(scores):
    """eval.py scorer: running float sum, then round(100 * total / n, 2)."""
    total = 0.0
    for s in scores:
        total += s
    return round(100 * total / len(scores), 2)


def mean_numpy(scores):
    """eval.py scorer_e: round(100 * np.mean(bucket), 2); an empty bucket is NaN."""
    if not scores:
        return None  # np.mean([]) is nan (eval.py writes NaN); null in JSON
    return round(100 * float(np.mean(np.array(scores, dtype=np.float64))), 2)


def bucket_of(length):
    return "0-4k" if length < 4000 else ("4-8k" if length < 8000 else "8k+")


# ---------------------------------------------------------------- test cases
rng = random.Random(20240601)
WORDS = ["the", "a", "an", "The", "A", "An", "cat", "sat", "mat", "dog", "Paris",
         "France", "capital", "is", "of", "on", "in", "and", "theatre", "another",
         "anna", "1999", "42", "x-ray", "U.S.", "can't", "rock'n'roll", "(b)", "...",
         ",", ".", "!", "café", "naïve", "ΣΟΦΙΑ", "Straße"]


def rand_sentence(lo, hi):
    out = []
    for _ in range(rng.randint(lo, hi)):
        w = rng.choice(WORDS)
        sep = rng.choice([" ", " ", " ", "  ", "\n", "\t", ". ", ", "])
        out.append(w + sep)
    return "".join(out).strip(" ") if rng.random() < 0.8 else "".join(out)


def mutate(text):
    """A text sharing some of `text`'s words: drops, swaps, insertions, case changes."""
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.2:
            continue
        if r < 0.3:
            w = w.upper()
        elif r < 0.4:
            w = rng.choice(WORDS)
        out.append(w)
        if rng.random() < 0.15:
            out.append(rng.choice(WORDS + [".", ",", "the"]))
    if len(out) > 1 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return rng.choice([" ", " ", "  ", ". "]).join(out)


def rand_code(lo, hi, alphabet):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


EN_HAND = [
    ("the cat sat", "a cat sat down"),
    ("", "anything"),
    ("anything", ""),
    ("", ""),
    ("!!! ... ???", "yes"),
    ("!!!", "!!!"),
    ("the a an", "The"),
    ("The Cat", "cat"),
    ("theatre of the absurd", "the theatre"),
    ("an-apple", "an apple"),
    ("a.b.c", "abc"),
    ("  Paris,\n France ", "paris france"),
    ("cat cat cat", "cat"),
    ("cat", "cat cat dog"),
    ("café naïve", "Café Naive"),
    ("ΣΟΦΙΑΣ ΣΑΣ", "σοφιας σας"),
    ("İstanbul", "i̇stanbul"),
    ("Straße STRASSE", "straße"),
    ("a\x1cb\u3000c\u00a0d", "a b c d"),
    ("the_cat a_b", "the cat"),
    ("1999 the 42", "42 1999"),
    ("Yes.", "yes"),
    ("unanswerable", "Unanswerable"),
]

ROUGE_HAND = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat is on the mat"),
    ("police killed the gunman", "police kill the gunman"),
    ("the gunman was shot dead by police", "police killed the gunman"),
    ("a b c d e", "e d c b a"),
    ("a a a b", "a b b b"),
    ("First sentence. Second one here.", "Second one. First sentence here."),
    ("", "reference text"),
    ("hypothesis text", ""),
    ("", ""),
    (".", "a"),
    ("...", "a . b"),
    ("a", "..."),
    (" ", " "),
    (" . ", "x"),
    ("a..b", "a b"),
    ("no overlap at all", "completely different words"),
    ("Dialogue summary\nwith newline", "Dialogue summary with newline"),
    ("x\x1cy", "x y"),
]

CLASSES = ["Abbreviation", "Expression abbreviated", "Animal", "Organ of body",
           "Color", "Event", "Food", "Date", "Other number", "Other location",
           "Location", "City", "Country"]
CLASS_HAND = [
    ("Location", "Location", CLASSES),
    ("Other location", "Other location", CLASSES),
    ("Location", "Other location", CLASSES),
    ("Other location", "Location", CLASSES),
    ("Animal or Food", "Food", CLASSES),
    ("Expression abbreviated", "Expression abbreviated", CLASSES),
    ("Abbreviation", "Expression abbreviated", CLASSES),
    ("", "Food", CLASSES),
    ("Food", "Food", []),
    ("abc", "abc", ["a", "b", "ab", "abc"]),
    ("abc", "ab", ["a", "b", "ab", "abc"]),
    ("a b", "b", ["a", "b", "ab"]),
    ("xyz", "xyz", ["", "x", "xyz"]),
    ("体育新闻", "体育", ["体育", "财经", "教育", "体育新闻"]),
    ("类别：财经", "财经", ["体育", "财经", "教育"]),
]

RETRIEVAL_HAND = [
    ("Paragraph 3", "Paragraph 3"),
    ("Paragraph 13", "Paragraph 3"),
    ("The answer is Paragraph 3, not Paragraph 30", "Paragraph 3"),
    ("3", "Paragraph 3"),
    ("Paragraph 03", "Paragraph 3"),
    ("", "Paragraph 3"),
    ("no number", "Paragraph 3"),
    ("Paragraph ３", "Paragraph 3"),
    ("Paragraph 3", "Paragraph ３"),
    ("Paragraph 7", "no label here"),
    ("Paragraph 12 and 12", "Paragraph 12 or Paragraph 5"),
]
RETRIEVAL_ZH_HAND = [
    ("段落3", "段落3"),
    ("答案是段落12", "段落12"),
    ("段落1，段落2", "段落2"),
    ("", "段落4"),
    ("段落４", "段落4"),
    ("段落5", "Paragraph 5"),
]
COUNT_HAND = [
    ("12", "12"),
    ("There are 12 unique paragraphs, not 13", "12"),
    ("12 12 12", "12"),
    ("twelve", "12"),
    ("", "12"),
    ("012", "12"),
    ("1 2", "12"),
    ("١٢", "12"),
    ("１２", "１２"),
    ("3.5", "3"),
    ("-7", "7"),
]
CODE_HAND = [
    ("    return x + 1\n", "    return x + 1"),
    ("\n\n# comment\nreturn x", "return x"),
    ("```python\nfoo(bar)\n```", "foo(bar)"),
    ("// note\nint a = 0;", "int a = 0;"),
    ("x = y  # trailing comment\nz = 1", "z = 1"),
    ("# only\n// comments\n`", "x"),
    ("", "x = 1"),
    ("", ""),
    ("\n", ""),
    ("a = 1", "a = 1"),
    ("self.assertEqual(a, b)", "self.assertEquals(a, b)"),
    ("abcdefgh", "aXYZWVUT"),
    ("\r\nvalue", "value"),
    ("  \n next", " next"),
]

FUZZ_HAND = [
    ("abcdefgh", "aXYZWVUT"),  # 100 * 2/16 = 12.5: banker's rounding -> 12
    ("abcdefghabcdefgh", "aXYZWVUTaXYZWVUT"),  # 12.5 again
    ("ab", "ac"), ("abcd", "abdc"), ("", "a"), ("a", ""), ("", ""), ("same", "same"),
    ("kitten", "sitting"), ("fuzzy wuzzy was a bear", "wuzzy fuzzy was a bear"),
    ("日本語テキスト", "日本語のテキスト"), ("naïve", "naive"),
    ("x" * 150 + "abc" * 40, "y" * 120 + "abc" * 40 + "x" * 30),  # difflib autojunk
    (("ab" * 60) + "zz", ("ba" * 110) + "q"),
    ("foo(bar, baz)", "foo(baz, bar)"),
]

TRUNC = []
for n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17]:
    for m in [0, 1, 2, 3, 4, 5, 6, 7, 8, 16]:
        ids = list(range(100, 100 + n))
        if len(ids) > m:
            half = int(m / 2)
            out = ids[:half] + ids[-half:]
        else:
            out = ids
        TRUNC.append({"len": n, "max_len": m, "out": out})

ROUND2 = [0.125, 0.375, 2.675, 1.005, 62.5, 12.345, 0.005, 33.33333333333333,
          66.66666666666667, 99.995, 100.0, 0.0, 57.14285714285714, 4.445, 8.125]


def main():
    out = {"meta": {
        "python": sys.version.split()[0],
        "rouge": "1.0.1", "fuzzywuzzy": "0.18.0", "python-Levenshtein": "0.27.5",
        "numpy": np.__version__, "recursion_limit": sys.getrecursionlimit(),
        "eval_py_frames_at_metric": EVAL_PY_FRAMES_AT_METRIC,
    }}

    out["normalize"] = [{"s": p, "out": norm_en(p)} for p, _ in EN_HAND]
    en = list(EN_HAND) + [(rand_sentence(0, 8), rand_sentence(1, 6)) for _ in range(20)]
    for _ in range(60):
        p = rand_sentence(1, 8)
        en.append((p, mutate(p)) if rng.random() < 0.5 else (mutate(p), p))
    out["qa_f1"] = [{"pred": p, "gt": g, "score": qa_f1(p, g)} for p, g in en]

    rg = list(ROUGE_HAND) + [(rand_sentence(0, 25), rand_sentence(1, 25)) for _ in range(20)]
    for _ in range(60):
        p = rand_sentence(1, 30)
        rg.append((p, mutate(p)) if rng.random() < 0.5 else (mutate(p), p))
    out["rouge"] = [{"pred": p, "gt": g, "score": rouge_l(p, g)} for p, g in rg]

    # rouge's recursive traceback (one frame per step) against Python's recursion
    # limit. The strings are rebuilt in Rust from (kind, n): "hyp_long" is
    # ref "w0", hyp "w0 w1 .. w{n-1}"; "ref_long" is ref "w0 w1 .. w{n-1}", hyp "w0".
    # Either way the traceback takes n steps (n + 1 nested calls).
    def long_case(kind, n):
        words = " ".join("w%d" % i for i in range(n))
        return ("w0", words) if kind == "hyp_long" else (words, "w0")

    limit_cases = []
    max_ok = None
    for kind in ["hyp_long", "ref_long"]:
        ok = [n for n in range(900, 1100) if rouge_l(*long_case(kind, n)) > 0.0]
        # The first failing length must be the end of one unbroken run of successes.
        assert ok == list(range(900, ok[-1] + 1)), kind
        if max_ok is None:
            max_ok = ok[-1]
        assert max_ok == ok[-1]
        for n in [max_ok - 1, max_ok, max_ok + 1, max_ok + 50]:
            p, g = long_case(kind, n)
            limit_cases.append({"kind": kind, "n": n, "score": rouge_l(p, g)})
    out["rouge_long"] = {"max_traceback_steps": max_ok, "cases": limit_cases}

    cls = list(CLASS_HAND)
    for _ in range(30):
        picked = [rng.choice(CLASSES) for _ in range(rng.randint(0, 3))]
        cls.append((rng.choice([" or ", ", ", "\n", ""]).join(picked), rng.choice(CLASSES), CLASSES))
    out["classification"] = [{"pred": p, "gt": g, "all_classes": c,
                              "score": classification_metric(p, g, c)} for p, g, c in cls]
    out["retrieval"] = [{"pred": p, "gt": g, "score": retrieval_metric(p, g, "Paragraph ")}
                        for p, g in RETRIEVAL_HAND]
    out["retrieval_zh"] = [{"pred": p, "gt": g, "score": retrieval_metric(p, g, "段落")}
                           for p, g in RETRIEVAL_ZH_HAND]
    out["count"] = [{"pred": p, "gt": g, "score": count_metric(p, g)} for p, g in COUNT_HAND]

    fz = list(FUZZ_HAND)
    for _ in range(150):
        alpha = rng.choice(["ab", "abc", "abcd ", "xyz()=. ", "日本語ab"])
        fz.append((rand_code(0, 20, alpha), rand_code(0, 20, alpha)))
    for _ in range(6):
        fz.append((rand_code(150, 260, "abcde "), rand_code(190, 260, "abcde ")))
    out["fuzz_ratio"] = [{"s1": a, "s2": b, "levenshtein": fuzz_lev.ratio(a, b),
                          "difflib": fuzz_dl.ratio(a, b)} for a, b in fz]

    codes = list(CODE_HAND)
    for _ in range(30):
        lines = [rng.choice(["# c", "// c", "```", "", "x = 1", "y(z)", "ret a"]) +
                 rand_code(0, 6, "ab #/`") for _ in range(rng.randint(0, 4))]
        codes.append(("\n" * rng.randint(0, 2) + "\n".join(lines), rand_code(0, 10, "xy=1 ab")))
    out["code_sim"] = [{"pred": p, "gt": g, "levenshtein": code_sim(p, g, fuzz_lev),
                        "difflib": code_sim(p, g, fuzz_dl)} for p, g in codes]

    # Whole predictions through eval.py's per-sample rule (first-line cut, max over
    # answers, all_classes), one dataset of each metric that Rust implements.
    preds = []
    sp = [
        ("triviaqa", "Paris\nQuestion: what else", ["paris", "Paris, France"], []),
        ("triviaqa", "\n\nthe Paris", ["Paris"], []),
        ("hotpotqa", "Paris\nmore", ["paris"], []),
        ("narrativeqa", "anything", [], []),
        ("qasper", "yes", ["no", "Yes", "unanswerable"], []),
        ("samsum", "Tom will come.\nDialogue: ...", ["Tom is coming."], []),
        ("gov_report", "The report says costs rose.", ["Costs rose, the report says.", "x"], []),
        ("trec", "Location\nNext", ["Location"], CLASSES),
        ("trec", "Other location", ["Location"], CLASSES),
        ("lsht", "体育\n财经", ["体育"], ["体育", "财经"]),
        ("passage_retrieval_en", "Paragraph 4", ["Paragraph 4"], []),
        ("passage_retrieval_zh", "段落4", ["段落4"], []),
        ("passage_count", "5", ["5"], []),
        ("lcc", "# x\nfoo()", ["foo()"], []),
        ("repobench-p", "bar(1)\n", ["bar(2)", "bar(1)"], []),
        ("multi_news", "", ["summary"], []),
    ]
    for d, p, a, c in sp:
        preds.append({"dataset": d, "pred": p, "answers": a, "all_classes": c,
                      "score": score_one(d, p, a, c)})
    out["score_prediction"] = preds

    # Per-dataset aggregates of eval.py (scorer) and LongBench-E (scorer_e).
    agg = []
    for d in ["hotpotqa", "triviaqa", "gov_report", "lcc", "passage_count", "trec"]:
        n = {"hotpotqa": 37, "triviaqa": 9, "gov_report": 12, "lcc": 20,
             "passage_count": 150, "trec": 20}[d]
        samples = []
        for _ in range(n):
            if d in ("hotpotqa", "triviaqa", "gov_report"):
                p = rand_sentence(0, 8)
                a = [mutate(p) if rng.random() < 0.6 else rand_sentence(1, 5)
                     for _ in range(rng.randint(0, 2))]
            elif d == "lcc":
                p, a = rand_code(0, 12, "ab =\n#"), [rand_code(1, 12, "ab =")]
            elif d == "passage_count":
                p, a = " ".join(str(rng.randint(1, 4)) for _ in range(rng.randint(0, 3))), [str(rng.randint(1, 4))]
            else:
                c = rng.choice(CLASSES)
                p = c + rng.choice(["", "\n", " and Food", "\nOther location"])
                a = [c if rng.random() < 0.6 else rng.choice(CLASSES)]
            samples.append({"pred": p, "answers": a, "length": rng.choice([0, 3999, 4000, 7999, 8000, 20000, rng.randint(0, 12000)])})
        classes = CLASSES if d == "trec" else []
        scores = [score_one(d, s["pred"], s["answers"], classes) for s in samples]
        buckets = {"0-4k": [], "4-8k": [], "8k+": []}
        for s, v in zip(samples, scores):
            buckets[bucket_of(s["length"])].append(v)
        agg.append({"dataset": d, "all_classes": classes, "samples": samples,
                    "score": mean_sequential(scores),
                    "score_e": {k: mean_numpy(v) for k, v in buckets.items()}})
    out["aggregate"] = agg

    # Summation order alone: eval.py's running sum vs numpy's pairwise mean.
    means = []
    for n in [1, 3, 7, 8, 9, 16, 31, 128, 129, 300]:
        xs = [rng.choice([0.0, 1.0, 0.5, 1 / 3, 2 / 3, 0.1, 0.7, rng.random()]) for _ in range(n)]
        total = 0.0
        for x in xs:
            total += x
        means.append({"scores": xs, "scorer": mean_sequential(xs), "scorer_e": mean_numpy(xs),
                      "scorer_raw": 100 * total / len(xs),
                      "np_mean": float(np.mean(np.array(xs, dtype=np.float64)))})
    out["means"] = means

    out["round2"] = [{"x": x, "out": round(x, 2)} for x in ROUND2]
    out["truncate"] = TRUNC

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes; rouge max_traceback_steps", max_ok)


if __name__ == "__main__":
    main()
