#!/usr/bin/env python3
"""Reference draws from CPython's `random` and numpy's legacy `RandomState`, for
src/eval/ruler/pyrandom.rs (tests/ruler_random.rs replays every one bit for bit).

Run from the repository root (no network, a second):

    python3 -m pip install --user numpy
    python3 scripts/pyrandom_reference.py

Writes tests/fixtures/reference/ruler/pyrandom.json; every run rewrites the same
bytes for the same Python/numpy versions (the draws themselves do not depend on
the version for CPython >= 3.10 and numpy >= 1.17, the ones RULER runs on).

Format
======
{"python": version, "numpy": version,
 "py": [{"seed": int, "calls": [{"op": name, "args": [...], "out": value}, ...]}],
 "np": [{"seed": int, "calls": [...]}]}

Each entry is one FRESH generator (random.Random(seed), np.random.RandomState(seed),
the same state as random.seed(seed) / np.random.seed(seed)); its calls run in order
on that one generator, so entries that mix ops also check how many words each op
consumes. Ops ("py"):
  getrandbits [k]          out: decimal string (may exceed 64 bits)
  random []                out: float (exact repr, round-trips)
  randbelow [n]            out: int  (random.Random._randbelow)
  randint [a, b]           out: int
  choice [len]             out: int  (choice(range(len)), i.e. the index drawn)
  choices [population, k]  out: str  (''.join(choices(population, k=k)))
  shuffle [n]              out: list (Random.shuffle of list(range(n)))
  sample [n, k]            out: list (sample(range(n), k))
  uuid4 []                 out: str  (str(uuid.UUID(int=getrandbits(128), version=4)))
Ops ("np"):
  randint [low, high]      out: int  (RandomState.randint(low, high), dtype int64)
  random_sample []         out: float
"""
import json
import random
import string
import sys
import uuid
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/reference/ruler/pyrandom.json"

PY_SEEDS = [0, 1, 42, 2**32 + 5, 12345678901234567890]
NP_SEEDS = [0, 42, 123]


def py_call(r, op, args):
    if op == "getrandbits":
        return str(r.getrandbits(args[0]))
    if op == "random":
        return r.random()
    if op == "randbelow":
        return r._randbelow(args[0])
    if op == "randint":
        return r.randint(args[0], args[1])
    if op == "choice":
        return r.choice(range(args[0]))
    if op == "choices":
        return "".join(r.choices(args[0], k=args[1]))
    if op == "shuffle":
        x = list(range(args[0]))
        r.shuffle(x)
        return x
    if op == "sample":
        return r.sample(range(args[0]), args[1])
    if op == "uuid4":
        return str(uuid.UUID(int=r.getrandbits(128), version=4))
    raise ValueError(op)


def np_call(r, op, args):
    if op == "randint":
        return int(r.randint(args[0], args[1]))
    if op == "random_sample":
        return float(r.random_sample())
    raise ValueError(op)


def py_programs():
    """(name, [(op, args)]) run from each seed."""
    progs = []
    progs.append([("getrandbits", [32])] * 40)  # raw genrand_uint32 words
    progs.append([("random", [])] * 20)
    for k in [1, 5, 31, 32, 33, 64, 100, 128]:
        progs.append([("getrandbits", [k])] * 6)
    for n in [1, 2, 3, 7, 8, 16, 100, 2**32, 2**32 + 1, 2**53 + 3, 2**63]:
        progs.append([("randbelow", [n])] * 12)
    progs.append([("randint", [10**6, 10**7 - 1])] * 20)
    progs.append([("randint", [-5, 5])] * 10 + [("randint", [3, 3])] * 3 + [("random", [])])
    progs.append([("choices", [string.ascii_uppercase, 5])] * 10)
    progs.append([("choice", [6786])] * 10 + [("choice", [1])] * 2 + [("random", [])])
    progs.append([("shuffle", [50])])
    progs.append([("shuffle", [1]), ("shuffle", [2]), ("shuffle", [200]), ("random", [])])
    for n, k in [(10, 3), (30, 25), (1000, 5), (1000, 10), (40, 40), (100000, 7),
                 (85, 20), (86, 20), (1000, 300), (100, 0), (0, 0), (5, 5), (200, 6)]:
        progs.append([("sample", [n, k]), ("random", [])])
    progs.append([("uuid4", [])] * 8)
    # RULER-like interleaving: niah needle keys/values, haystack, query, cwe, vt.
    progs.append([("choice", [6786]), ("randint", [10**6, 10**7 - 1]), ("uuid4", []),
                  ("sample", [400, 2]), ("sample", [2, 1]), ("sample", [1, 1]),
                  ("choices", [string.ascii_uppercase, 3]), ("random", []),
                  ("choices", [string.ascii_lowercase, 6]), ("sample", [9000, 20]),
                  ("getrandbits", [7]), ("shuffle", [20]), ("random", [])])
    return progs


def np_programs():
    progs = []
    progs.append([("randint", [10000, 99999])] * 20)
    progs.append([("randint", [0, 2])] * 20)
    progs.append([("randint", [5, 6])] * 5 + [("randint", [10000, 99999])] * 3)
    progs.append([("randint", [0, 2**31])] * 10)
    progs.append([("randint", [-7, 100])] * 10)
    progs.append([("randint", [0, 2**32])] * 6)       # rng == 2**32 - 1: plain word
    progs.append([("randint", [0, 2**40])] * 6)       # 64-bit masked path
    progs.append([("randint", [-(2**62), 2**62])] * 6)
    progs.append([("random_sample", [])] * 10)
    progs.append([("randint", [10000, 99999]), ("random_sample", []),
                  ("randint", [10000, 99999])])
    return progs


def main():
    py = []
    for seed in PY_SEEDS:
        for prog in py_programs():
            r = random.Random(seed)
            py.append({"seed": seed,
                       "calls": [{"op": op, "args": args, "out": py_call(r, op, args)}
                                 for op, args in prog]})
    # random.seed(s) on the module's global instance gives the same state.
    random.seed(42)
    assert random.getrandbits(32) == random.Random(42).getrandbits(32)

    npo = []
    for seed in NP_SEEDS:
        for prog in np_programs():
            r = np.random.RandomState(seed)
            npo.append({"seed": seed,
                        "calls": [{"op": op, "args": args, "out": np_call(r, op, args)}
                                  for op, args in prog]})
    np.random.seed(42)
    assert np.random.randint(10000, 99999) == np.random.RandomState(42).randint(10000, 99999)

    doc = {"python": sys.version.split()[0], "numpy": np.__version__, "py": py, "np": npo}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(py)} py + {len(npo)} np sequences)")


if __name__ == "__main__":
    main()
