#!/usr/bin/env python3
"""Train the small Mamba-1 passkey model that ships inside `decimamba`.

A byte-level Mamba-1 LM (transformers' Mamba architecture) is trained from
scratch on synthetic passkey retrieval at a short training length (1024
tokens), then fine-tuned so that its Δt norms single out the needle (what
DeciMamba's token selection relies on) while a decay-floor regulariser gives
every layer a memory horizon of about the training length. The script then measures vanilla
Mamba against DeciMamba from 1x to 64x the training length and exports the
model in transformers' format (f16 safetensors + config.json).

Subcommands
  prepare   write haystack.txt, passkey_template.json and tokenizer.json into
            models/passkey-mamba/ (CPU, deterministic) and check the tokenizer
  selftest  check the Triton selective scan (forward and backward) against a
            sequential loop (set TRITON_INTERPRET=1 to run it on a CPU)
  train     base training -> fine-tune variants ("ft_variants", each from the
            base model, each probed) -> selection -> f16 export -> transformers
            parity check -> evaluation grid. Writes OUT/train_log.txt,
            OUT/ckpt/ (resumable state; --ckpt-in resumes from it; saved when
            the wall-clock --deadline in seconds is reached), OUT/variants_*.pt
            and OUT/passkey-mamba/{config.json,model.safetensors,eval_python.json}.
  eval      evaluate an exported model directory (vanilla and DeciMamba)

Everything is written here from the DeciMamba paper (arXiv 2406.14528) and
transformers' Mamba layout; no code is taken from other repositories.
"""

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU boxes without triton
    HAVE_TRITON = False

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "passkey-mamba"
EOS_ID, PAD_ID = 256, 257
PREFIX = ""
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
SUFFIX = "\nWhat is the pass key? The pass key is"
KEY_MIN, KEY_MAX = 10000, 99999
ANSWER_LEN = 7  # " " + 5 digits + EOS

# --------------------------------------------------------------------------
# Filler: ~60 sentence frames with slot vocabularies (no digits, no "pass key")
# --------------------------------------------------------------------------

SLOTS = {
    "name": "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Mia Noah Olive Paul Quinn Rosa Sam Tara Uma Victor Wendy Xavier Yara Zoe Alice Bruno Cora Dylan Elena Frank Gina Hugo Ivy Jonas Lena Marco Nina Oscar".split(),
    "animal": "cat dog fox owl horse rabbit goat sheep duck goose mouse bear deer frog turtle parrot crow swan wolf pony hedgehog squirrel otter badger donkey lamb robin heron beaver moose".split(),
    "animals": "cats dogs foxes owls horses rabbits goats sheep ducks geese mice bears deer frogs turtles parrots crows swans wolves ponies bees ants fish birds".split(),
    "color": "red blue green yellow white black brown grey orange purple pink golden silver dark pale".split(),
    "adj": "quiet loud small large old young happy tired busy calm bright warm cold soft heavy light clean dusty gentle strange lovely simple careful friendly lazy clever shy brave proud sleepy noisy tidy curious patient cheerful humble polite honest quick slow".split(),
    "place": "garden kitchen library market river forest park station harbor bakery school village meadow valley beach bridge field farm castle museum cafe square hill lake orchard barn attic cellar porch shop theater island mountain road church tower mill pond hall yard".split(),
    "object": "lamp book chair table cup basket window door clock blanket kettle hat coat bicycle boat letter candle mirror pillow rope ladder bucket bell map ribbon spoon plate jar box bottle brush scarf boot umbrella wagon drum kite shelf vase".split(),
    "food": "bread soup cheese apples pears honey rice beans cake pie eggs carrots potatoes plums cherries tea milk jam porridge cookies noodles grapes berries nuts oranges".split(),
    "verb_past": "visited painted cleaned found opened closed carried fixed watched noticed moved counted borrowed returned repaired described remembered ignored admired checked".split(),
    "adv": "slowly quickly quietly carefully happily gently loudly calmly eagerly softly patiently proudly politely cheerfully nervously silently warmly boldly lazily neatly".split(),
    "time": [
        "in the morning", "at noon", "in the evening", "at night", "before breakfast", "after lunch",
        "after dinner", "on Monday", "on Tuesday", "on Wednesday", "on Friday", "on Sunday", "last week",
        "yesterday", "today", "at dawn", "at dusk", "every day", "once a week", "in the spring",
        "in the autumn", "during the winter", "all summer", "late at night"],
    "job": "baker farmer teacher painter doctor sailor miller tailor gardener carpenter fisher nurse driver writer singer cook guard pilot potter weaver".split(),
    "weather": "sunny rainy windy cloudy foggy snowy stormy misty chilly mild".split(),
    "feeling": "happy sad tired calm proud glad nervous curious hopeful bored surprised thankful worried excited relaxed".split(),
    "material": "wood stone glass paper wool clay iron cotton leather brick".split(),
    "season": "spring summer autumn winter".split(),
    "topic": [
        "birds", "trees", "stars", "ships", "rivers", "old songs", "the sea", "the weather", "mountains",
        "gardens", "clocks", "bridges", "castles", "maps", "insects", "flowers", "cooking", "music",
        "painting", "history", "the moon", "farming"],
    "game": [
        "chess", "cards", "tag", "catch", "hide and seek", "football", "tennis", "marbles", "checkers",
        "dominoes", "a guessing game"],
    "sound": [
        "a bell", "a whistle", "a song", "a drum", "laughter", "thunder", "a bird", "music",
        "footsteps", "the rain", "a dog barking"],
}

FRAMES = [
    "The {color} {animal} sleeps near the {place}.",
    "{name} walked to the {place} {time}.",
    "It was a {weather} day, so {name} stayed near the {place}.",
    "The {object} on the table is {color}.",
    "{name} likes to eat {food} with {name2}.",
    "Why is the {animal} so {adj}?",
    "What a {adj} {object} that is!",
    "The {job} {verb_past} the {object} {adv}.",
    "In the {season}, the {place} is full of {animals}.",
    "{name} and {name2} played {game} {time}.",
    "The sky over the {place} was {color} {time}.",
    "A {adj} {animal} crossed the road near the {place}.",
    "{name} felt {feeling} when the {object} was {verb_past}.",
    "The old {object} was made of {material}.",
    "Every {season}, the {job} visits the {place}.",
    "{name} read a book about {topic} {time}.",
    "There is a {color} {object} behind the {place}.",
    "The {animals} in the {place} are {adj} {time}.",
    "{name} {verb_past} a {adj} {object} at the {place}.",
    "Have you seen the {color} {object} in the {place}?",
    "The {job} said that the {food} was {adj}.",
    "{name} heard {sound} from the {place}.",
    "It is {weather} again, and the {animals} are hiding.",
    "The {place} smells of fresh {food} {time}.",
    "Nobody knows why the {object} is in the {place}.",
    "{name} asked {name2} to bring some {food}.",
    "The {adj} {job} lives next to the {place}.",
    "A {color} {object} fell off the shelf {time}.",
    "{name} painted the {object} {color} {time}.",
    "The road to the {place} is long and {adj}.",
    "Did {name} remember to close the {object}?",
    "The {animal} and the {animal2} are good friends.",
    "{name} was {feeling} to see the {place} again.",
    "On {weather} days the {place} is very {adj}.",
    "The {job} keeps a {adj} {animal} as a pet.",
    "Look at that {adj} {animal} by the {place}!",
    "{name} wrote a letter to {name2} about {topic}.",
    "The {object} in the {place} belongs to {name}.",
    "Some {animals} were sleeping under the {object}.",
    "The {food} at the {place} tastes {adj}.",
    "{name} and the {job} talked about {topic}.",
    "Every room in the {place} has a {material} {object}.",
    "The wind carried the {color} {object} across the {place}.",
    "{name} {adv} opened the door of the {place}.",
    "A {job} from the {place} sold {food} {time}.",
    "The children made a {object} out of {material}.",
    "How did the {animal} get into the {place}?",
    "The {place} looked {adj} under the {weather} sky.",
    "{name} found a {color} {object} near the {place}.",
    "The {animal} {adv} followed {name} home.",
    "There were many {animals} near the {place} {time}.",
    "{name} keeps the {object} in a {material} box.",
    "It took {name} all day to reach the {place}.",
    "The {job} and the {job2} share a {adj} {object}.",
    "Birds sang {adv} over the {place}.",
    "{name} thinks the {place} is too {adj}.",
    "The {color} door of the {place} was open {time}.",
    "What a {weather} {season} it has been!",
    "{name} cooked {food} for the {job}.",
    "The {adj} {animal} watched the {object} {adv}.",
    "Near the {place} stands an old {material} {object}.",
    "{name} learned about {topic} from the {job}.",
]


def _fill(frame, rng):
    vals = {}
    for slot in re.findall(r"\{(\w+)\}", frame):
        base = slot.rstrip("2")
        choices = SLOTS[base]
        v = rng.choice(choices)
        if slot.endswith("2"):
            while v == vals.get(base):
                v = rng.choice(choices)
        vals[slot] = v
    s = frame.format(**vals)
    return s[0].upper() + s[1:]


def generate_sentences(n, seed):
    """n distinct filler sentences (str, no trailing space), deterministic."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        s = _fill(rng.choice(FRAMES), rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def split_haystack_text(text):
    """The Rust tool's parsing: whitespace runs -> one space; split after . ! ?
    followed by a space; each sentence keeps one trailing space."""
    t = re.sub(r"\s+", " ", text).strip()
    out, start = [], 0
    for i, ch in enumerate(t):
        if ch in ".!?" and i + 1 < len(t) and t[i + 1] == " ":
            out.append(t[start:i + 1] + " ")
            start = i + 2
    if start < len(t):
        out.append(t[start:].strip() + " ")
    return out


class Haystack:
    """Sentences as one cyclic byte pool with sentence start offsets."""

    def __init__(self, sentences):
        enc = [s.encode("utf-8") for s in sentences]
        self.n = len(enc)
        lens = np.array([len(e) for e in enc], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        self.total = int(lens.sum())
        pool = np.frombuffer(b"".join(enc), dtype=np.uint8)
        self.pool2 = np.concatenate([pool, pool])
        self.ext = np.concatenate([self.starts, self.starts + self.total])

    def window(self, start_idx, budget):
        assert budget < self.total, "haystack shorter than the prompt"
        s0 = int(self.starts[start_idx])
        hay = self.pool2[s0:s0 + budget]
        j1 = int(np.searchsorted(self.ext, s0 + budget, side="left"))
        bounds = self.ext[start_idx:j1] - s0
        bounds = np.append(bounds, budget)
        return hay, bounds


def build_prompt(hay, n_tokens, depth, key, start_idx):
    """The tool's prompt of exactly n_tokens byte tokens; returns (ids, needle start)."""
    pre, suf = PREFIX.encode(), SUFFIX.encode()
    needle = NEEDLE.format(key=key).encode()
    budget = n_tokens - len(pre) - len(needle) - len(suf)
    assert budget >= 0
    h, bounds = hay.window(start_idx, budget)
    p = int(bounds[np.argmin(np.abs(bounds - depth * budget))])
    ids = np.concatenate([
        np.frombuffer(pre, np.uint8), h[:p], np.frombuffer(needle, np.uint8), h[p:],
        np.frombuffer(suf, np.uint8)]).astype(np.int64)
    assert len(ids) == n_tokens
    return ids, len(pre) + p


_N0 = NEEDLE.format(key=12345)
KEY1_OFF = _N0.find("12345")
KEY2_OFF = _N0.find("12345", KEY1_OFF + 1)


def make_batch(hay, batch, n_prompt, rng, w_answer=1.0, w_key2=1.0, w_lm=0.1):
    """Training batch: prompt + " {key}" + EOS. Returns ids (B,L), next-token
    targets (B,L), loss weights (B,L), class (B,L: 0 rest, 1 answer, 2 key2,
    3 key1 (unpredictable, no loss), 4 none), needle starts (B,)."""
    L = n_prompt + ANSWER_LEN
    ids = np.empty((batch, L), np.int64)
    cls = np.zeros((batch, L), np.int8)
    ns = np.empty(batch, np.int64)
    for i in range(batch):
        key = int(rng.integers(KEY_MIN, KEY_MAX + 1))
        prompt, n0 = build_prompt(hay, n_prompt, float(rng.random()), key, int(rng.integers(hay.n)))
        ans = np.frombuffer((" %d" % key).encode(), np.uint8).astype(np.int64)
        ids[i, :n_prompt] = prompt
        ids[i, n_prompt:n_prompt + 6] = ans
        ids[i, L - 1] = EOS_ID
        ns[i] = n0
        cls[i, n_prompt - 1:n_prompt + 6] = 1
        cls[i, n0 + KEY1_OFF - 1:n0 + KEY1_OFF + 4] = 3
        cls[i, n0 + KEY2_OFF - 1:n0 + KEY2_OFF + 4] = 2
        cls[i, L - 1] = 4
    tgt = np.full((batch, L), PAD_ID, np.int64)
    tgt[:, :-1] = ids[:, 1:]
    n_rest = (cls == 0).sum(1, keepdims=True)
    w = np.where(cls == 1, w_answer / 7.0, 0.0)
    w = w + np.where(cls == 2, w_key2 / 5.0, 0.0)
    w = w + np.where(cls == 0, w_lm / np.maximum(n_rest, 1), 0.0)
    return ids, tgt, w.astype(np.float32), cls, ns


# --------------------------------------------------------------------------
# Selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t ; y_t = C_t . h_t
# --------------------------------------------------------------------------

def scan_ref(x, dt, A, Bm, Cm, h0=None):
    """Sequential reference. x, dt: (B,L,D); A: (D,N); Bm, Cm: (B,L,N)."""
    Bsz, L, D = x.shape
    h = torch.zeros(Bsz, D, A.shape[1], dtype=x.dtype, device=x.device) if h0 is None else h0
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


if HAVE_TRITON:

    @triton.jit
    def _ssm_fwd_kernel(X, DT, A, BM, CM, H0, Y, HS, HLAST, L,
                        D: tl.constexpr, N: tl.constexpr, BD: tl.constexpr,
                        STORE: tl.constexpr, HAS_H0: tl.constexpr):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BD + tl.arange(0, BD)
        offs_n = tl.arange(0, N)
        dn = offs_d[:, None] * N + offs_n[None, :]
        a = tl.load(A + dn)
        if HAS_H0:
            h = tl.load(H0 + pid_b * D * N + dn)
        else:
            h = tl.zeros((BD, N), dtype=tl.float32)
        xb = X + pid_b * L * D + offs_d
        db = DT + pid_b * L * D + offs_d
        yb = Y + pid_b * L * D + offs_d
        bb = BM + pid_b * L * N + offs_n
        cb = CM + pid_b * L * N + offs_n
        hb = HS + pid_b * L * D * N + dn
        for t in range(L):
            xv = tl.load(xb + t * D)
            dtv = tl.load(db + t * D)
            bv = tl.load(bb + t * N)
            cv = tl.load(cb + t * N)
            h = tl.exp(dtv[:, None] * a) * h + (dtv * xv)[:, None] * bv[None, :]
            tl.store(yb + t * D, tl.sum(h * cv[None, :], axis=1))
            if STORE:
                tl.store(hb + t * (D * N), h)
        tl.store(HLAST + pid_b * D * N + dn, h)

    @triton.jit
    def _ssm_bwd_kernel(X, DT, A, BM, CM, HS, DY, DX, DDT, DA, DBP, DCP, L,
                        D: tl.constexpr, N: tl.constexpr, BD: tl.constexpr):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        nblk = D // BD
        offs_d = pid_d * BD + tl.arange(0, BD)
        offs_n = tl.arange(0, N)
        dn = offs_d[:, None] * N + offs_n[None, :]
        a = tl.load(A + dn)
        dh = tl.zeros((BD, N), dtype=tl.float32)
        da = tl.zeros((BD, N), dtype=tl.float32)
        xb = X + pid_b * L * D + offs_d
        db = DT + pid_b * L * D + offs_d
        dyb = DY + pid_b * L * D + offs_d
        dxb = DX + pid_b * L * D + offs_d
        ddtb = DDT + pid_b * L * D + offs_d
        bb = BM + pid_b * L * N + offs_n
        cb = CM + pid_b * L * N + offs_n
        hb = HS + pid_b * L * D * N + dn
        pb = (pid_b * nblk + pid_d) * L * N + offs_n
        for i in range(L):
            t = L - 1 - i
            xv = tl.load(xb + t * D)
            dtv = tl.load(db + t * D)
            bv = tl.load(bb + t * N)
            cv = tl.load(cb + t * N)
            dy = tl.load(dyb + t * D)
            h = tl.load(hb + t * (D * N))
            hp = tl.load(hb + (t - 1) * (D * N), mask=(dn * 0 + t) > 0, other=0.0)
            tl.store(DCP + pb + t * N, tl.sum(dy[:, None] * h, axis=0))
            dh += dy[:, None] * cv[None, :]
            e = tl.exp(dtv[:, None] * a)
            ddt = tl.sum(dh * (a * e * hp + xv[:, None] * bv[None, :]), axis=1)
            dxv = tl.sum(dh * bv[None, :], axis=1) * dtv
            tl.store(DBP + pb + t * N, tl.sum(dh * (dtv * xv)[:, None], axis=0))
            da += dh * e * hp * dtv[:, None]
            tl.store(ddtb + t * D, ddt)
            tl.store(dxb + t * D, dxv)
            dh = dh * e
        tl.store(DA + pid_b * D * N + dn, da)


SCAN_BD = 16


def _pick_bd(D):
    bd = SCAN_BD
    while D % bd:
        bd //= 2
    return max(bd, 1)


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm):
        x, dt, A, Bm, Cm = (t.float().contiguous() for t in (x, dt, A, Bm, Cm))
        Bsz, L, D = x.shape
        N = A.shape[1]
        bd = _pick_bd(D)
        y = torch.empty_like(x)
        hs = torch.empty(Bsz, L, D, N, device=x.device, dtype=torch.float32)
        hl = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
        _ssm_fwd_kernel[(Bsz, D // bd)](x, dt, A, Bm, Cm, hl, y, hs, hl, L, D=D, N=N, BD=bd,
                                         STORE=True, HAS_H0=False, num_warps=1)
        ctx.save_for_backward(x, dt, A, Bm, Cm, hs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, Bm, Cm, hs = ctx.saved_tensors
        dy = dy.float().contiguous()
        Bsz, L, D = x.shape
        N = A.shape[1]
        bd = _pick_bd(D)
        nblk = D // bd
        dx = torch.empty_like(x)
        ddt = torch.empty_like(x)
        da = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
        dbp = torch.empty(Bsz, nblk, L, N, device=x.device, dtype=torch.float32)
        dcp = torch.empty_like(dbp)
        _ssm_bwd_kernel[(Bsz, nblk)](x, dt, A, Bm, Cm, hs, dy, dx, ddt, da, dbp, dcp, L,
                                     D=D, N=N, BD=bd, num_warps=1)
        return dx, ddt, da.sum(0), dbp.sum(1), dcp.sum(1)


def _use_kernel(x):
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def scan_train(x, dt, A, Bm, Cm):
    if _use_kernel(x):
        return _ScanFn.apply(x, dt, A, Bm, Cm)
    return scan_ref(x.float(), dt.float(), A.float(), Bm.float(), Cm.float())[0]


@torch.no_grad()
def scan_infer(x, dt, A, Bm, Cm, h0=None):
    """Forward only; returns (y, final state)."""
    if _use_kernel(x):
        x, dt, A, Bm, Cm = (t.float().contiguous() for t in (x, dt, A, Bm, Cm))
        Bsz, L, D = x.shape
        N = A.shape[1]
        bd = _pick_bd(D)
        y = torch.empty_like(x)
        hl = torch.empty(Bsz, D, N, device=x.device, dtype=torch.float32)
        h0_ = hl if h0 is None else h0.float().contiguous()
        _ssm_fwd_kernel[(Bsz, D // bd)](x, dt, A, Bm, Cm, h0_, y, y, hl, L, D=D, N=N, BD=bd,
                                         STORE=False, HAS_H0=h0 is not None, num_warps=1)
        return y, hl
    return scan_ref(x.float(), dt.float(), A.float(), Bm.float(), Cm.float(), h0)


def selftest(device):
    torch.manual_seed(0)
    ok = True
    for (Bsz, L, D, N) in [(2, 37, 32, 16), (3, 130, 64, 16)]:
        x = torch.randn(Bsz, L, D, device=device)
        dt = F.softplus(torch.randn(Bsz, L, D, device=device) - 1.0)
        A = -torch.exp(torch.randn(D, N, device=device) * 0.5 + 0.5)
        Bm = torch.randn(Bsz, L, N, device=device)
        Cm = torch.randn(Bsz, L, N, device=device)
        ins = [t.clone().requires_grad_(True) for t in (x, dt, A, Bm, Cm)]
        y_ref, h_ref = scan_ref(*ins)
        g = torch.randn_like(y_ref)
        (y_ref * g).sum().backward()
        ref_grads = [t.grad.clone() for t in ins]
        ins2 = [t.detach().clone().requires_grad_(True) for t in (x, dt, A, Bm, Cm)]
        y = _ScanFn.apply(*ins2)
        (y * g).sum().backward()
        errs = {"y": (y - y_ref).abs().max().item() / (y_ref.abs().max().item() + 1e-9)}
        for name, a_, b_ in zip(["dx", "ddt", "dA", "dB", "dC"], [t.grad for t in ins2], ref_grads):
            errs[name] = (a_ - b_).abs().max().item() / (b_.abs().max().item() + 1e-9)
        y2, h2 = scan_infer(x, dt, A, Bm, Cm)
        errs["y_infer"] = (y2 - y_ref).abs().max().item() / (y_ref.abs().max().item() + 1e-9)
        errs["h_last"] = (h2 - h_ref).abs().max().item() / (h_ref.abs().max().item() + 1e-9)
        # chunked with carried state == whole
        ya, ha = scan_infer(x[:, :20], dt[:, :20], A, Bm[:, :20], Cm[:, :20])
        yb, hb = scan_infer(x[:, 20:], dt[:, 20:], A, Bm[:, 20:], Cm[:, 20:], h0=ha)
        errs["y_carry"] = (torch.cat([ya, yb], 1) - y_ref).abs().max().item() / (y_ref.abs().max().item() + 1e-9)
        worst = max(errs.values())
        print(f"selftest B={Bsz} L={L} D={D} N={N}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
        ok &= worst < 1e-4
    print("selftest", "PASSED" if ok else "FAILED")
    return ok


# --------------------------------------------------------------------------
# Model: transformers' Mamba layout (names match MambaForCausalLM)
# --------------------------------------------------------------------------

class Mixer(nn.Module):
    def __init__(self, c, n_layer):
        super().__init__()
        dm, di, N, R, K = c["d_model"], c["expand"] * c["d_model"], c["d_state"], c["dt_rank"], c["d_conv"]
        self.di, self.N, self.R, self.K = di, N, R, K
        self.in_proj = nn.Linear(dm, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, K, groups=di, padding=K - 1, bias=True)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, dm, bias=False)
        with torch.no_grad():
            std = R ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.out_proj.weight /= math.sqrt(n_layer)


class Block(nn.Module):
    def __init__(self, c, n_layer):
        super().__init__()
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])
        self.mixer = Mixer(c, n_layer)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Backbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = nn.Embedding(c["vocab_size"], c["d_model"])
        nn.init.normal_(self.embeddings.weight, std=0.02)
        self.layers = nn.ModuleList([Block(c, c["n_layer"]) for _ in range(c["n_layer"])])
        self.norm_f = RMSNorm(c["d_model"], c["norm_eps"])


class MambaLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.backbone = Backbone(c)

    # ---- shared pieces -------------------------------------------------
    @staticmethod
    def causal_conv(x, w, b):
        """x (B,L,D); w (D,1,K) as in HF conv1d; out_t = b + sum_k w_k x_{t+k-K+1}."""
        K = w.shape[-1]
        L = x.shape[1]
        xp = F.pad(x, (0, 0, K - 1, 0))
        out = b + xp[:, 0:L] * w[:, 0, 0]
        for k in range(1, K):
            out = out + xp[:, k:k + L] * w[:, 0, k]
        return out

    def _ssm_inputs(self, m, u):
        xz = F.linear(u, m.in_proj.weight)
        x, z = xz.chunk(2, dim=-1)
        xc = F.silu(self.causal_conv(x.float(), m.conv1d.weight.float(), m.conv1d.bias.float()))
        dbc = F.linear(xc, m.x_proj.weight)
        dtr, Bm, Cm = dbc.split([m.R, m.N, m.N], dim=-1)
        dt = F.softplus(F.linear(dtr, m.dt_proj.weight).float() + m.dt_proj.bias.float())
        return x, xc, z, dt, Bm, Cm

    # ---- training forward (parallel scan, optional decimation) ----------
    def forward_train(self, ids, decim=None, want_scores=False):
        """ids (B,L). decim = (layer, K, R, gate): at `layer` keep the top-K
        candidates by ||dt||_2 among positions [0, L-R) plus the last R.
        Returns logits at kept positions (B,L',V), kept positions (B,L'),
        list of per-layer ||dt||_2 scores (B, L_layer) with grad (for the
        sparsity penalty), detached scores if want_scores."""
        bb = self.backbone
        h = bb.embeddings(ids).float()
        Bsz, L = ids.shape
        pos = torch.arange(L, device=ids.device).expand(Bsz, L)
        svals, scores, dts = [], [], []
        for li, blk in enumerate(bb.layers):
            m = blk.mixer
            u = blk.norm(h)
            x, xc, z, dt, Bm, Cm = self._ssm_inputs(m, u)
            s = dt.norm(dim=-1)  # (B, L) DeciMamba score
            svals.append(s)
            dts.append(dt)
            if want_scores:
                scores.append(s.detach())
            gate = None
            if decim is not None and li == decim[0]:
                _, K, R, use_gate = decim
                Lc = h.shape[1]
                if Lc - R > K:
                    top = s[:, :Lc - R].topk(K, dim=1).indices.sort(dim=1).values
                    tail = torch.arange(Lc - R, Lc, device=ids.device).expand(Bsz, R)
                    idx = torch.cat([top, tail], 1)
                    g1 = lambda t: t.gather(1, idx[:, :, None].expand(-1, -1, t.shape[-1]))
                    xc, z, dt, Bm, Cm, h = g1(xc), g1(z), g1(dt), g1(Bm), g1(Cm), g1(h)
                    pos = pos.gather(1, idx)
                    if use_gate:
                        sk = s.gather(1, idx)
                        gate = sk / sk.detach()
            A = -torch.exp(m.A_log.float())
            y = scan_train(xc, dt, A, Bm, Cm)
            y = (y + xc.float() * m.D.float()) * F.silu(z.float())
            out = F.linear(y, m.out_proj.weight).float()
            if gate is not None:
                out = out * gate[:, :, None]
            h = h + out
        hf = bb.norm_f(h)
        logits = F.linear(hf, bb.embeddings.weight)
        self.last_dts = dts  # per layer (B, L_layer, d_inner), kept for the decay-floor penalty
        return logits, pos, svals, scores

    # ---- inference (f32, DeciMamba prefill + recurrent decode) ----------
    @torch.no_grad()
    def prefill(self, ids, preset=None, all_logits=False):
        """ids (B,L). preset: dict with the authors' keys or None (vanilla).
        Protected tail R = 1. Returns (logits (B,V) of the last position or
        (B,L',V), states, kept lengths)."""
        bb = self.backbone
        h = bb.embeddings(ids).float()
        Bsz = ids.shape[0]
        layers = list(preset["decimating_layers"]) if preset else []
        states, kept = [], []
        for li, blk in enumerate(bb.layers):
            m = blk.mixer
            u = blk.norm(h)
            x, xc, z, dt, Bm, Cm = self._ssm_inputs(m, u)
            Kc = m.K
            xs = x.float()[:, -Kc:].transpose(1, 2)
            if xs.shape[-1] < Kc:
                xs = F.pad(xs, (Kc - xs.shape[-1], 0))
            conv_state = xs.contiguous()
            if li in layers:
                si = layers.index(li)
                Lc, R = h.shape[1], 1
                K = int(max(min(Lc - R, preset["decimation_max_p_L_base"] * preset["decimation_beta"] ** si),
                            preset["decimation_min_seq_len"]))
                if Lc - R > K:
                    s = dt.norm(dim=-1)
                    top = s[:, :Lc - R].topk(K, dim=1).indices.sort(dim=1).values
                    tail = torch.arange(Lc - R, Lc, device=ids.device).expand(Bsz, R)
                    idx = torch.cat([top, tail], 1)
                    g1 = lambda t: t.gather(1, idx[:, :, None].expand(-1, -1, t.shape[-1]))
                    xc, z, dt, Bm, Cm, h = g1(xc), g1(z), g1(dt), g1(Bm), g1(Cm), g1(h)
                kept.append(h.shape[1])
            A = -torch.exp(m.A_log.float())
            y, hl = scan_infer(xc, dt, A, Bm, Cm)
            y = (y + xc * m.D.float()) * F.silu(z.float())
            h = h + F.linear(y, m.out_proj.weight.float())
            states.append([conv_state, hl])
        hf = bb.norm_f(h if all_logits else h[:, -1])
        return F.linear(hf, bb.embeddings.weight.float()), states, kept

    @torch.no_grad()
    def step(self, tok, states):
        bb = self.backbone
        h = bb.embeddings(tok).float()  # (B, dm)
        for li, blk in enumerate(bb.layers):
            m = blk.mixer
            u = blk.norm(h)
            xz = F.linear(u, m.in_proj.weight.float())
            x, z = xz.chunk(2, dim=-1)
            cs = torch.cat([states[li][0][:, :, 1:], x[:, :, None]], dim=-1)
            states[li][0] = cs
            xc = F.silu((cs * m.conv1d.weight[:, 0, :].float()).sum(-1) + m.conv1d.bias.float())
            dbc = F.linear(xc, m.x_proj.weight.float())
            dtr, Bm, Cm = dbc.split([m.R, m.N, m.N], dim=-1)
            dt = F.softplus(F.linear(dtr, m.dt_proj.weight.float()) + m.dt_proj.bias.float())
            A = -torch.exp(m.A_log.float())
            hs = torch.exp(dt[:, :, None] * A) * states[li][1] + (dt * xc)[:, :, None] * Bm[:, None, :]
            states[li][1] = hs
            y = ((hs * Cm[:, None, :]).sum(-1) + xc * m.D.float()) * F.silu(z)
            h = h + F.linear(y, m.out_proj.weight.float())
        return F.linear(bb.norm_f(h), bb.embeddings.weight.float())

    @torch.no_grad()
    def generate(self, ids, preset=None, max_new=10):
        logits, states, kept = self.prefill(ids, preset)
        out = []
        tok = logits.argmax(-1)
        for i in range(max_new):
            out.append(tok)
            if i == max_new - 1 or bool((torch.stack(out, 1) == EOS_ID).any(1).all()):
                break
            tok = self.step(tok, states).argmax(-1)
        return torch.stack(out, 1).cpu().numpy(), kept


def decode_answer(toks):
    toks = list(toks)
    if EOS_ID in toks:
        toks = toks[:toks.index(EOS_ID)]
    return bytes([t for t in toks if t < 256]).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

def eval_passkey(model, hay, lengths, depths, samples, preset, seed, max_batch_tokens, max_new=10, device="cuda"):
    """Greedy passkey retrieval exactly as the Rust tool scores it."""
    res = {}
    for n in lengths:
        rng = np.random.default_rng([seed, n])
        items = []
        for d in depths:
            for j in range(samples):
                key = int(rng.integers(KEY_MIN, KEY_MAX + 1))
                start = int(rng.integers(hay.n))
                ids, _ = build_prompt(hay, n, d, key, start)
                items.append((d, key, ids))
        bs = max(1, min(len(items), max_batch_tokens // n))
        hits = {d: 0 for d in depths}
        kept_seen = None
        for b0 in range(0, len(items), bs):
            chunk = items[b0:b0 + bs]
            ids = torch.from_numpy(np.stack([c[2] for c in chunk])).to(device)
            toks, kept = model.generate(ids, preset, max_new)
            kept_seen = kept
            for (d, key, _), t in zip(chunk, toks):
                if str(key) in decode_answer(t).split():
                    hits[d] += 1
        res[n] = {"by_depth": {str(d): hits[d] / samples for d in depths},
                  "mean": sum(hits.values()) / (samples * len(depths)), "kept": kept_seen}
    return res


def format_grid(title, res, depths):
    lines = [title, "length   " + " ".join(f"d={d:<5}" for d in depths) + "   mean"]
    for n, r in res.items():
        lines.append(f"{n:>6}   " + " ".join(f"{r['by_depth'][str(d)]:<7.2f}" for d in depths)
                     + f"   {r['mean']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

class Logger:
    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def make_opt(model, cfg, alog_lr_mult=1.0):
    decay, no_decay, alog = [], [], []
    for n, p in model.named_parameters():
        if n.endswith("A_log"):
            alog.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"], "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if alog_lr_mult == 1.0:
        groups[1]["params"] = no_decay + alog
    else:
        groups.append({"params": alog, "weight_decay": 0.0, "lr_mult": alog_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), fused=torch.cuda.is_available())


def lr_at(step, total, warmup, lr, final_frac=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def save_ckpt(d, model, opt, state):
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / "model.pt")
    if opt is not None:
        sd = opt.state_dict()
        m = {k: v["exp_avg"].cpu() for k, v in sd["state"].items()}
        v2 = {k: v["exp_avg_sq"].cpu() for k, v in sd["state"].items()}
        steps = {k: v["step"].cpu() for k, v in sd["state"].items()}
        torch.save({"m": m, "steps": steps, "param_groups": sd["param_groups"]}, d / "opt_m.pt")
        torch.save(v2, d / "opt_v.pt")
    else:
        for f in ("opt_m.pt", "opt_v.pt"):
            if (d / f).exists():
                (d / f).unlink()
    (d / "state.json").write_text(json.dumps(state, indent=1))


def load_opt(d, opt, device):
    d = Path(d)
    if not (d / "opt_m.pt").exists():
        return False
    a = torch.load(d / "opt_m.pt", map_location=device)
    v2 = torch.load(d / "opt_v.pt", map_location=device)
    st = {k: {"step": a["steps"][k], "exp_avg": a["m"][k], "exp_avg_sq": v2[k]} for k in a["m"]}
    opt.load_state_dict({"state": st, "param_groups": a["param_groups"]})
    return True


@torch.no_grad()
def tf_eval(model, hay, n_prompt, samples, seed, device, decim=None):
    """Teacher-forced exact match of " {key}"+EOS, and needle/filler score ratio per layer."""
    rng = np.random.default_rng([seed, n_prompt])
    hits, digit, ratios = 0, 0.0, None
    bs = 64
    for b0 in range(0, samples, bs):
        ids, tgt, w, cls, ns = make_batch(hay, min(bs, samples - b0), n_prompt, rng)
        ids_t = torch.from_numpy(ids).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits, pos, _, scores = model.forward_train(ids_t, decim=decim, want_scores=True)
        pred = logits.argmax(-1).cpu().numpy()
        posn = pos.cpu().numpy()
        tg = np.take_along_axis(tgt, posn, 1)
        cl = np.take_along_axis(cls, posn, 1)
        ok = (pred == tg) | (cl != 1)
        hits += int(ok.all(1).sum())
        am = cl == 1
        digit += float(((pred == tg) & am).sum() / max(1, am.sum())) * ids.shape[0]
        # key digit tokens (first occurrence) vs filler: mean ||dt||
        keymask = np.zeros_like(cls, dtype=bool)
        for i, n0 in enumerate(ns):
            keymask[i, n0 + KEY1_OFF:n0 + KEY1_OFF + 5] = True
        needle = np.zeros_like(keymask)
        for i, n0 in enumerate(ns):
            needle[i, n0:n0 + len(_N0)] = True
        filler = ~needle
        filler[:, n_prompt - len(SUFFIX):] = False
        r = []
        for s in scores:
            s = s.float().cpu().numpy()
            if s.shape[1] != ids.shape[1]:
                break
            r.append(float(s[keymask].mean() / s[filler].mean()))
        ratios = r if ratios is None else [a + b for a, b in zip(ratios, r)]
    nb = math.ceil(samples / bs)
    return hits / samples, digit / samples, [x / nb for x in (ratios or [])]


def dt_penalty(svals, layers, kind, anchor=0.0, m0=None):
    """Sparsity penalty on the DeciMamba score s_t = ||dt_t||_2.
    abs: mean_t s_t (the trial recipe; also shrinks every dt).
    rel: mean_t s_t / mean(top-32 s_t) per sequence: scale-free, so it can
         only be lowered by making the score peaked, not by shrinking all dt.
    anchor > 0 adds anchor * (log mean_t s_t - log m0)^2 per layer, which holds
    the average dt of each layer at the base model's level m0 (so the filler
    keeps being forgotten at the base model's rate)."""
    out = []
    for i in layers:
        s = svals[i]
        if anchor > 0:
            out.append(anchor * (torch.log(s.mean()) - math.log(m0[i])) ** 2)
        if kind == "abs":
            out.append(s.mean())
        elif kind == "rel":
            top = s.topk(min(32, s.shape[1]), dim=1).values.mean(1)
            out.append((s.mean(1) / top).mean())
        else:
            raise ValueError(kind)
    return torch.stack(out).mean()


def decay_floor_penalty(model, eps):
    """Memory-horizon regulariser: every channel's slowest state must decay by at
    least eps per token, r_tc = dt_tc * min_n |A_cn| >= eps, via the hinge
    mean relu(log eps - log r_tc) over tokens, channels and all layers. With
    eps = k/1024 a state keeps at most exp(-k) of what it held 1024 tokens
    earlier, so no layer can carry the needle much beyond the training length
    (the limited effective receptive field that DeciMamba works around)."""
    out = []
    for blk, dt in zip(model.backbone.layers, model.last_dts):
        amin = torch.exp(blk.mixer.A_log.float().min(dim=1).values)
        r = (dt.float() * amin).clamp_min(1e-30)
        out.append(F.relu(math.log(eps) - torch.log(r)).mean())
    return torch.stack(out).mean()


def rank_penalty(svals, layers, ns, n_prompt, margin):
    """Needle supervision for the DeciMamba score (used only by the variants
    that say so): softplus(max_filler log s - min_keydigit log s + margin),
    i.e. every digit of the key must out-score every filler token by e^margin."""
    out = []
    for i in layers:
        s = svals[i]
        Bsz, L = s.shape
        if L < n_prompt:
            continue  # this layer ran after decimation
        ar = torch.arange(L, device=s.device)[None, :]
        needle = (ar >= ns[:, None]) & (ar < ns[:, None] + len(_N0))
        keyd = (ar >= ns[:, None] + KEY1_OFF) & (ar < ns[:, None] + KEY1_OFF + 5)
        filler = ~needle & (ar < n_prompt - len(SUFFIX))
        ls = torch.log(s.float().clamp_min(1e-30))
        mf = ls.masked_fill(~filler, -1e9).max(1).values
        mk = ls.masked_fill(~keyd, 1e9).min(1).values
        out.append(F.softplus(mf - mk + margin).mean())
    return torch.stack(out).mean() if out else torch.zeros((), device=ns.device)


def run_phase(kind, cfg, model, state, hay, log, deadline, t_start, ckpt_out, device, args, pc=None):
    """kind 'base' or 'ft' (pc: the fine-tune variant's settings). Returns True when complete."""
    pc = cfg[kind] if pc is None else pc
    bc = cfg["base"]
    opt_cfg = dict(bc)
    opt_cfg["lr"] = pc["lr"]
    opt = make_opt(model, opt_cfg, pc.get("alog_lr_mult", 1.0))
    if state.get("opt_phase") == kind and args.ckpt_in:
        if load_opt(args.ckpt_in, opt, device):
            log(f"[{kind}] resumed optimizer state at step {state['step']}")
    state["opt_phase"] = kind
    total = pc["max_steps"] if kind == "base" else pc["steps"]
    step = state["step"]
    batch = bc["batch"]
    m0 = None
    tag = kind if kind == "base" else f"ft:{pc.get('name', '')}"
    if kind == "ft" and pc.get("anchor", 0) > 0:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            ids0 = make_batch(hay, batch, pc["len"], np.random.default_rng([cfg["seed"], 3]))[0]
            _, _, sv, _ = model.forward_train(torch.from_numpy(ids0).to(device))
        m0 = [float(x.float().mean()) for x in sv]
        log(f"[{tag}] anchor levels (mean ||dt|| per layer of the base model): " + " ".join(f"{x:.3f}" for x in m0))
    ema = None
    t_last, steps_last = time.time(), 0
    good = state.get("good_evals", 0)
    while step < total:
        if time.time() - t_start > deadline:
            log(f"[{tag}] deadline reached at step {step}; saving checkpoint")
            state["step"] = step
            state["good_evals"] = good
            save_ckpt(ckpt_out, model, opt, state)
            return False
        drng = np.random.default_rng([cfg["seed"], 1 if kind == "base" else 2, step])
        if kind == "base":
            cur = bc["len_start"] + (bc["len_end"] - bc["len_start"]) * min(1.0, step / bc["ramp_steps"])
            cur = int(cur) // 64 * 64
            lo = max(bc["len_start"], int(cur * bc["min_len_frac"]) // 8 * 8)
            n_prompt = int(drng.integers(lo // 8, cur // 8 + 1)) * 8
            decim = None
        else:
            n_prompt = pc["len"]
            decim = None
            if drng.random() < pc["decim_prob"]:
                layer = int(drng.choice(pc["decim_layers"]))
                lb = int(drng.integers(pc["lbase_range"][0], pc["lbase_range"][1] + 1))
                decim = (layer, lb, ANSWER_LEN + 1, True)
        ids, tgt, w, cls, ns = make_batch(hay, batch, n_prompt, drng, bc["w_answer"], bc["w_key2"], bc["w_lm"])
        ids_t = torch.from_numpy(ids).to(device, non_blocking=True)
        tgt_t = torch.from_numpy(tgt).to(device, non_blocking=True)
        w_t = torch.from_numpy(w).to(device, non_blocking=True)
        lr = lr_at(step, total, pc["warmup"], pc["lr"])
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits, pos, svals, _ = model.forward_train(ids_t, decim=decim)
        tg = tgt_t.gather(1, pos)
        wk = w_t.gather(1, pos)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tg.reshape(-1), reduction="none")
        ce = ce.view(tg.shape)
        loss_task = (ce * wk).sum() / batch
        loss = loss_task
        pen = torch.zeros((), device=device)
        if kind == "ft" and pc["lambda_dt"] > 0:
            pen = dt_penalty(svals, pc["dt_layers"], pc.get("penalty", "abs"), pc.get("anchor", 0.0), m0)
            loss = loss + pc["lambda_dt"] * pen
        floor = torch.zeros((), device=device)
        if kind == "ft" and pc.get("floor_w", 0) > 0:
            floor = decay_floor_penalty(model, pc["floor_eps"])
            loss = loss + pc["floor_w"] * floor
        rank = torch.zeros((), device=device)
        if kind == "ft" and pc.get("rank_w", 0) > 0:
            rank = rank_penalty(svals, pc["rank_layers"], torch.from_numpy(ns).to(device), n_prompt, pc["rank_margin"])
            loss = loss + pc["rank_w"] * rank
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), bc["clip"])
        opt.step()
        step += 1
        steps_last += 1
        if step % 50 == 0 or step == 1:
            with torch.no_grad():
                cl_t = torch.from_numpy(cls).to(device).gather(1, pos)
                am = cl_t == 1
                pred = logits.argmax(-1)
                ans_ok = ((pred == tg) | ~am).all(1).float().mean().item()
                ans_ce = (ce * am).sum().item() / max(1, am.sum().item())
            torch.cuda.synchronize() if device == "cuda" else None
            dtl = (time.time() - t_last) / steps_last
            t_last, steps_last = time.time(), 0
            dec_s = f" decim=L{decim[0]}/K{decim[1]}" if decim else ""
            log(f"[{tag}] step {step:5d} len {n_prompt:5d} loss {loss.item():.4f} task {loss_task.item():.4f} "
                f"ans_ce {ans_ce:.4f} ans_acc {ans_ok:.3f} dtpen {pen.item():.3f} floor {floor.item():.4f} rank {rank.item():.3f} gnorm {gn.item():.2f} "
                f"lr {lr:.2e} {dtl * 1000:.0f} ms/step t={time.time() - t_start:.0f}s{dec_s}")
        ev_every = pc["eval_every"]
        if step % ev_every == 0 or step == total:
            model.eval()
            acc, dig, ratios = tf_eval(model, hay, bc["len_end"], bc["eval_samples"], cfg["seed"] + 5, device)
            msg = (f"[{tag}] eval step {step}: tf exact-match@{bc['len_end']} {acc:.3f} digit-acc {dig:.3f} "
                   f"key/filler ||dt|| ratio per layer " + " ".join(f"{r:.2f}" for r in ratios))
            if kind == "ft":
                acc_d, _, _ = tf_eval(model, hay, bc["len_end"], 128, cfg["seed"] + 6, device,
                                      decim=(2, 256, ANSWER_LEN + 1, False))
                preset = {"decimating_layers": [2], "decimation_beta": 0.5, "decimation_max_p_L_base": 1024,
                          "decimation_min_seq_len": 20}
                pr = eval_passkey(model, hay, [pc["probe_len"]], cfg["eval"]["depths"], pc["probe_samples"],
                                  preset, cfg["seed"] + 7, cfg["eval"]["max_batch_tokens"], device=device)
                msg += (f" | tf@1024 decimated L2/K256 {acc_d:.3f} | greedy DeciMamba(L2,1024)@{pc['probe_len']} "
                        f"{pr[pc['probe_len']]['mean']:.3f}")
            log(msg)
            model.train()
            if kind == "base" and step >= bc["min_steps"] and step >= bc["ramp_steps"]:
                good = good + 1 if acc >= bc["stop_acc"] else 0
                if good >= 2:
                    log(f"[base] converged (exact-match >= {bc['stop_acc']} twice) at step {step}")
                    break
    state["step"] = step
    return True


def export_model(model, cfg, out_dir):
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = cfg["model"]
    sd = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    conf = {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": c["vocab_size"],
        "hidden_size": c["d_model"], "state_size": c["d_state"], "num_hidden_layers": c["n_layer"],
        "layer_norm_epsilon": c["norm_eps"], "expand": c["expand"], "conv_kernel": c["d_conv"],
        "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "time_step_rank": c["dt_rank"],
        "intermediate_size": c["expand"] * c["d_model"], "residual_in_fp32": True,
        "tie_word_embeddings": True, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "bos_token_id": EOS_ID,
        "use_cache": True, "torch_dtype": "float16",
    }
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return sd


def load_exported(path, cfg, device):
    from safetensors.torch import load_file
    model = MambaLM(cfg["model"])
    sd = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval()


def hf_parity(export_dir, model, hay, device, log):
    """transformers' MambaForCausalLM on the exported dir vs this model (f32 from f16)."""
    try:
        from transformers import MambaForCausalLM
    except Exception as e:  # pragma: no cover
        log(f"[export] transformers unavailable ({e}); parity check skipped")
        return None
    hf = MambaForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).to(device).eval()
    rng = np.random.default_rng(99)
    prompts = []
    for n, d in [(300, 0.5), (700, 0.0), (1024, 0.75)]:
        ids, _ = build_prompt(hay, n, d, int(rng.integers(KEY_MIN, KEY_MAX + 1)), int(rng.integers(hay.n)))
        prompts.append(ids)
    worst, same = 0.0, True
    for ids in prompts:
        t = torch.from_numpy(ids)[None].to(device)
        with torch.no_grad():
            lh = hf(t).logits.float()
            lm, _, _ = model.prefill(t, None, all_logits=True)
        diff = (lh - lm).abs().max().item()
        worst = max(worst, diff)
        gh = hf.generate(t, max_new_tokens=10, do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        gh = gh[0, t.shape[1]:].tolist()
        gm, _ = model.generate(t, None, 10)
        gm = gm[0].tolist()
        a, b = decode_answer(gh), decode_answer(gm)
        same &= a == b
        log(f"[export] HF parity len {t.shape[1]}: max|logit diff| {diff:.2e}; HF greedy {a!r} / ours {b!r}")
    log(f"[export] HF parity: worst max|logit diff| {worst:.2e}, greedy answers identical: {same}")
    return {"max_abs_logit_diff": worst, "greedy_identical": same}


def run_eval(model, cfg, hay, device, log, out_json):
    ec = cfg["eval"]
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    # preset sweep at long lengths
    sweep = []
    for layers in ec["sweep_layers"]:
        for lb in ec["sweep_lbase"]:
            preset = {"decimating_layers": layers, "decimation_beta": ec["beta"],
                      "decimation_max_p_L_base": lb, "decimation_min_seq_len": ec["min_seq_len"],
                      "decimation_type": "max_p"}
            r = eval_passkey(model, hay, ec["sweep_lengths"], ec["depths"], ec["sweep_samples"], preset,
                             ec["seed"] + 1, ec["max_batch_tokens"], ec["max_new_tokens"], device)
            score = float(np.mean([v["mean"] for v in r.values()]))
            sweep.append({"preset": preset, "score": score,
                          "by_length": {str(k): v["mean"] for k, v in r.items()}})
            log(f"[eval] sweep layers {layers} L_base {lb}: " +
                " ".join(f"{k}:{v['mean']:.2f}" for k, v in r.items()) + f"  ({time.time() - t0:.0f}s)")
    # best: highest score; ties -> larger L_base, then the earlier layer
    best = max(sweep, key=lambda s: (round(s["score"], 6), s["preset"]["decimation_max_p_L_base"],
                                     -s["preset"]["decimating_layers"][0]))
    preset = best["preset"]
    log(f"[eval] chosen preset {json.dumps(preset)}")
    van = eval_passkey(model, hay, ec["lengths"], ec["depths"], ec["samples"], None, ec["seed"],
                       ec["max_batch_tokens"], ec["max_new_tokens"], device)
    log(format_grid("[eval] vanilla Mamba (greedy, f32 from f16 weights)", van, ec["depths"]))
    dec = eval_passkey(model, hay, ec["lengths"], ec["depths"], ec["samples"], preset, ec["seed"],
                       ec["max_batch_tokens"], ec["max_new_tokens"], device)
    log(format_grid(f"[eval] DeciMamba {json.dumps(preset)}", dec, ec["depths"]))
    log(f"[eval] done in {time.time() - t0:.0f}s")
    result = {
        "model": "passkey-mamba", "training_length": cfg["base"]["len_end"],
        "depths": ec["depths"], "samples_per_depth": ec["samples"], "lengths": ec["lengths"],
        "rule": "DeciMamba max_p, protected tail R=1 at prefill, greedy <=10 new tokens, stop at EOS; "
                "success iff the key is one whitespace-separated token of the output",
        "compute": "f32 from the exported f16 weights",
        "preset": preset, "sweep": sweep,
        "vanilla": {str(k): v for k, v in van.items()},
        "decimamba": {str(k): v for k, v in dec.items()},
    }
    Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
    return preset, result


def load_cfg(path):
    return json.loads(Path(path).read_text())


def train_hay(cfg):
    return Haystack([s + " " for s in generate_sentences(cfg["data"]["train_sentences"], cfg["data"]["train_seed"])])


def eval_hay():
    return Haystack(split_haystack_text((MODEL_DIR / "haystack.txt").read_text()))


def probe(model, cfg, hay, device):
    """Quick greedy probe: vanilla at 1x..32x, DeciMamba (one layer, L_base 1024) at 8x and 32x."""
    pc = cfg["probe"]
    ec = cfg["eval"]
    res = {"vanilla": {}}
    van = eval_passkey(model, hay, pc["vanilla_lengths"], ec["depths"], pc["samples"], None, ec["seed"] + 11,
                       ec["max_batch_tokens"], ec["max_new_tokens"], device)
    res["vanilla"] = {n: v["mean"] for n, v in van.items()}
    for layer in pc["deci_layers"]:
        preset = {"decimating_layers": [layer], "decimation_beta": ec["beta"], "decimation_max_p_L_base": 1024,
                  "decimation_min_seq_len": ec["min_seq_len"]}
        r = eval_passkey(model, hay, pc["deci_lengths"], ec["depths"], pc["samples"], preset, ec["seed"] + 12,
                         ec["max_batch_tokens"], ec["max_new_tokens"], device)
        res[f"deci_L{layer}"] = {n: v["mean"] for n, v in r.items()}
    return res


def probe_stats(pr, train_len):
    deci = max(min(v.values()) for k, v in pr.items() if k.startswith("deci_"))
    longs = [v for n, v in pr["vanilla"].items() if n >= 4 * train_len]
    excess = float(np.mean([max(0.0, v - 0.2) for v in longs]))
    return deci, max(longs), pr["vanilla"][train_len], excess


def format_probe(name, pr):
    return f"[probe {name}] " + " | ".join(
        f"{k}: " + " ".join(f"{n}:{v:.2f}" for n, v in d.items()) for k, d in pr.items())


def cmd_train(args):
    t_start = time.time()
    cfg = load_cfg(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_out = out / "ckpt"
    log_path = out / "train_log.txt"
    if args.ckpt_in and (Path(args.ckpt_in) / "train_log.txt").exists() and not log_path.exists():
        log_path.write_text((Path(args.ckpt_in) / "train_log.txt").read_text())
    log = Logger(str(log_path))
    log(f"=== run started {time.strftime('%Y-%m-%d %H:%M:%S')} on {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), torch {torch.__version__}, "
        f"deadline {args.deadline}s")
    if HAVE_TRITON and device == "cuda" and not selftest(device):
        log("selftest failed; aborting")
        sys.exit(2)
    log("scan selftest passed (Triton fwd/bwd vs sequential loop)" if device == "cuda" else "cpu run: reference scan")
    torch.manual_seed(cfg["seed"])
    model = MambaLM(cfg["model"]).to(device)
    state = {"phase": "base", "step": 0}
    if args.ckpt_in and (Path(args.ckpt_in) / "state.json").exists():
        state = json.loads((Path(args.ckpt_in) / "state.json").read_text())
        model.load_state_dict(torch.load(Path(args.ckpt_in) / "model.pt", map_location=device))
        log(f"resumed from {args.ckpt_in}: {state}")
    else:
        nparam = sum(p.numel() for p in model.parameters())
        log(f"config {json.dumps(cfg)}")
        log(f"params {nparam} ({nparam / 1e6:.2f}M)")
    model.train()
    hay = train_hay(cfg)
    ehay = eval_hay()
    log(f"train filler: {hay.n} sentences, {hay.total} bytes; eval haystack: {ehay.n} sentences, {ehay.total} bytes")
    train_len = cfg["base"]["len_end"]
    if state["phase"] == "base":
        if not run_phase("base", cfg, model, state, hay, log, args.deadline, t_start, ckpt_out, device, args):
            return
        state = {"phase": "ft", "step": 0}
        save_ckpt(ckpt_out, model, None, state)
        log(f"phase base complete at t={time.time() - t_start:.0f}s")
    if state["phase"] == "ft":
        model.eval()
        log(format_probe("base", probe(model, cfg, ehay, device)))
        base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results = []
        for var in cfg["ft_variants"]:
            pc = dict(cfg["ft"])
            pc.update(var)
            need = pc["steps"] * cfg["ft"]["est_s_per_step"] + 20
            if time.time() - t_start + need > args.deadline - args.eval_reserve:
                log(f"[ft:{pc['name']}] skipped: not enough time left")
                continue
            model.load_state_dict(base_sd)
            model.train()
            st = {"phase": "ft", "step": 0}
            run_phase("ft", cfg, model, st, hay, log, 1e9, t_start, ckpt_out, device, args, pc=pc)
            model.eval()
            pr = probe(model, cfg, ehay, device)
            log(format_probe(pc["name"], pr) + f"  (t={time.time() - t_start:.0f}s)")
            results.append({"name": pc["name"], "probe": pr,
                            "sd": {k: v.detach().to(torch.float16).cpu() for k, v in model.state_dict().items()}})
        if not results:
            log("no fine-tune variant finished")
            return
        sup = {v["name"]: v.get("rank_w", 0) > 0 for v in cfg["ft_variants"]}

        def sel_score(r):
            # meets the targets > prefers variants without needle supervision > DeciMamba minus vanilla excess
            d, v, v1, vex = probe_stats(r["probe"], train_len)
            meets = v1 >= 0.95 and d >= 0.95 and vex <= 0.05
            return (v1 >= 0.95, meets, meets and not sup[r["name"]], round(d - vex, 6), d)
        chosen = max(results, key=sel_score)
        for r in results:
            d, v, v1, vex = probe_stats(r["probe"], train_len)
            log(f"[select] {r['name']}: DeciMamba min(best layer) {d:.2f}, vanilla max(>=4x) {v:.2f}, "
                f"vanilla excess over 0.2 (mean >=4x) {vex:.2f}, vanilla@1x {v1:.2f}"
                + ("  <== chosen" if r is chosen else ""))
        # keep every variant's weights (f16) so another can be exported later without retraining
        half = (len(results) + 1) // 2
        for j, part in enumerate([results[:half], results[half:]]):
            if part:
                torch.save({r["name"]: r["sd"] for r in part}, out / f"variants_{j}.pt")
        model.load_state_dict(base_sd)
        save_ckpt(ckpt_out, model, None, {"phase": "ft", "step": 0, "note": "base model; variants in variants_*.pt"})
        model.load_state_dict({k: v.float() for k, v in chosen["sd"].items()})
        state = {"phase": "export", "step": 0, "variant": chosen["name"]}
    if state["phase"] == "export":
        exp = out / "passkey-mamba"
        export_model(model, cfg, exp)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model16 = load_exported(exp, cfg, device)
        hf_parity(exp, model16, ehay, device, log)
        run_eval(model16, cfg, ehay, device, log, exp / "eval_python.json")
        log(f"=== all done at t={time.time() - t_start:.0f}s (exported variant {state.get('variant')})")


def cmd_eval(args):
    cfg = load_cfg(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_exported(args.model, cfg, device)
    log = Logger(None)
    run_eval(model, cfg, eval_hay(), device, log, args.out_json)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False),
                            AddedToken("<|pad|>", special=True, normalized=False)])
    tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    assert tok.token_to_id("<|endoftext|>") == EOS_ID and tok.token_to_id("<|pad|>") == PAD_ID
    assert tok.get_vocab_size() == 258
    for s in ["The pass key is 48213.\nÄ", "  two  spaces\tand tab\r\n", "emoji \U0001F600 ok", SUFFIX + " 48213",
              "".join(chr(i) for i in range(1, 128))]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert ids == list(s.encode("utf-8")), (s, ids)
        assert tok.decode(ids) == s, (s, tok.decode(ids))
    ids = tok.encode("abc<|endoftext|>").ids
    assert ids == [97, 98, 99, EOS_ID], ids
    assert tok.decode([52, 56, 50, 49, 51, EOS_ID], skip_special_tokens=True) == "48213"
    return tok


def cmd_prepare(args):
    cfg = load_cfg(args.config)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    sents = generate_sentences(cfg["data"]["haystack_sentences"], cfg["data"]["haystack_seed"])
    (MODEL_DIR / "haystack.txt").write_text("\n".join(sents) + "\n")
    parsed = split_haystack_text((MODEL_DIR / "haystack.txt").read_text())
    assert parsed == [s + " " for s in sents], "haystack does not round-trip through the tool's splitter"
    tmpl = {"name": "passkey-mamba", "prefix": PREFIX, "needle": NEEDLE, "suffix": SUFFIX,
            "key_min": KEY_MIN, "key_max": KEY_MAX}
    (MODEL_DIR / "passkey_template.json").write_text(json.dumps(tmpl, indent=2) + "\n")
    build_tokenizer(MODEL_DIR / "tokenizer.json")
    size = (MODEL_DIR / "haystack.txt").stat().st_size
    print(f"wrote haystack.txt ({len(sents)} sentences, {size} bytes), passkey_template.json, tokenizer.json (verified)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "scripts" / "train_passkey.json"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    sub.add_parser("selftest")
    t = sub.add_parser("train")
    t.add_argument("--out", required=True, help="output dir (log, checkpoint, export)")
    t.add_argument("--ckpt-in", default=None, help="resume from this checkpoint dir")
    t.add_argument("--deadline", type=float, default=1e9, help="seconds of wall clock before saving and exiting")
    t.add_argument("--eval-reserve", type=float, default=150.0, help="seconds needed for export + eval")
    e = sub.add_parser("eval")
    e.add_argument("--model", default=str(MODEL_DIR))
    e.add_argument("--out-json", required=True)
    args = ap.parse_args()
    if args.cmd == "prepare":
        cmd_prepare(args)
    elif args.cmd == "selftest":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        sys.exit(0 if selftest(dev) else 1)
    elif args.cmd == "train":
        cmd_train(args)
    elif args.cmd == "eval":
        cmd_eval(args)


if __name__ == "__main__":
    main()
