#!/usr/bin/env python3
"""Independent float64 numpy reference for three training-free context-extension
methods on Mamba-1, and the small JSON fixtures that decimamba's Rust tests compare
against.

Run from the repository root (CPU only, a few seconds, no network, no torch):

    pip install -r scripts/requirements-methods.txt
    python3 scripts/method_reference.py

Every run is deterministic (fixed seeds, fixed seed search order) and rewrites the
same files.

What it reads
=============
tests/fixtures/models/tiny-rms-hf/{config.json,model.safetensors}  (transformers
MambaForCausalLM layout; tied lm_head = backbone.embeddings.weight)

What it writes (tests/fixtures/reference/methods/)
==================================================
mambaextend_layer.json     MambaExtend, one delta scale per layer, 48 tokens
mambaextend_channel.json   MambaExtend, one delta scale per (layer, channel), 48 tokens
modulation.json            Mamba Modulation (A_log scaled per layer), 48 tokens
longmamba_calibration.json LongMamba calibration on 3 windows of 40 tokens:
                           the resulting policy and the global channels per layer
longmamba_inference.json   that policy on 100 tokens (nearest calibrated length 128),
                           with the number of zeroed (t, c) entries per layer
longmamba_short.json       that policy on 50 tokens (< activate_from: vanilla logits)

Inference case files: {"model", "input_ids": [[row]], "policy", "logits": [[V] per
position], "nll": [per position t < len-1: -log softmax(logits[t])[ids[t+1]]]}.
Logits / nll are rounded to 6 decimals; scales, decays and thresholds to 7
significant digits. The policy objects are written with exactly the keys that the
Rust tool reads via `--policy FILE`, and every inference case is computed with the
policy AS SERIALISED (i.e. after rounding), so the Rust side sees the same numbers.

Forward (per layer l, residual stream r kept in float64 here, fp32 in the model):
    h = RMSNorm(r) * w  (eps from config);  x, z = split(h W_in^T)
    x_c = SiLU(causal depthwise conv1d(x, kernel 4, zero left pad) + conv bias)
    dt, B, C = split(x_c W_xproj^T, [dt_rank, d_state, d_state])
    Delta = softplus(dt W_dtproj^T + dt_bias)          [L, d_inner]
    A = -exp(A_log)                                    [d_inner, d_state]
    h_t[c,n] = exp(Delta_tc A_cn) h_{t-1}[c,n] + Delta_tc B_tn x_c[t,c]
    y_t = (C_t . h_t + D x_c[t]) * SiLU(z_t);  r = r + y W_out^T
    logits = RMSNorm_f(r) E^T

Methods (act on the full prefill only)
--------------------------------------
1. MambaExtend (Azizi et al.; github.com/ArminAzizi98/LongContextMamba,
   perplexity_eval/modeling/mamba_module.py): Delta' = s_l * softplus(dt_proj(dt)+b),
   s_l a scalar per layer or a vector per channel; the scan uses Delta'.
   Policy: {"method": "mambaextend", "delta_scale": [s_0..] | [[64] per layer]}
2. Mamba Modulation (github.com/gnepul-ace/mamba_modulation):
   A_l = -exp(s_l * A_log_l); Delta unchanged.
   Policy: {"method": "modulation", "a_log_scale": [s_0..]}
3. LongMamba (Ye et al.; github.com/GATECH-EIC/LongMamba, load_align_target.py for
   the calibration and mamba_ssm/modules/mamba2.py for the forward), adapted to
   Mamba-1 channels.
   Calibration, per window of length L (vanilla forward), layer, channel c:
     k = max(1, int(L * clamp_fraction));  Dt_c = min(Delta_c,t, k-th largest Delta_c)
     S_c = sum_t Dt_c;  decay_c = exp(max_n A_cn * S_c)
     for each target length Lt: sort Dt_c descending, resample to Lt points like
     torch F.interpolate(mode='linear', align_corners=False)
       (src_i = max((i+0.5) L/Lt - 0.5, 0); i0 = floor(src_i); i1 = min(i0+1, L-1);
        lam = src_i - i0; v_i = (1-lam) x[i0] + lam x[i1]),
     cs = cumsum(v); top_k = argmax(cs > S_c) + 1 (first True; 0 if none, so 1);
     theta_c(Lt) = v[min(top_k, Lt-1)].
   Aggregate over windows by element-wise max (decay and every threshold).
   Channel c is global iff decay_c > global_threshold.
   Inference on length L_in >= activate_from: Lt = calibrated length nearest to L_in
   (ties -> the smaller); in global channels Delta_tc <- 0 where Delta_tc <= theta_c(Lt)
   (in every layer, on that layer's own Delta); local channels untouched.
   Below activate_from nothing changes.
   Policy: {"method": "longmamba", "train_len", "activate_from", "global_threshold",
            "clamp_fraction", "n_layer", "d_inner", "lengths": [ascending],
            "layers": [{"decay": [d_inner], "thresholds": [[d_inner] per Lt]}]}
   (Differences from the official code, as specified for decimamba: aggregation over
   windows is a max, not a mean; the decay is exp(max_n A * S) per Mamba-1 channel.)

Robustness: the Rust side runs in float32, so inputs are chosen (seed search) such
that no discrete decision sits on a knife edge: every inference threshold comparison
has |Delta - theta| / theta >= 1e-4, every calibration cumsum-vs-S comparison has
|cs - S| / S >= 1e-6, every decay-vs-global_threshold comparison is >= 1e-4 relative.

Self-checks (asserted): vanilla forward vs transformers logits
(tests/fixtures/reference/tiny-rms.logits.json) and vs the DeciMamba fixtures in
tests/fixtures/reference/decimation/ (same forward plus token decimation);
modulation with all scales 1 and MambaExtend with all scales 1 equal vanilla;
LongMamba below activate_from equals vanilla.

This file is an independent implementation written from the method descriptions; no
code was copied from the repositories cited above.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests" / "fixtures" / "models" / "tiny-rms-hf"
REF = ROOT / "tests" / "fixtures" / "reference"
OUT = REF / "methods"

VOCAB_LO, VOCAB_HI = 1, 90  # token ids drawn uniformly from [1, 90)
SELF_CHECK_TOL = 1e-5
INFER_MARGIN = 1e-4  # |Delta - theta| / theta at LongMamba inference
CUMSUM_MARGIN = 1e-6  # |cs - S| / S in LongMamba calibration
DECAY_MARGIN = 1e-4  # |decay - global_threshold| / global_threshold
MAX_TOTAL_BYTES = 300_000


# ---------------------------------------------------------------------------
# Rounding / JSON
# ---------------------------------------------------------------------------


def r6(x):
    """Nested array/list -> Python floats rounded to 6 decimals (no -0.0)."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [r6(v) for v in x]
    v = round(float(x), 6)
    return 0.0 if v == 0 else v


def g7(x):
    """Nested array/list -> Python floats rounded to 7 significant digits."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [g7(v) for v in x]
    v = float(f"{float(x):.7g}")
    return 0.0 if v == 0 else v


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def roundtrip(obj):
    """What a reader of the JSON file gets back."""
    return json.loads(json.dumps(obj))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class KnifeEdge(Exception):
    pass


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


class Mamba1:
    def __init__(self, model_dir):
        cfg = json.loads((model_dir / "config.json").read_text())
        self.p = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.n_layer = cfg["num_hidden_layers"]
        self.d_model = cfg["hidden_size"]
        self.d_inner = cfg["intermediate_size"]
        self.d_state = cfg["state_size"]
        self.d_conv = cfg["conv_kernel"]
        tsr = cfg["time_step_rank"]
        self.dt_rank = math.ceil(self.d_model / 16) if tsr == "auto" else tsr
        self.eps = cfg["layer_norm_epsilon"]
        self.vocab = cfg["vocab_size"]
        assert cfg["tie_word_embeddings"] and not cfg["use_bias"] and cfg["use_conv_bias"]
        assert self.p["backbone.embeddings.weight"].shape == (self.vocab, self.d_model)

    def _rms(self, x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.p[name]

    def mixer_inputs(self, r, i):
        """Up to Delta for layer i: returns x_c, z, Delta, B, C (all [L, .])."""
        pre = f"backbone.layers.{i}.mixer."
        h = self._rms(r, f"backbone.layers.{i}.norm.weight")
        xz = h @ self.p[pre + "in_proj.weight"].T
        x, z = xz[:, : self.d_inner], xz[:, self.d_inner :]
        L = x.shape[0]
        w = self.p[pre + "conv1d.weight"][:, 0, :]  # [d_inner, d_conv]
        xp = np.vstack([np.zeros((self.d_conv - 1, self.d_inner)), x])
        conv = np.zeros_like(x)
        for k in range(self.d_conv):
            conv += xp[k : k + L] * w[:, k]
        xc = silu(conv + self.p[pre + "conv1d.bias"])
        dbc = xc @ self.p[pre + "x_proj.weight"].T
        dt = dbc[:, : self.dt_rank]
        B = dbc[:, self.dt_rank : self.dt_rank + self.d_state]
        C = dbc[:, self.dt_rank + self.d_state :]
        delta = softplus(dt @ self.p[pre + "dt_proj.weight"].T + self.p[pre + "dt_proj.bias"])
        return xc, z, delta, B, C

    def A(self, i, a_log_scale=1.0):
        return -np.exp(a_log_scale * self.p[f"backbone.layers.{i}.mixer.A_log"])

    def mixer_out(self, i, xc, z, delta, B, C, A):
        pre = f"backbone.layers.{i}.mixer."
        hs = np.zeros((self.d_inner, self.d_state))
        ys = np.empty_like(xc)
        for t in range(xc.shape[0]):
            hs = np.exp(delta[t][:, None] * A) * hs + (delta[t] * xc[t])[:, None] * B[t][None, :]
            ys[t] = hs @ C[t]
        y = (ys + xc * self.p[pre + "D"]) * silu(z)
        return y @ self.p[pre + "out_proj.weight"].T

    def forward(self, ids, hook=None):
        """ids: list[int]. hook(i, delta, r) -> (delta', A, keep_idx or None).

        Returns logits [L_out, V] (float64)."""
        r = self.p["backbone.embeddings.weight"][np.asarray(ids)]
        for i in range(self.n_layer):
            xc, z, delta, B, C = self.mixer_inputs(r, i)
            A = self.A(i)
            if hook is not None:
                delta, A, keep = hook(i, delta)
                if keep is not None:
                    xc, z, delta, B, C, r = xc[keep], z[keep], delta[keep], B[keep], C[keep], r[keep]
            r = r + self.mixer_out(i, xc, z, delta, B, C, A)
        h = self._rms(r, "backbone.norm_f.weight")
        return h @ self.p["backbone.embeddings.weight"].T

    # ---- methods ----

    def vanilla(self, ids):
        return self.forward(ids)

    def mambaextend(self, ids, delta_scale):
        def hook(i, delta):
            s = np.asarray(delta_scale[i], dtype=np.float64)  # scalar or [d_inner]
            return delta * s, self.A(i), None

        return self.forward(ids, hook)

    def modulation(self, ids, a_log_scale):
        return self.forward(ids, lambda i, delta: (delta, self.A(i, a_log_scale[i]), None))

    def longmamba(self, ids, pol, record=None, min_margin=None):
        """record: optional dict filled with per-layer zeroed counts and margins.
        min_margin: raise KnifeEdge as soon as a threshold comparison in a global
        channel has |Delta - theta| / theta < min_margin (fast seed search)."""
        L = len(ids)
        if L < pol["activate_from"]:
            if record is not None:
                record.update(zeroed=[0] * self.n_layer, margins=[], lt=None)
            return self.forward(ids)
        lengths = pol["lengths"]
        j = min(range(len(lengths)), key=lambda q: (abs(lengths[q] - L), lengths[q]))
        zeroed, margins = [], []

        def hook(i, delta):
            lay = pol["layers"][i]
            glob = np.asarray(lay["decay"]) > pol["global_threshold"]
            theta = np.asarray(lay["thresholds"][j])
            mask = (delta <= theta[None, :]) & glob[None, :]
            rel = (np.abs(delta - theta[None, :]) / theta[None, :])[:, glob]
            if min_margin is not None and rel.size and rel.min() < min_margin:
                raise KnifeEdge(i)
            margins.extend(rel.ravel().tolist())
            zeroed.append(int(mask.sum()))
            return np.where(mask, 0.0, delta), self.A(i), None

        out = self.forward(ids, hook)
        if record is not None:
            record.update(zeroed=zeroed, margins=margins, lt=lengths[j])
        return out

    def decimamba(self, ids, layers, beta, L_base, min_len, R):
        """DeciMamba max_p token decimation (only to validate against the existing
        tests/fixtures/reference/decimation fixtures)."""
        kept = []

        def hook(i, delta):
            if i not in layers:
                return delta, self.A(i), None
            s = layers.index(i)
            L = delta.shape[0]
            K = int(max(min(L - R, L_base * beta**s), min_len))
            if L - R <= K:
                idx = list(range(L))
            else:
                score = np.linalg.norm(delta, axis=1)
                order = sorted(range(L - R), key=lambda t: (-score[t], t))
                idx = sorted(order[:K]) + list(range(L - R, L))
            kept.append({"layer": i, "len_in": L, "indices": idx})
            return delta, self.A(i), np.asarray(idx)

        return self.forward(ids, hook), kept


# ---------------------------------------------------------------------------
# LongMamba calibration
# ---------------------------------------------------------------------------


def interp_linear(x, n_out):
    """torch F.interpolate(mode='linear', align_corners=False) along the last axis."""
    n_in = x.shape[-1]
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return (1.0 - lam) * x[..., i0] + lam * x[..., i1]


def calibrate_window(model, ids, clamp_fraction, lengths):
    """Per layer: decay [d_inner], thresholds [len(lengths), d_inner], min cumsum margin."""
    L = len(ids)
    k = max(1, int(L * clamp_fraction))
    per_layer = []
    min_margin = math.inf
    deltas = []

    def hook(i, delta):
        deltas.append(delta.copy())
        return delta, model.A(i), None

    model.forward(ids, hook)
    for i, delta in enumerate(deltas):
        d = delta.T  # [d_inner, L]
        kth = -np.sort(-d, axis=1)[:, k - 1]
        dcl = np.minimum(d, kth[:, None])
        S = dcl.sum(1)
        decay = np.exp(model.A(i).max(1) * S)
        srt = -np.sort(-dcl, axis=1)
        thr = []
        for Lt in lengths:
            v = interp_linear(srt, Lt)
            cs = np.cumsum(v, axis=1)
            gt = cs > S[:, None]
            top_k = np.argmax(gt, axis=1) + 1
            thr.append(v[np.arange(v.shape[0]), np.minimum(top_k, Lt - 1)])
            min_margin = min(min_margin, float((np.abs(cs - S[:, None]) / S[:, None]).min()))
        per_layer.append({"decay": decay, "thresholds": np.array(thr), "k": k})
    return per_layer, min_margin


def calibrate(model, windows, clamp_fraction, lengths):
    agg = None
    min_margin = math.inf
    for w in windows:
        pl, m = calibrate_window(model, w, clamp_fraction, lengths)
        min_margin = min(min_margin, m)
        if agg is None:
            agg = pl
        else:
            for a, b in zip(agg, pl):
                a["decay"] = np.maximum(a["decay"], b["decay"])
                a["thresholds"] = np.maximum(a["thresholds"], b["thresholds"])
    return agg, min_margin


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def rand_ids(seed, n):
    return np.random.default_rng(seed).integers(VOCAB_LO, VOCAB_HI, size=n).tolist()


def nll(logits, ids):
    lse = np.logaddexp.reduce(logits, axis=1)
    return [float(lse[t] - logits[t, ids[t + 1]]) for t in range(len(ids) - 1)]


def case(ids, policy, logits, **extra):
    out = {
        "model": "tiny-rms-hf",
        "input_ids": [ids],
        "policy": policy,
        "logits": r6(logits),
        "nll": r6(nll(logits, ids)),
    }
    out.update(extra)
    return out


def main():
    m = Mamba1(MODEL_DIR)
    log = []
    checks = {}

    # ---- self-check: vanilla vs transformers ----
    ref = json.loads((REF / "tiny-rms.logits.json").read_text())
    worst = 0.0
    for row, lg in zip(ref["input_ids"], ref["logits"]):
        worst = max(worst, float(np.abs(m.vanilla(row) - np.asarray(lg)).max()))
    assert worst < SELF_CHECK_TOL, worst
    checks["vanilla vs transformers (tiny-rms.logits.json)"] = worst

    # ---- self-check: DeciMamba fixtures (same forward + decimation) ----
    worst = 0.0
    for f in sorted((REF / "decimation").glob("*.json")):
        d = json.loads(f.read_text())
        c = d["config"]
        lg, kept = m.decimamba(
            d["input_ids"][0],
            c["decimating_layers"],
            c["decimation_beta"],
            c["decimation_max_p_L_base"],
            c["decimation_min_seq_len"],
            d["protected_tail"],
        )
        assert kept == d["kept"], f.name
        worst = max(worst, float(np.abs(lg - np.asarray(d["logits"])).max()))
    assert worst < SELF_CHECK_TOL, worst
    checks["decimamba vs decimation/*.json"] = worst

    # ---- self-check: interpolation identity and a hand-computed case ----
    x = np.array([4.0, 3.0, 1.0])
    assert np.allclose(interp_linear(x, 3), x)
    # torch: F.interpolate([4,3,1], size=5, linear, align_corners=False)
    #   src = max((i+0.5)*0.6-0.5, 0) = [0, 0.4, 1.0, 1.6, 2.2]
    assert np.allclose(interp_linear(x, 5), [4.0, 3.6, 3.0, 1.8, 1.0])

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()

    # ---- MambaExtend, per layer ----
    seed = 7101
    ids = rand_ids(seed, 48)
    van = m.vanilla(ids)
    pol = roundtrip({"method": "mambaextend", "delta_scale": g7([0.5, 1.7, 0.8, 1.25])})
    lg = m.mambaextend(ids, pol["delta_scale"])
    write_json(OUT / "mambaextend_layer.json", case(ids, pol, lg))
    log.append(f"mambaextend_layer: ids seed {seed}; max|logits - vanilla| = {np.abs(lg - van).max():.3g}")
    d1 = float(np.abs(m.mambaextend(ids, [1.0] * m.n_layer) - van).max())
    d2 = float(np.abs(m.mambaextend(ids, [[1.0] * m.d_inner] * m.n_layer) - van).max())
    d3 = float(np.abs(m.modulation(ids, [1.0] * m.n_layer) - van).max())
    assert max(d1, d2, d3) < 1e-12, (d1, d2, d3)
    checks["mambaextend per-layer scales 1.0 vs vanilla"] = d1
    checks["mambaextend per-channel scales 1.0 vs vanilla"] = d2
    checks["modulation scales 1.0 vs vanilla"] = d3

    # ---- MambaExtend, per channel ----
    seed = 7102
    ids = rand_ids(seed, 48)
    scale_seed = 7202
    scales = np.random.default_rng(scale_seed).uniform(0.3, 2.0, size=(m.n_layer, m.d_inner))
    pol = roundtrip({"method": "mambaextend", "delta_scale": g7(scales)})
    lg = m.mambaextend(ids, pol["delta_scale"])
    write_json(OUT / "mambaextend_channel.json", case(ids, pol, lg))
    log.append(
        f"mambaextend_channel: ids seed {seed}, scale seed {scale_seed}; "
        f"max|logits - vanilla| = {np.abs(lg - m.vanilla(ids)).max():.3g}"
    )

    # ---- Modulation ----
    seed = 7103
    ids = rand_ids(seed, 48)
    pol = roundtrip({"method": "modulation", "a_log_scale": g7([0.6, 0.95, 0.3, 1.0])})
    lg = m.modulation(ids, pol["a_log_scale"])
    write_json(OUT / "modulation.json", case(ids, pol, lg))
    log.append(f"modulation: ids seed {seed}; max|logits - vanilla| = {np.abs(lg - m.vanilla(ids)).max():.3g}")

    # ---- LongMamba calibration ----
    train_len, clamp_fraction, global_threshold = 40, 0.15, 0.05
    lengths, activate_from = [64, 128], 60
    for cal_seed in range(8000, 8200):
        windows = [rand_ids(cal_seed * 10 + w, train_len) for w in range(3)]
        agg, cs_margin = calibrate(m, windows, clamp_fraction, lengths)
        if cs_margin < CUMSUM_MARGIN:
            continue
        policy = roundtrip(
            {
                "method": "longmamba",
                "train_len": train_len,
                "activate_from": activate_from,
                "global_threshold": global_threshold,
                "clamp_fraction": clamp_fraction,
                "n_layer": m.n_layer,
                "d_inner": m.d_inner,
                "lengths": lengths,
                "layers": [{"decay": g7(a["decay"]), "thresholds": g7(a["thresholds"])} for a in agg],
            }
        )
        decays = np.array([lay["decay"] for lay in policy["layers"]])
        dec_margin = float((np.abs(decays - global_threshold) / global_threshold).min())
        n_glob = (decays > global_threshold).sum(1)
        if dec_margin < DECAY_MARGIN or n_glob.min() == 0 or n_glob.max() == m.d_inner:
            continue
        break
    else:
        raise RuntimeError("no well-separated calibration windows")
    glob_idx = [np.nonzero(decays[i] > global_threshold)[0].tolist() for i in range(m.n_layer)]
    write_json(
        OUT / "longmamba_calibration.json",
        {
            "model": "tiny-rms-hf",
            "windows": windows,
            "train_len": train_len,
            "clamp_fraction": clamp_fraction,
            "global_threshold": global_threshold,
            "lengths": lengths,
            "policy": policy,
            "global_channels": glob_idx,
        },
    )
    counts = [(len(g), m.d_inner - len(g)) for g in glob_idx]
    log.append(
        f"longmamba_calibration: windows seeds {[cal_seed * 10 + w for w in range(3)]} "
        f"(calibration seed {cal_seed}); clamp k = {agg[0]['k']}; "
        f"min cumsum margin {cs_margin:.3g}; min decay margin {dec_margin:.3g}; "
        f"(global, local) per layer {counts}"
    )

    # ---- LongMamba inference (100 tokens -> Lt 128) ----
    # ~24k comparisons per input at a 1e-4 relative margin: only about one input in
    # 10^4 qualifies, so the search rejects early (first offending layer) and scans
    # up to 10^6 consecutive seeds (about 20 s for the first hit).
    for inf_seed in range(8300, 1_008_300):
        ids = rand_ids(inf_seed, 100)
        rec = {}
        try:
            lg = m.longmamba(ids, policy, rec, min_margin=INFER_MARGIN)
        except KnifeEdge:
            continue
        if min(rec["margins"]) >= INFER_MARGIN and min(rec["zeroed"]) > 0:
            break
    else:
        raise RuntimeError("no well-separated inference input")
    assert rec["lt"] == 128
    van = m.vanilla(ids)
    write_json(OUT / "longmamba_inference.json", case(ids, policy, lg, zeroed=rec["zeroed"]))
    tot = [len(g) * len(ids) for g in glob_idx]
    log.append(
        f"longmamba_inference: ids seed {inf_seed}; Lt {rec['lt']}; zeroed per layer {rec['zeroed']} "
        f"of global entries {tot}; min rel threshold margin {min(rec['margins']):.3g}; "
        f"max|logits - vanilla| = {np.abs(lg - van).max():.3g}"
    )

    # ---- LongMamba below activate_from ----
    seed = 8600
    ids = rand_ids(seed, 50)
    rec = {}
    lg = m.longmamba(ids, policy, rec)
    d4 = float(np.abs(lg - m.vanilla(ids)).max())
    assert d4 == 0.0 and rec["zeroed"] == [0] * m.n_layer, d4
    checks["longmamba below activate_from vs vanilla"] = d4
    write_json(OUT / "longmamba_short.json", case(ids, policy, lg))
    log.append(f"longmamba_short: ids seed {seed} (50 < activate_from {activate_from})")

    # ---- summary ----
    print("\n".join(log))
    print()
    for k, v in checks.items():
        print(f"self-check {k}: max|diff| = {v:.3g}")
    print()
    total = 0
    for f in sorted(OUT.glob("*.json")):
        sz = f.stat().st_size
        total += sz
        print(f"{sz:8d}  {f.relative_to(ROOT)}")
    print(f"total: {total} bytes (limit {MAX_TOTAL_BYTES})")
    assert total <= MAX_TOTAL_BYTES, total
    return 0


if __name__ == "__main__":
    sys.exit(main())
