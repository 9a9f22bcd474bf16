#!/usr/bin/env python3
"""Golden RULER prompts from NVIDIA RULER's own generator scripts, for the Rust
port in src/eval/ruler/ (tests compare its output byte for byte).

Setup (once; CPU only, no network after the installs):

    git clone https://github.com/NVIDIA/RULER /tmp/RULER
    python3 -m pip install --user numpy scipy nltk tqdm pyyaml tokenizers wonderwords==2.2.0
    python3 scripts/ruler_reference.py --ruler /tmp/RULER

It writes tests/fixtures/reference/ruler/golden.json (a few minutes on 2 cores;
the same bytes on every run):

    {"generator": "NVIDIA/RULER <commit>", "tokenizer": "<default tokenizer>",
     "seed": 42, "wonderwords": "2.2.0",
     "cases": [{"task": "niah_single_1", "ruler_task": "niah", "length": 1024,
                "tokenizer": "models/passkey-mamba/tokenizer.json",
                "args": {flag: value, ...},   # generator flags but the paths
                "samples": [<each JSONL record RULER wrote, verbatim>]}]}

Cases (DEFAULT_CASES; --tasks/--lengths/--tokenizer narrow or override them):
the byte-level tokenizer of the embedded model at 1024 and 4096 tokens, except
that RULER itself never finishes where even its smallest haystack does not fit
(its retry loop only shrinks the haystack while it is above `incremental`):
niah_multikey_3 runs at 2048 and 4096; vt (whose ICL pass is always 500 tokens)
and cwe (whose few-shot example alone is ~2.5k bytes from 4096 on) run at 1024
and 4096 on GPT-NeoX-20B (assets/gpt-neox-20b-tokenizer.json.gz), and cwe once
more at 8192 on the byte-level tokenizer. Each case records its tokenizer.

How it runs RULER
=================
Exactly as scripts/data/prepare.py does for `--model_template_type base`, chunk 0
of 1: the task's config from scripts/synthetic.yaml updated with
scripts/data/synthetic/constants.py's TASKS entry; template = Templates['base']
(i.e. the task template) + answer_prefix; tokens_to_generate from constants.py;
`--random_seed seed + chunk_idx` (= seed); the yaml args as `--key value`. The
script `scripts/data/synthetic/<task>.py` runs as a subprocess with the same argv
prepare.py's shell command line gives it (the templates hold no character that
the shell's double quotes would change; checked below). Two things are injected:

1. Tokenizer: a shim directory first on PYTHONPATH holds a `tokenizer.py` whose
   select_tokenizer() ignores the type and returns `text_to_tokens(text)` = the
   token list of tokenizers' `Tokenizer.from_file(path).encode(text,
   add_special_tokens=False)` (a .json.gz is read with from_str). RULER appends
   its own scripts/data to sys.path after PYTHONPATH, so the shim wins.
2. Words: wonderwords must be 2.2.0 (checked), the version whose nounlist.txt,
   adjectivelist.txt and verblist.txt the Rust side vendors.

RULER's scripts are run from a temporary copy of its scripts/ folder, so its
checkout is never written to. In a clone made without git-lfs,
scripts/data/synthetic/json/english_words.json is an LFS pointer, which cwe's
json.load cannot read at import; the copy then gets `{}` instead. cwe only
samples from those words when it asks for more words than wonderwords has
(not at these lengths); if it ever did, random.sample would raise and this
script would fail rather than write a wrong fixture.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "models/passkey-mamba/tokenizer.json"
DEFAULT_OUT = REPO / "tests/fixtures/reference/ruler/golden.json"
NEOX_TOKENIZER = REPO / "assets/gpt-neox-20b-tokenizer.json.gz"
TASKS = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"]
# Default cases: task -> [(tokenizer, lengths)]. RULER's sample loops retry forever
# when even its smallest haystack (`incremental` items) exceeds the length, which
# with the byte-level tokenizer happens for niah_multikey_3 at 1024, for vt at any
# length (its ICL pass is fixed at 500 tokens) and for cwe below ~8k (its few-shot
# example alone is ~2.5k bytes at >= 4096). Those run on GPT-NeoX-20B instead.
DEFAULT_CASES = {
    "niah_single_1": [(DEFAULT_TOKENIZER, [1024, 4096])],
    "niah_multikey_2": [(DEFAULT_TOKENIZER, [1024, 4096])],
    "niah_multikey_3": [(DEFAULT_TOKENIZER, [2048, 4096])],
    "vt": [(NEOX_TOKENIZER, [1024, 4096])],
    "cwe": [(NEOX_TOKENIZER, [1024, 4096]), (DEFAULT_TOKENIZER, [8192])],
    "fwe": [(DEFAULT_TOKENIZER, [1024, 4096])],
}
WONDERWORDS = "2.2.0"

SHIM = '''"""select_tokenizer shim for RULER (written by decimamba's scripts/ruler_reference.py)."""
import gzip

from tokenizers import Tokenizer


class _Shim:
    def __init__(self, path):
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                self.tokenizer = Tokenizer.from_str(f.read())
        else:
            self.tokenizer = Tokenizer.from_file(path)

    def text_to_tokens(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).tokens


def select_tokenizer(tokenizer_type, tokenizer_path):
    return _Shim(tokenizer_path)
'''


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel(path):
    """Repository-relative name of a path, where it is inside the repository."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def ruler_commit(ruler, given):
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(ruler), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        sys.exit(f"{ruler} is not a git checkout: pass --ruler-commit")


def task_config(scripts, task):
    """prepare.py's config for `task` with model_template_type base."""
    with open(scripts / "synthetic.yaml") as f:
        custom = yaml.safe_load(f)
    if task not in custom:
        sys.exit(f"{task} is not in RULER's synthetic.yaml")
    base = load_module("ruler_constants", scripts / "data/synthetic/constants.py").TASKS
    templates = load_module("ruler_template", scripts / "data/template.py").Templates
    config = dict(custom[task])
    config.update(base[config["task"]])
    answer_prefix = config.get("answer_prefix", "")
    config["template"] = templates["base"].format(task_template=config["template"]) + answer_prefix
    # prepare.py passes --template "..." through `sh -c`: inside double quotes
    # only these characters would be altered.
    for ch in '"$`\\':
        assert ch not in config["template"], f"template of {task} holds {ch!r}"
    return config


def run_case(python, scripts, shim, tokenizer, save_dir, task, length, num_samples, seed, timeout):
    config = task_config(scripts, task)
    flags = {
        "subset": "validation",
        "tokenizer_type": "hf",
        "max_seq_length": length,
        "tokens_to_generate": config["tokens_to_generate"],
        "num_samples": num_samples,
        "random_seed": seed,  # args.random_seed + chunk_idx, chunk 0
    }
    flags.update(config["args"])
    flags["template"] = config["template"]
    argv = [python, str(scripts / "data/synthetic" / f"{config['task']}.py"),
            "--save_dir", str(save_dir), "--save_name", task,
            "--tokenizer_path", str(tokenizer)]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(shim) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        res = subprocess.run(argv, cwd=save_dir, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        # RULER's sample loop never ends when even `incremental` haystack items
        # exceed max_seq_length (it only shrinks while above `incremental`).
        sys.exit(f"RULER's {config['task']}.py did not finish in {timeout}s for {task} at "
                 f"{length}: probably no haystack fits that length (pick a larger one)")
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        sys.exit(f"RULER's {config['task']}.py failed for {task} at {length}")
    out = save_dir / task / "validation.jsonl"
    with open(out) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    out.unlink()
    assert len(samples) == num_samples, (task, length, len(samples))
    return {"task": task, "ruler_task": config["task"], "length": length,
            "tokenizer": rel(tokenizer), "args": flags, "samples": samples}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ruler", type=Path, required=True, help="a RULER checkout")
    ap.add_argument("--ruler-commit", help="the checkout's commit (default: git rev-parse HEAD)")
    ap.add_argument("--tokenizer", type=Path,
                    help="tokenizer.json (or .json.gz) for every case (default: see DEFAULT_CASES)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", help="comma list of lengths for every task (default: DEFAULT_CASES)")
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--python", default=sys.executable, help="interpreter for RULER's scripts")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per generator run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    ww = importlib.metadata.version("wonderwords")
    if ww != WONDERWORDS:
        sys.exit(f"wonderwords {ww} installed; need {WONDERWORDS} (pip install wonderwords=={WONDERWORDS})")
    scripts_src = args.ruler.resolve() / "scripts"
    if not (scripts_src / "data/synthetic/niah.py").exists():
        sys.exit(f"{args.ruler} does not look like a RULER checkout")
    commit = ruler_commit(args.ruler, args.ruler_commit)
    plan = []  # (task, tokenizer, length)
    for task in args.tasks.split(","):
        if task not in DEFAULT_CASES and not (args.tokenizer and args.lengths):
            sys.exit(f"{task}: no default cases; pass --tokenizer and --lengths")
        groups = DEFAULT_CASES.get(task, [])
        if args.tokenizer:
            groups = [(args.tokenizer, sorted({n for _, ls in groups for n in ls}))]
        if args.lengths:
            groups = [(tok, [int(x) for x in args.lengths.split(",")]) for tok, _ in groups[:1]]
        plan += [(task, tok.resolve(), n) for tok, ls in groups for n in ls]

    cases = []
    with tempfile.TemporaryDirectory(prefix="ruler_ref_") as tmp:
        tmp = Path(tmp)
        scripts = tmp / "scripts"
        shutil.copytree(scripts_src, scripts, ignore=shutil.ignore_patterns("__pycache__"))
        words_json = scripts / "data/synthetic/json/english_words.json"
        if words_json.read_bytes().startswith(b"version https://git-lfs"):
            words_json.write_text("{}")
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "tokenizer.py").write_text(SHIM)
        save_dir = tmp / "out"
        save_dir.mkdir()
        for task, tokenizer, length in plan:
            case = run_case(args.python, scripts, shim, tokenizer, save_dir, task, length,
                            args.num_samples, args.seed, args.timeout)
            print(f"{task} {length} {tokenizer.name}: lengths "
                  f"{[s['length'] for s in case['samples']]}", flush=True)
            cases.append(case)

    doc = {"generator": f"NVIDIA/RULER {commit}",
           "tokenizer": rel(args.tokenizer.resolve() if args.tokenizer else DEFAULT_TOKENIZER),
           "seed": args.seed,
           "wonderwords": ww, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
