#!/usr/bin/env python3
"""Reference throughput of Hugging Face transformers' MambaForCausalLM (PyTorch), measured
the way `decimamba bench` measures itself, and written in the same JSON layout.

Random weights of a public Mamba shape, batch 1, last-token logits, median of --repeats per
length (as `decimamba bench`); decode = greedy one-token steps with the model's cache after a 128-token prompt.
On a machine without mamba_ssm/causal_conv1d transformers uses its pure-PyTorch path.

    python3 scripts/bench_hf.py --shape 130m --lengths 512,2048 --decode 64 --threads 2 --json hf.json
"""
import argparse
import json
import statistics
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def parse_lengths(spec):
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="130m", choices=sorted(SHAPES))
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d, n = SHAPES[a.shape]
    cfg = MambaConfig(vocab_size=50280, hidden_size=d, num_hidden_layers=n, state_size=16, expand=2, conv_kernel=4)
    torch.manual_seed(0)
    model = MambaForCausalLM(cfg).to(a.device, getattr(torch, a.dtype)).eval()

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    report = {"impl": "transformers", "model": f"random-{a.shape}", "dtype": a.dtype, "device": a.device,
              "threads": torch.get_num_threads(), "prefill": {}}
    with torch.no_grad():
        model(torch.randint(0, 50000, (1, 64), device=a.device), use_cache=False, logits_to_keep=1)
        for length in parse_lengths(a.lengths):
            ids = torch.randint(0, 50000, (1, length), device=a.device)
            runs = []
            for _ in range(max(1, a.repeats)):
                sync()
                t = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                sync()
                runs.append(time.perf_counter() - t)
            med = statistics.median(runs)
            report["prefill"][str(length)] = {"s": med, "tok_per_s": length / med, "runs_s": runs}
            print(f"{length:>8}  {med:>10.3f}  {length / med:>12.1f}", flush=True)
        if a.decode:
            # transformers' own generate() with its Mamba cache, greedy; the decode rate is
            # (N - 1) / (t(N tokens) - t(1 token)), so the prompt's prefill cancels out.
            ids = torch.randint(0, 50000, (1, 128), device=a.device)

            def timed_generate(n):
                sync()
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                sync()
                return time.perf_counter() - t

            timed_generate(2)
            t1 = timed_generate(1)
            tn = timed_generate(a.decode + 1)
            el = tn - t1
            report["decode"] = {"prompt_tokens": 128, "new_tokens": a.decode, "s": el, "tok_per_s": a.decode / el}
            print(f"decode: {a.decode} tokens after a 128-token prompt: {el:.3f} s, {a.decode / el:.1f} tokens/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
