#!/usr/bin/env python3
"""Prints decimamba's GPU prefill timings next to the reference implementation's.

Reads every *.json in DIR but scripts/gpu-tune.sh's tune-*.json: our tool's reports (`decimamba bench --json`, e.g.
bench-130m-bf16.json) and scripts/gpu_reference_bench.py's (ref-<shape>-<dtype>.json).
Both have "model" (e.g. "random-130m"), "dtype" ("bf16"; our tool writes "f32" where the
reference writes "fp32": both read as fp32), and "prefill" / "prefill_decimated" maps from
token count (a decimal string) to {"s": median seconds, "tok_per_s", "runs_s", ...}. A file
is taken as the reference when its "implementation" (or "impl") mentions mamba_ssm or its
name starts with "ref-"; anything else with a "prefill" map is ours. Reports are matched by
(shape, dtype) and printed as a markdown table, one row per length and variant: reference
ms, decimamba ms, the speed-up reference/decimamba ("–" where either is missing), and
the tokens kept per decimating layer ("ref / ours" where they differ).

A file whose "implementation" mentions "fused", or whose name starts with "fused-"
(scripts/gpu_fused_bench.py: mamba_ssm's fused MambaLMHeadModel path), is the second peer.
For it two more tables follow: vanilla prefill ms (decimamba, fused, and fused/decimamba, so
above 1 means decimamba is faster), from the same report of ours as the first table; and
decode tokens/s (decimamba's "decode" entry against the fused one's "tokens_per_s", and
decimamba/fused), from that report, or where it has no decode, from the last of ours for
that (shape, dtype) that has one and is not a Candle-backend run. "ours from" names the file.

    python3 scripts/gpu_compare.py DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DTYPE_ALIASES = {"f32": "fp32", "float32": "fp32", "bfloat16": "bf16", "f16": "fp16",
                 "float16": "fp16"}
VARIANTS = (("prefill", "vanilla"), ("prefill_decimated", "decimated"))
DASH = "–"


def norm_dtype(d):
    d = str(d or "?").strip().lower()
    return DTYPE_ALIASES.get(d, d)


def norm_shape(model):
    m = str(model or "?")
    return m[len("random-"):] if m.startswith("random-") else m


def is_reference(path, report):
    impl = str(report.get("implementation") or report.get("impl") or "")
    return "mamba_ssm" in impl or path.name.startswith("ref-")


def is_fused(path, report):
    """fused-*.json, or an implementation naming "fused" (not "non-fused") outside ref-*."""
    if path.name.startswith("fused-"):
        return True
    impl = str(report.get("implementation") or report.get("impl") or "").lower()
    return not path.name.startswith("ref-") and re.search(r"(?<!non-)(?<!non)fused", impl) is not None


def load_all(directory):
    """(ours, ref, fused, ours_all): the first three map (shape, dtype) to the last report
    of that side in file-name order; ours_all maps it to all of ours, as (file name, report)
    in that order."""
    ours, ref, fused, ours_all = {}, {}, {}, {}
    for path in sorted(Path(directory).glob("*.json")):
        # scripts/gpu-tune.sh's knob experiments (tune-*.json) may share the folder on a
        # warm machine; they are not the run being compared.
        if path.name.startswith("tune-"):
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {path.name}: {e}", file=sys.stderr)
            continue
        if not isinstance(report, dict) or not isinstance(report.get("prefill"), dict):
            continue
        key = (norm_shape(report.get("model")), norm_dtype(report.get("dtype")))
        if is_fused(path, report):
            side = fused
        elif is_reference(path, report):
            side = ref
        else:
            side = ours
            ours_all.setdefault(key, []).append((path.name, report))
        if key in side:
            print(f"note: {path.name} replaces an earlier report for {key[0]} {key[1]}",
                  file=sys.stderr)
        side[key] = report
    return ours, ref, fused, ours_all


def load(directory):
    ours, ref, _, _ = load_all(directory)
    return ours, ref


def seconds(report, variant, length):
    entry = ((report or {}).get(variant) or {}).get(length)
    if not isinstance(entry, dict):
        return None
    s = entry.get("s")
    return float(s) if isinstance(s, (int, float)) and s > 0 else None


def kept(report, variant, length):
    entry = ((report or {}).get(variant) or {}).get(length) or {}
    k = entry.get("kept_per_layer") if isinstance(entry, dict) else None
    return k or None


def fmt_kept(ref_kept, our_kept):
    """Tokens leaving each decimating layer: one list when both agree, else "ref / ours"."""
    text = [DASH if not k else ",".join(str(x) for x in k) for k in (ref_kept, our_kept)]
    if ref_kept is None or our_kept is None or text[0] == text[1]:
        return text[0] if ref_kept else text[1]
    return f"{text[0]} / {text[1]}"


def fmt_ms(s):
    return DASH if s is None else f"{s * 1e3:.2f}"


def latest(reports, pick):
    """The last (file name, value) of `pick(report)` that is not None, else (None, None)."""
    for name, report in reversed(reports or []):
        value = pick(report)
        if value is not None:
            return name, value
    return None, None


def decode_tok_per_s(report):
    d = (report or {}).get("decode")
    if not isinstance(d, dict):
        return None
    v = d.get("tokens_per_s", d.get("tok_per_s"))
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def decode_setup(report):
    d = (report or {}).get("decode") or {}
    return f"{d.get('prompt_tokens', '?')}+{d.get('new_tokens', '?')}" if d else DASH


def fused_tables(ours_all, fused):
    """Markdown: vanilla prefill against the fused peer, then decode."""
    keys = sorted(fused)
    pre = []
    for key in keys:
        f, mine = fused[key], ours_all.get(key) or []
        name, o = mine[-1] if mine else (None, None)
        lengths = set(f.get("prefill") or {}) | set((o or {}).get("prefill") or {})
        for length in sorted(lengths, key=lambda x: int(x) if str(x).isdigit() else 0):
            os_, fs = seconds(o, "prefill", length), seconds(f, "prefill", length)
            ratio = f"{fs / os_:.2f}x" if fs and os_ else DASH
            pre.append([key[0], key[1], str(length), fmt_ms(os_), fmt_ms(fs), ratio, name or DASH])
    dec = []
    for key in keys:
        f, mine = fused[key], ours_all.get(key) or []
        cuda = [(n, r) for n, r in mine[:-1]
                if "candle" not in str(r.get("backend") or "").lower()] + mine[-1:]
        name, ot = latest(cuda, decode_tok_per_s)
        ft = decode_tok_per_s(f)
        mine_report = dict(mine).get(name)
        ratio = f"{ot / ft:.2f}x" if ot and ft else DASH
        dec.append([key[0], key[1], DASH if ot is None else f"{ot:.1f}",
                    DASH if ft is None else f"{ft:.1f}", ratio,
                    f"{decode_setup(mine_report)} / {decode_setup(f)}", name or DASH])

    def md(head, rows, left):
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i < left or i == len(head) - 1 else "---:"
                                for i in range(len(head))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    return (md(["model", "dtype", "length", "decimamba ms", "fused ms", "fused/ours", "ours from"],
               pre, 3),
            md(["model", "dtype", "decimamba tok/s", "fused tok/s", "ours/fused",
                "prompt+new (ours / fused)", "ours from"], dec, 2))


def print_fused(ours_all, fused):
    prefill, decode = fused_tables(ours_all, fused)
    print("\ndecimamba vs mamba_ssm fused: prefill (vanilla), fused/ours > 1 means decimamba "
          "is faster\n")
    print(prefill)
    print("\ndecimamba vs mamba_ssm fused: decode tokens/s, ours/fused > 1 means decimamba "
          "is faster\n")
    print(decode)
    for key, report in sorted(fused.items()):
        extra = []
        if report.get("check_rel_err") is not None:
            extra.append(f"self-check rel err {report['check_rel_err']:.1e}")
        if report.get("check_error"):
            extra.append(f"self-check failed: {report['check_error']}")
        d = report.get("decode")
        if isinstance(d, dict) and d.get("decode_steps"):
            extra.append(f"decode: {d['decode_steps']} steps in {d.get('s', 0) * 1e3:.1f} ms "
                         f"(generate N minus generate 1)")
        skipped = report.get("skipped") or []
        if skipped:
            extra.append("skipped: " + ", ".join(
                f"{s.get('length')} {s.get('variant', '')} ({s.get('reason', '?')})" for s in skipped))
        if extra:
            print(f"\nfused {key[0]} {key[1]}: " + "; ".join(extra))
    only = sorted(k for k in fused if k not in ours_all)
    if only:
        print("\nfused without a decimamba report: " + ", ".join(f"{s} {d}" for s, d in only))


def table(ours, ref):
    rows = []
    for key in sorted(set(ours) | set(ref), key=lambda k: (k[0], k[1])):
        o, r = ours.get(key), ref.get(key)
        for variant, label in VARIANTS:
            lengths = set(((o or {}).get(variant) or {})) | set(((r or {}).get(variant) or {}))
            for length in sorted(lengths, key=lambda x: int(x) if str(x).isdigit() else 0):
                rs, os_ = seconds(r, variant, length), seconds(o, variant, length)
                speedup = f"{rs / os_:.2f}x" if rs and os_ else DASH
                rows.append([key[0], key[1], str(length), label, fmt_ms(rs), fmt_ms(os_), speedup,
                             fmt_kept(kept(r, variant, length), kept(o, variant, length))])
    head = ["model", "dtype", "length", "prefill", "reference ms", "decimamba ms",
            "speed-up (ref/ours)", "kept"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    ours, ref, fused, ours_all = load_all(sys.argv[1])
    if not ours and not ref and not fused:
        sys.exit(f"no benchmark JSON found in {sys.argv[1]}")
    print(table(ours, ref))
    for key, report in sorted(ref.items()):
        skipped = report.get("skipped") or []
        extra = []
        if report.get("check_rel_err") is not None:
            extra.append(f"self-check rel err {report['check_rel_err']:.1e}")
        if skipped:
            extra.append("skipped: " + ", ".join(
                f"{s.get('length')} {s.get('variant', '')} ({s.get('reason', '?')})" for s in skipped))
        if extra:
            print(f"\nreference {key[0]} {key[1]}: " + "; ".join(extra))
    only = [k for k in ours if k not in ref] + [k for k in ref if k not in ours]
    if only:
        print("\nunmatched (one side only): " + ", ".join(f"{s} {d}" for s, d in sorted(set(only))))
    if fused:
        print_fused(ours_all, fused)


if __name__ == "__main__":
    main()
