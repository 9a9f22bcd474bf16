#!/usr/bin/env python3
"""Policy files that fit a public Mamba shape, for timing each method with `bench --shape`.

    python3 scripts/bench_policies.py 130m OUT_DIR

writes OUT_DIR/{mambaextend,mambaextend-channel,modulation,longmamba}-130m.json. The
values are plausible but not calibrated (random-weight benchmarks have nothing to calibrate
on): what is timed is the plan's work (the Δ scale, A under its scale, the Δ filter), which
does not depend on the values. Stdlib only.
"""

import json
import random
import sys
from pathlib import Path

# (d_model, n_layer) as MambaConfig::of_shape; d_inner = 2 * d_model.
SHAPES = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "790m": (1536, 48),
    "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(SHAPES)}}} OUT_DIR")
    shape, out = sys.argv[1], Path(sys.argv[2])
    d_model, n_layer = SHAPES[shape]
    d_inner = 2 * d_model
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "mambaextend": {"method": "mambaextend", "delta_scale": [round(rng.uniform(0.75, 1.0), 4) for _ in range(n_layer)]},
        "mambaextend-channel": {
            "method": "mambaextend",
            "delta_scale": [[round(rng.uniform(0.5, 1.0), 3) for _ in range(d_inner)] for _ in range(n_layer)],
        },
        "modulation": {"method": "modulation", "a_log_scale": [round(rng.uniform(0.5, 1.0), 4) for _ in range(n_layer)]},
        # Half the channels global; thresholds near a typical Δ so that some entries drop.
        "longmamba": {
            "method": "longmamba",
            "train_len": 2048,
            "activate_from": 3072,
            "global_threshold": 0.05,
            "clamp_fraction": 0.15,
            "n_layer": n_layer,
            "d_inner": d_inner,
            "lengths": [4096, 8192, 32768, 131072],
            "layers": [
                {
                    "decay": [1.0 if c % 2 == 0 else 0.0 for c in range(d_inner)],
                    "thresholds": [[round(rng.uniform(0.005, 0.05), 4) for _ in range(d_inner)] for _ in range(4)],
                }
                for _ in range(n_layer)
            ],
        },
    }
    for name, policy in files.items():
        path = out / f"{name}-{shape}.json"
        path.write_text(json.dumps(policy) + "\n")
        print(path)


if __name__ == "__main__":
    main()
