#!/usr/bin/env python3
"""Score fixture predictions with RULER's own scoring code and write
tests/fixtures/reference/ruler/scoring.json, which tests/ruler.rs compares with
`decimamba`'s RULER scoring.

    git clone https://github.com/NVIDIA/RULER
    python3 scripts/ruler_scoring_reference.py --ruler RULER

It imports RULER's metric functions (scripts/eval/synthetic/constants.py:
string_match_all, string_match_part) and runs `postprocess_pred` from
scripts/eval/evaluate.py (that function alone, taken from the file's syntax tree,
since the module imports NeMo at load). Nothing of RULER is copied here. Stdlib only.
"""

import argparse
import ast
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/reference/ruler/scoring.json"

# (prediction, references): plain hits and misses, case, partial sets, control characters,
# surrounding whitespace, and a reference split by a control character.
CASES = [
    ("The special magic number is 1234567.", ["1234567"]),
    ("  nothing here  ", ["1234567"]),
    ("APPLE and Pear", ["apple", "pear", "plum"]),
    ("VAR ABCDE VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]),
    ("1. house 2. tree\t3. car", ["house", "tree", "car", "boat"]),
    ("\x01\x02 abc\x1fdef \n", ["abc", "def", "abc\ndef"]),
    ("a\x00b", ["a\nb", "ab"]),
    ("", ["x"]),
    ("Über straße", ["über", "STRASSE", "straße"]),
    ("qxdfyt, kmnwpz and lorubc", ["qxdfyt", "kmnwpz", "lorubc"]),
]


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_postprocess(path):
    tree = ast.parse(Path(path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "postprocess_pred")
    env = {"re": __import__("re")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), env)
    return env["postprocess_pred"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ruler", required=True, type=Path, help="a NVIDIA/RULER checkout")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    metrics = load_module(args.ruler / "scripts/eval/synthetic/constants.py", "ruler_eval_constants")
    post = load_postprocess(args.ruler / "scripts/eval/evaluate.py")
    cases = []
    for pred, refs in CASES:
        p = post(pred, {})
        cases.append({
            "prediction": pred,
            "references": refs,
            "postprocessed": p,
            "string_match_all": metrics.string_match_all([p], [refs]),
            "string_match_part": metrics.string_match_part([p], [refs]),
        })
    preds = [post(p, {}) for p, _ in CASES]
    refs = [r for _, r in CASES]
    doc = {
        "generator": "NVIDIA/RULER scripts/eval (string_match_all, string_match_part, postprocess_pred)",
        "cases": cases,
        "task_string_match_all": metrics.string_match_all(preds, refs),
        "task_string_match_part": metrics.string_match_part(preds, refs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
