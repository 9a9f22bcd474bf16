#!/usr/bin/env python3
"""Times mamba_ssm's own fused Mamba-1 inference path (MambaLMHeadModel: mamba_inner_fn with
the causal-conv1d and selective-scan CUDA kernels, Triton fused add + RMSNorm, and
`generate(..., cg=True)` CUDA-graph decode) on random-weight models, as a second GPU peer
for decimamba. Writes OUT/fused-<shape>-<dtype>.json in the layout of
scripts/gpu_reference_bench.py's JSON, which scripts/gpu_compare.py reads.

What is timed
-------------
Models: MambaConfig(d_model, n_layer, vocab_size=50277 (padded to 50280, a multiple of 8,
as mamba_ssm does), ssm_cfg={"layer": "Mamba1"}, rms_norm, residual_in_fp32,
fused_add_norm, tied embeddings), mamba_ssm's own random init (seed --seed), batch 1.
 * prefill: `model(ids, num_last_tokens=1)` over L random tokens (the LM head on the last
   token only), under torch.inference_mode(): 1 warm-up and up to --reps timed forwards,
   torch.cuda.synchronize() around each, median reported. This is the fused path
   (Mamba.forward takes mamba_inner_fn when no inference cache is passed).
 * decode: `model.generate(prompt, max_length=P+n, cg=True)` (greedy) after a P-token
   random prompt (--prompt-tokens, default 128). The graph is captured by a warm-up call.
   Then --decode-reps pairs of calls with n = N (--decode-tokens, default 256) and n = 1
   (prompt prefill + first token only) are timed; decode time = median(N) - median(1),
   which covers the N - 1 graph-replayed steps, so tokens_per_s = (N - 1) / that.
Each run writes its JSON after every measurement. Past --deadline seconds (counted from the
start, build included) no measurement starts; the rest go to "skipped" (reason
"deadline"), as do those that run out of GPU memory ("oom") or fail ("error").

Before timing (unless --no-check) a one-line self-check: the 130m shape in fp32 at L=300,
last-token logits of the fused model against the same weights run through the plain
PyTorch model of scripts/gpu_reference_bench.py with its float64 sequential scan (relative
L2 error, "check_rel_err"; warned about and a non-zero exit above 1e-3).

Set-up on the GPU machine (no network): the sources come from .ref/ (scripts/
fetch-reference-src.sh, run where PyPI is reachable). Built with torch.utils.cpp_extension
.load for sm_90, cached: selective_scan_cuda exactly as gpu_reference_bench.py builds it
(forward only; same --ss-build-dir default, so its cache is shared) and causal_conv1d_cuda
from .ref/causal_conv1d (fwd + update kernels; the backward is replaced by a stub written
into the build folder). MAX_JOBS comes from the environment (default 16). .ref/py goes first
on sys.path (mamba_ssm, causal_conv1d, einops); mamba_ssm/__init__.py is not run (it pulls in
Mamba2/Mamba3 and their Triton/TileLang/CuTe modules), mamba_ssm.modules.mamba2 is a stub,
`packaging` falls back to torch's vendored copy, and when `transformers` is missing (or
--shim-transformers) a minimal stand-in provides the names that mamba_ssm.utils.generation
and mamba_ssm.utils.hf import.

    OUT=dir bash scripts/gpu-fused-peer.sh            # the usual way
    python3 scripts/gpu_fused_bench.py --runs 130m:bf16,2.8b:bf16 \\
        --lengths 2k,8k,32k,128k --deadline 300 --out $OUT

CPU smoke test (no build, no CUDA): tiny shape; stand-ins for the two CUDA extensions (the
float64 reference scan, F.conv1d) and for the Triton norm and state-update kernels, decode
with cg=False. Without torch it only exercises the arguments, the shim and the JSON:

    python3 scripts/gpu_fused_bench.py --dry --out /tmp/fuseddry
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
IMPLEMENTATION = ("mamba_ssm fused (mamba_inner_fn + causal-conv1d + Triton add+norm, "
                  "generate cg=True)")
DTYPE_ALIASES = {"f32": "fp32", "float32": "fp32", "bfloat16": "bf16", "f16": "fp16",
                 "float16": "fp16"}
DTYPE_NAMES = ("bf16", "fp32", "fp16")
CHECK_TOL = 1e-3

torch = None  # imported in main() when available
F = None


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    vocab: int = 50277  # padded by mamba_ssm to 50280


SHAPES = {"130m": Shape(768, 24), "2.8b": Shape(2560, 64), "tiny": Shape(64, 4, vocab=509)}


class Fatal(SystemExit):
    """sys.exit with the message kept, so that main() can also put it into the JSON."""

    def __init__(self, msg, code):
        super().__init__(code)
        self.msg = msg


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise Fatal(msg, code)


def padded_vocab(v, multiple=8):
    return v + (-v) % multiple


# --------------------------------------------------------------------------- shims


def install_transformers_shim():
    """Minimal `transformers` with the names mamba_ssm imports at module import time:
    transformers.generation.{GenerateDecoderOnlyOutput, TextStreamer} (utils/generation.py)
    and transformers.utils.{WEIGHTS_NAME, CONFIG_NAME}, transformers.utils.hub.cached_file
    (utils/hf.py, used only by from_pretrained)."""
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        del sys.modules[name]

    class GenerateDecoderOnlyOutput:
        def __init__(self, sequences=None, scores=None, **kw):
            self.sequences, self.scores = sequences, scores
            self.__dict__.update(kw)

    class TextStreamer:
        def __init__(self, *a, **kw):
            raise NotImplementedError("transformers shim: TextStreamer is not available")

    def cached_file(*a, **kw):
        raise OSError("transformers shim: no hub access (random weights only)")

    root = types.ModuleType("transformers")
    root.__path__ = []
    root.__version__ = "shim"
    gen = types.ModuleType("transformers.generation")
    gen.GenerateDecoderOnlyOutput, gen.TextStreamer = GenerateDecoderOnlyOutput, TextStreamer
    utils = types.ModuleType("transformers.utils")
    utils.__path__ = []
    utils.WEIGHTS_NAME, utils.CONFIG_NAME = "pytorch_model.bin", "config.json"
    hub = types.ModuleType("transformers.utils.hub")
    hub.cached_file = cached_file
    root.generation, root.utils, utils.hub = gen, utils, hub
    sys.modules.update({"transformers": root, "transformers.generation": gen,
                        "transformers.utils": utils, "transformers.utils.hub": hub})


def setup_transformers(force_shim):
    """Real transformers if its needed names import, else the shim. Returns a label."""
    if not force_shim:
        try:
            tr = importlib.import_module("transformers")
            from transformers.generation import GenerateDecoderOnlyOutput, TextStreamer  # noqa: F401
            from transformers.utils import WEIGHTS_NAME, CONFIG_NAME  # noqa: F401
            from transformers.utils.hub import cached_file  # noqa: F401
            return f"transformers {getattr(tr, '__version__', '?')}"
        except Exception as e:  # missing or broken: fall back to the shim
            reason = f"{type(e).__name__}: {str(e)[:120]}"
    else:
        reason = "--shim-transformers"
    install_transformers_shim()
    return f"shim ({reason})"


def setup_packaging():
    """mamba_ssm.utils.determinism imports packaging.version; torch vendors a copy."""
    try:
        import packaging.version  # noqa: F401
        return "packaging"
    except ImportError:
        vend = importlib.import_module("torch._vendor.packaging")
        sys.modules["packaging"] = vend
        sys.modules["packaging.version"] = importlib.import_module("torch._vendor.packaging.version")
        return "torch._vendor.packaging"


def setup_mamba_package(py_dir: Path):
    """Registers the `mamba_ssm` package from py_dir without running its __init__.py (which
    imports Mamba2/Mamba3 and their kernels), and a stub mamba_ssm.modules.mamba2."""
    pkg_dir = py_dir / "mamba_ssm"
    init = (pkg_dir / "__init__.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', init)
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(pkg_dir)]
    pkg.__file__ = str(pkg_dir / "__init__.py")
    pkg.__package__ = "mamba_ssm"
    pkg.__version__ = m.group(1) if m else "?"
    sys.modules["mamba_ssm"] = pkg
    importlib.import_module("mamba_ssm.modules")
    stub = types.ModuleType("mamba_ssm.modules.mamba2")

    class Mamba2:  # only the name is imported by mixer_seq_simple
        def __init__(self, *a, **kw):
            raise NotImplementedError("Mamba2 is stubbed out by gpu_fused_bench.py (Mamba-1 only)")

    stub.Mamba2 = Mamba2
    sys.modules["mamba_ssm.modules.mamba2"] = stub
    return pkg.__version__


def check_py_dir(py_dir: Path):
    need = [py_dir / "mamba_ssm" / "models" / "mixer_seq_simple.py",
            py_dir / "causal_conv1d" / "cpp_functions.py", py_dir / "einops" / "__init__.py"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        die(f"{', '.join(missing)} missing: run scripts/fetch-reference-src.sh where PyPI is "
            "reachable and carry .ref")


# --------------------------------------------------------------------------- the kernels

CC_SOURCES = ["causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_update.cu"]
CC_STUB = """// Written by scripts/gpu_fused_bench.py: backward stubs so that a forward-only build of
// causal_conv1d_cuda links (causal_conv1d_bwd.cu is not compiled).
#include <cstdint>
#include <cuda_runtime_api.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include "causal_conv1d.h"

#define STUB(FN) \\
template <typename input_t, typename weight_t> \\
void FN(ConvParamsBwd &params, cudaStream_t stream) { \\
    (void)params; (void)stream; \\
    TORCH_CHECK(false, #FN ": backward not built (forward-only build of gpu_fused_bench.py)"); \\
}
STUB(causal_conv1d_bwd_cuda)
STUB(causal_conv1d_channellast_bwd_cuda)

#define INST(FN, I, W) template void FN<I, W>(ConvParamsBwd &params, cudaStream_t stream);
#define INST_ALL(FN) \\
    INST(FN, float, float) INST(FN, c10::Half, float) INST(FN, c10::BFloat16, float) \\
    INST(FN, float, c10::Half) INST(FN, c10::Half, c10::Half) INST(FN, c10::BFloat16, c10::Half) \\
    INST(FN, float, c10::BFloat16) INST(FN, c10::Half, c10::BFloat16) \\
    INST(FN, c10::BFloat16, c10::BFloat16)
INST_ALL(causal_conv1d_bwd_cuda)
INST_ALL(causal_conv1d_channellast_bwd_cuda)
"""


def clear_stale_lock(build_dir: Path):
    """torch's JIT build waits forever on a `lock` file that a killed build left behind."""
    lock = build_dir / "lock"
    if lock.exists():
        print(f"removing the stale build lock {lock} (no other build runs here)", flush=True)
        lock.unlink()


def build_causal_conv1d(src: Path, build_dir: Path, std: str, verbose: bool):
    """Builds (or loads from build_dir's cache) a forward-only causal_conv1d_cuda."""
    import gpu_reference_bench as ref

    missing = [n for n in CC_SOURCES + ["causal_conv1d.h"] if not (src / n).is_file()]
    if missing:
        die(f"--cc-src {src} lacks {missing} (want the causal-conv1d sdist's csrc folder)")
    build_dir.mkdir(parents=True, exist_ok=True)
    stub = build_dir / "causal_conv1d_bwd_stub.cpp"
    if not stub.is_file() or stub.read_text() != CC_STUB:  # keep the mtime: ninja's cache
        stub.write_text(CC_STUB)
    return ref.build_extension("causal_conv1d_cuda", src, [src / n for n in CC_SOURCES] + [stub],
                               build_dir, std, verbose)


def dry_selective_scan_module():
    """Stand-in for selective_scan_cuda on CPU: fwd via the float64 reference scan, returning
    (out, x, out_z) with the last state in x[:, :, -1, 1::2] as the kernel lays it out."""
    import gpu_reference_bench as ref

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        res = ref.reference_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, dim, _ = u.shape
        x = torch.zeros(batch, dim, 1, 2 * A.shape[1], dtype=torch.float32, device=u.device)
        x[:, :, 0, 1::2] = res[1].float()
        return [res[0], x] + res[2:]

    def bwd(*a, **kw):
        raise RuntimeError("dry selective_scan_cuda: no backward")

    mod = types.ModuleType("selective_scan_cuda")
    mod.fwd, mod.bwd = fwd, bwd
    return mod


def dry_causal_conv1d_module():
    """Stand-in for causal_conv1d_cuda on CPU (fwd and update, no cache_seqlens)."""

    def fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu):
        assert seq_idx is None and initial_states is None and final_states_out is None
        L, width = x.shape[-1], weight.shape[-1]
        y = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])[..., :L]
        out.copy_(F.silu(y) if silu else y)

    def update(x, conv_state, weight, bias, out, silu, cache_seqlens, conv_state_indices):
        assert cache_seqlens is None and conv_state_indices is None
        state_len, L, width = conv_state.shape[-1], x.shape[-1], weight.shape[-1]
        full = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)
        conv_state.copy_(full[..., -state_len:])
        y = F.conv1d(full[..., -(L + width - 1):].to(weight.dtype), weight[:, None, :], bias,
                     groups=x.shape[1])
        out.copy_(F.silu(y) if silu else y)

    def bwd(*a, **kw):
        raise RuntimeError("dry causal_conv1d_cuda: no backward")

    mod = types.ModuleType("causal_conv1d_cuda")
    mod.causal_conv1d_fwd, mod.causal_conv1d_update, mod.causal_conv1d_bwd = fwd, update, bwd
    return mod


def torch_layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                        residual_in_fp32=False, is_rms_norm=False, **kw):
    """CPU stand-in for mamba_ssm's Triton layer_norm_fn (no dropout, no x1/weight1)."""
    if residual is not None:
        x = x.float() + residual.float() if residual_in_fp32 else x + residual
    res = x.float() if residual_in_fp32 else x
    xf = x.float()
    if is_rms_norm:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    y = y * weight.float() + (bias.float() if bias is not None else 0)
    y = y.to(weight.dtype)
    return (y, res) if prenorm else y


def torch_rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False,
                      residual_in_fp32=False, **kw):
    return torch_layer_norm_fn(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True)


def import_mamba(args, dry):
    """Puts .ref/py first, installs the shims and kernels, imports MambaLMHeadModel. Returns
    (MambaLMHeadModel, MambaConfig, info dict)."""
    py_dir = args.py.resolve()
    check_py_dir(py_dir)
    sys.path.insert(0, str(py_dir))
    info = {"transformers": setup_transformers(args.shim_transformers),
            "packaging": setup_packaging(), "build_s": None, "build_s_parts": {}}
    import einops
    info["einops"] = f"{einops.__version__} ({Path(einops.__file__).parent})"
    if dry:
        sys.modules["selective_scan_cuda"] = dry_selective_scan_module()
        sys.modules["causal_conv1d_cuda"] = dry_causal_conv1d_module()
    else:
        import gpu_reference_bench as ref
        std = args.std or ref.default_std()
        for d in (args.ss_build_dir, args.cc_build_dir):
            clear_stale_lock(d)
        ss, ss_s = ref.build_kernel(args.ss_src.resolve(), args.ss_build_dir, std, args.verbose)
        cc, cc_s = build_causal_conv1d(args.cc_src.resolve(), args.cc_build_dir, std,
                                       args.verbose)
        sys.modules["selective_scan_cuda"] = ss
        sys.modules["causal_conv1d_cuda"] = cc
        info["build_s"] = ss_s + cc_s
        info["build_s_parts"] = {"selective_scan_cuda": ss_s, "causal_conv1d_cuda": cc_s}
        info["std"] = std
    import causal_conv1d  # directly, so that an import error is shown, not swallowed
    info["causal_conv1d"] = getattr(causal_conv1d, "__version__", "?")
    info["mamba_ssm"] = setup_mamba_package(py_dir)
    from mamba_ssm.models import mixer_seq_simple
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.modules import block, mamba_simple
    from mamba_ssm.ops.triton import layer_norm
    for mod in (mixer_seq_simple, mamba_simple):
        if not str(mod.__file__).startswith(str(py_dir)):
            die(f"{mod.__name__} came from {mod.__file__}, not {py_dir}")
    if mamba_simple.causal_conv1d_fn is None or mamba_simple.causal_conv1d_update is None:
        die("mamba_ssm.modules.mamba_simple could not import causal_conv1d (fused path off)")
    if mamba_simple.selective_state_update is None:
        die("mamba_ssm could not import the Triton selective_state_update")
    if mixer_seq_simple.layer_norm_fn is None:
        die("mamba_ssm could not import the Triton layer_norm_fn")
    if dry:  # Triton kernels need a GPU: torch stand-ins
        for mod in (mixer_seq_simple, block, layer_norm, mamba_simple):
            if hasattr(mod, "layer_norm_fn"):
                mod.layer_norm_fn = torch_layer_norm_fn
            if hasattr(mod, "rms_norm_fn"):
                mod.rms_norm_fn = torch_rms_norm_fn
        mamba_simple.selective_state_update = None
    return mixer_seq_simple.MambaLMHeadModel, MambaConfig, info


# --------------------------------------------------------------------------- model + timing


def make_model(Model, Config, shape, dtype, device, seed):
    cfg = Config(d_model=shape.d_model, n_layer=shape.n_layer, d_intermediate=0,
                 vocab_size=shape.vocab, ssm_cfg={"layer": "Mamba1"}, rms_norm=True,
                 residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                 tie_embeddings=True)
    torch.manual_seed(seed)
    model = Model(cfg, device=device, dtype=dtype).eval()
    return model, cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(n, vocab, seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randint(0, min(vocab, 50000), (1, n), generator=g, device=device)


def cut_reps(reps, one_s, time_left, per=1):
    left = time_left()
    return reps if left is None else max(1, min(reps, int(left / max(one_s * per, 1e-9))))


def time_prefill(model, L, reps, vocab, device, time_left):
    ids = random_ids(L, vocab, L, device)

    def once():
        sync(device)
        t0 = time.perf_counter()
        logits = model(ids, num_last_tokens=1).logits
        sync(device)
        dt = time.perf_counter() - t0
        if logits.shape[1] != 1 or not torch.isfinite(logits).all():
            raise FloatingPointError(f"bad logits at L={L}: shape {tuple(logits.shape)}")
        return dt

    warm = once()
    runs = [once() for _ in range(cut_reps(reps, warm, time_left))]
    s = statistics.median(runs)
    return {"s": s, "tok_per_s": L / s, "runs_s": runs, "warmup_s": warm}


def time_decode(model, prompt_tokens, new_tokens, reps, vocab, device, cg, time_left):
    """mamba_ssm's generate (greedy); see the module docstring for the differencing."""
    if new_tokens < 2:
        raise ValueError("--decode-tokens must be at least 2")
    prompt = random_ids(prompt_tokens, vocab, 7, device)

    def gen(n):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_length=prompt_tokens + n, cg=cg)
        sync(device)
        dt = time.perf_counter() - t0
        if out.shape != (1, prompt_tokens + n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, "
                               f"want (1, {prompt_tokens + n})")
        return dt

    t_capture = gen(new_tokens)  # captures the CUDA graph (max_seqlen = prompt + N)
    warm = gen(new_tokens) + gen(1)
    full, short = [], []
    for _ in range(cut_reps(reps, warm, time_left)):
        full.append(gen(new_tokens))
        short.append(gen(1))
    steps = new_tokens - 1
    decode_s = statistics.median(full) - statistics.median(short)
    if decode_s <= 0:
        raise RuntimeError(f"decode time {decode_s:.6f} s <= 0 (full {full}, prompt {short})")
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_steps": steps,
            "s": decode_s, "tokens_per_s": steps / decode_s, "tok_per_s": steps / decode_s,
            "generate_s": statistics.median(full), "prompt_and_first_token_s":
            statistics.median(short), "runs_s": full, "runs_prompt_s": short,
            "first_call_s": t_capture, "cg": cg,
            "method": "median generate(max_length=P+N) - median generate(max_length=P+1), "
                      "greedy; = N-1 decode steps; graph captured in a warm-up call"}


def reference_from_model(model, shape_vocab):
    """gpu_reference_bench.RandomMamba holding `model`'s own parameters (same layout)."""
    import gpu_reference_bench as ref

    bb = model.backbone
    if model.lm_head.weight.data_ptr() != bb.embedding.weight.data_ptr():
        raise RuntimeError("LM head is not tied to the embedding")
    d = bb.embedding.weight.shape[1]
    r = ref.RandomMamba.__new__(ref.RandomMamba)
    r.shape = ref.Shape(d, len(bb.layers), vocab=shape_vocab, eps=bb.norm_f.eps)
    r.dtype, r.device = bb.embedding.weight.dtype, bb.embedding.weight.device
    r.embedding, r.norm_f = bb.embedding.weight, bb.norm_f.weight
    r.layers = []
    for b in bb.layers:
        m = b.mixer
        if b.norm.eps != bb.norm_f.eps or m.dt_rank != r.shape.dt_rank or m.d_state != r.shape.d_state:
            raise RuntimeError("layer hyper-parameters differ from the reference's")
        r.layers.append({"norm": b.norm.weight, "in_proj": m.in_proj.weight,
                         "conv_w": m.conv1d.weight, "conv_b": m.conv1d.bias,
                         "x_proj": m.x_proj.weight, "dt_proj": m.dt_proj.weight,
                         "dt_bias": m.dt_proj.bias, "A_log": m.A_log, "D": m.D,
                         "out_proj": m.out_proj.weight})
    return r


def self_check(Model, Config, shape_name, device, L, seed):
    import gpu_reference_bench as ref

    shape = SHAPES[shape_name]
    model, _ = make_model(Model, Config, shape, torch.float32, device, seed + 1)
    ids = random_ids(L, shape.vocab, 11, device)
    with torch.inference_mode():
        fused = model(ids, num_last_tokens=1).logits[:, -1].float()
        plain, _ = reference_from_model(model, padded_vocab(shape.vocab)).forward(
            ids, ref.Scan(ref.reference_scan_fwd, "reference float64"))
    err = ref.rel_err(fused, plain)
    ok = bool(err < CHECK_TOL)
    print(f"self-check ({shape_name}, fp32, L={L}): fused MambaLMHeadModel vs plain PyTorch "
          f"model with a float64 sequential scan, same weights: last-token logits rel L2 err "
          f"{err:.2e} ({'ok' if ok else f'WARNING: above {CHECK_TOL:g}'})", flush=True)
    del model
    return {"check_shape": shape_name, "check_dtype": "fp32", "check_len": L,
            "check_rel_err": err, "check_ok": ok}


# --------------------------------------------------------------------------- CLI


def parse_lengths(spec):
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part:
            try:
                out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
            except ValueError:
                die(f"bad length {part!r} (want an integer, optionally with a k suffix)")
    if not out or min(out) < 1:
        die(f"bad --lengths {spec!r}")
    return out


def norm_dtype(name):
    name = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in DTYPE_NAMES:
        die(f"unknown dtype {name!r} (want one of {', '.join(DTYPE_NAMES)})")
    return name


def parse_runs(spec):
    pairs = []
    for part in spec.split(","):
        if part.strip():
            shape, _, dtype = part.strip().partition(":")
            if shape not in SHAPES:
                die(f"unknown shape {shape!r} (want one of {', '.join(SHAPES)})")
            pairs.append((shape, norm_dtype(dtype or "bf16")))
    if not pairs:
        die(f"bad --runs {spec!r}")
    return pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="SHAPE:DTYPE,... (default 130m:bf16,2.8b:bf16; "
                   "--dry: tiny:fp32,tiny:bf16); shapes 130m, 2.8b, tiny; dtypes bf16, fp32, fp16")
    p.add_argument("--lengths", default=None, help="default 2k,8k,32k,128k (--dry: 64,128)")
    p.add_argument("--reps", type=int, default=None, help="timed prefill reps (default 5; --dry 2)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="new tokens N for decode (default 256; --dry 8; 0 = no decode)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (--dry 16)")
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start (build included) past which no measurement starts")
    p.add_argument("--py", type=Path, default=ROOT / ".ref" / "py",
                   help="folder with mamba_ssm, causal_conv1d, einops (default .ref/py)")
    p.add_argument("--ss-src", type=Path, default=ROOT / ".ref" / "selective_scan")
    p.add_argument("--cc-src", type=Path, default=ROOT / ".ref" / "causal_conv1d")
    p.add_argument("--ss-build-dir", type=Path, default=Path("/tmp/ss_build"),
                   help="selective_scan_cuda build cache (shared with gpu_reference_bench.py)")
    p.add_argument("--cc-build-dir", type=Path, default=Path("/tmp/cc_build"))
    p.add_argument("--std", default=None, help="C++ standard (default as gpu_reference_bench.py)")
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    p.add_argument("--check-len", type=int, default=None, help="default 300 (--dry 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shim-transformers", action="store_true",
                   help="use the transformers stand-in even when transformers is installed")
    p.add_argument("--dry", action="store_true", help="CPU smoke test (see above)")
    p.add_argument("--verbose", action="store_true", help="show the build's compiler lines")
    args = p.parse_args(argv)
    dry = args.dry
    args.runs = parse_runs(args.runs or ("tiny:fp32,tiny:bf16" if dry else "130m:bf16,2.8b:bf16"))
    args.lengths = parse_lengths(args.lengths or ("64,128" if dry else "2k,8k,32k,128k"))
    args.reps = args.reps or (2 if dry else 5)
    args.decode_tokens = (8 if dry else 256) if args.decode_tokens is None else args.decode_tokens
    args.prompt_tokens = args.prompt_tokens or (16 if dry else 128)
    args.check_len = args.check_len or (48 if dry else 300)
    if args.reps < 1 or args.decode_reps < 1 or args.prompt_tokens < 1:
        die("--reps, --decode-reps and --prompt-tokens must be at least 1")
    if args.decode_tokens == 1 or args.decode_tokens < 0:
        die("--decode-tokens must be 0 (no decode) or at least 2")
    return args


class Report:
    """One OUT/fused-<shape>-<dtype>.json, rewritten (atomically) on every save()."""

    def __init__(self, path, data):
        self.path, self.data = path, data
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    def skip(self, length, variant, reason, error=None):
        entry = {"length": length, "variant": variant, "reason": reason}
        if error:
            entry["error"] = error
        self.data["skipped"].append(entry)
        self.save()


def jobs_for(args):
    return ([("decode", args.prompt_tokens)] if args.decode_tokens else []) + \
           [("prefill", L) for L in args.lengths]


def run_without_torch(args, start, time_left):
    """--dry where torch is missing: arguments, transformers shim and JSON only."""
    install_transformers_shim()
    label = "shim (no torch)"
    from transformers.generation import GenerateDecoderOnlyOutput
    from transformers.utils import WEIGHTS_NAME  # noqa: F401
    from transformers.utils.hub import cached_file  # noqa: F401
    assert GenerateDecoderOnlyOutput(sequences=[1], scores=None).sequences == [1]
    print("no torch here: dry run of the arguments, the transformers shim and the JSON only "
          "(stand-in timings)", flush=True)
    for shape_name, dtype_name in args.runs:
        rep = Report(args.out / f"fused-{shape_name}-{dtype_name}.json", base_report(
            args, shape_name, dtype_name, "cpu", "none (dry run, no torch)", None,
            {"transformers": label}))
        for variant, L in jobs_for(args):
            if time_left() is not None and time_left() <= 0:
                rep.skip(L, variant, "deadline")
                continue
            t0 = time.perf_counter()
            sum(i * i for i in range(1000 * L))  # stand-in work
            s = time.perf_counter() - t0
            if variant == "decode":
                rep.data["decode"] = {"prompt_tokens": L, "new_tokens": args.decode_tokens,
                                      "s": s, "tokens_per_s": (args.decode_tokens - 1) / s,
                                      "tok_per_s": (args.decode_tokens - 1) / s,
                                      "method": "stand-in (no torch)"}
            else:
                rep.data["prefill"][str(L)] = {"s": s, "tok_per_s": L / s, "runs_s": [s]}
            rep.save()
        print(f"wrote {rep.path}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def base_report(args, shape_name, dtype_name, device_type, gpu, torch_version, info):
    shape = SHAPES[shape_name]
    return {
        "implementation": IMPLEMENTATION,
        "impl": IMPLEMENTATION,
        "model": f"random-{shape_name}",
        "dtype": dtype_name,
        "device": device_type,
        "threads": 0,
        "prefill": {},
        "decode": None,
        "config": {"d_model": shape.d_model, "n_layer": shape.n_layer,
                   "vocab_size": padded_vocab(shape.vocab), "d_state": 16, "d_conv": 4,
                   "expand": 2, "ssm_layer": "Mamba1", "rms_norm": True,
                   "residual_in_fp32": True, "fused_add_norm": True, "batch": 1},
        "prefill_call": "model(ids, num_last_tokens=1) under torch.inference_mode()",
        "gpu": gpu,
        "torch": torch_version,
        "reps": args.reps,
        "decode_reps": args.decode_reps,
        "dry": bool(args.dry),
        "skipped": [],
        **info,
    }


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)

    def time_left():
        return None if args.deadline is None else args.deadline - (time.perf_counter() - start)

    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(SCRIPTS))
    global torch, F
    try:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    except ImportError:
        if args.dry:
            return run_without_torch(args, start, time_left)
        die("torch is not installed")
    if args.dry:
        device = torch.device("cpu")
        gpu = "none (dry run on CPU)"
    else:
        if not torch.cuda.is_available():
            die("no CUDA device (use --dry for the CPU smoke test)")
        device = torch.device("cuda")
        gpu = torch.cuda.get_device_name(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, stated
    try:
        Model, Config, info = import_mamba(args, args.dry)
    except (Exception, SystemExit) as e:  # build or import: one line, and JSON that says so
        if isinstance(e, SystemExit):
            msg = getattr(e, "msg", None) or (e.code if isinstance(e.code, str) else "see above")
        else:
            tail = traceback.format_exc().strip().splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr, flush=True)
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        for shape_name, dtype_name in args.runs:
            rep = Report(args.out / f"fused-{shape_name}-{dtype_name}.json", base_report(
                args, shape_name, dtype_name, device.type, gpu, torch.__version__, {}))
            for variant, L in jobs_for(args):
                rep.skip(L, variant, "setup failed", msg)
        if isinstance(e, SystemExit):
            if not isinstance(e, Fatal) and isinstance(e.code, str):
                print(e.code, file=sys.stderr, flush=True)  # e.g. gpu_reference_bench's
            sys.exit(1)
        die(f"set-up (build or import of mamba_ssm) failed: {msg}", 1)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(f"torch {torch.__version__} | triton {info['triton']} | mamba_ssm {info['mamba_ssm']} | "
          f"causal_conv1d {info['causal_conv1d']} | transformers: {info['transformers']} | "
          f"device {gpu} | runs {', '.join(f'{s}:{d}' for s, d in args.runs)} | lengths "
          f"{args.lengths} | reps {args.reps} | decode {args.decode_tokens} after "
          f"{args.prompt_tokens}", flush=True)

    failed = False
    check = {}
    if not args.no_check:
        if time_left() is not None and time_left() <= 0:
            check = {"check_skipped": "deadline"}
        else:
            try:
                check = self_check(Model, Config, "tiny" if args.dry else "130m", device,
                                   args.check_len, args.seed)
                failed |= not check["check_ok"]
            except Exception as e:  # keep timing; report the failure
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"self-check failed: {msg}", flush=True)
                check, failed = {"check_error": msg, "check_ok": False}, True
            if device.type == "cuda":
                torch.cuda.empty_cache()

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    for shape_name, dtype_name in args.runs:
        shape = SHAPES[shape_name]
        rep = Report(args.out / f"fused-{shape_name}-{dtype_name}.json", base_report(
            args, shape_name, dtype_name, device.type, gpu, torch.__version__, {**info, **check}))
        jobs = jobs_for(args)
        if time_left() is not None and time_left() <= 0:
            for variant, L in jobs:
                rep.skip(L, variant, "deadline")
            print(f"== {shape_name} {dtype_name}: skipped (deadline)", flush=True)
            continue
        print(f"== {shape_name} {dtype_name}: building random MambaLMHeadModel "
              f"(d_model {shape.d_model}, {shape.n_layer} layers)", flush=True)
        try:
            model, _ = make_model(Model, Config, shape, dtypes[dtype_name], device, args.seed)
        except Exception as e:
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            msg = None if oom else f"{type(e).__name__}: {str(e)[:300]}"
            for variant, L in jobs:
                rep.skip(L, variant, "oom" if oom else "error", msg)
            print(f"== {shape_name} {dtype_name}: model not built ({msg or 'out of memory'})",
                  flush=True)
            failed |= not oom
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(f"{'variant':>8} {'tokens':>8} {'ms':>10} {'tok/s':>12}", flush=True)
        for variant, L in jobs:
            if time_left() is not None and time_left() <= 0:
                rep.skip(L, variant, "deadline")
                print(f"{variant:>8} {L:>8}    skipped (deadline)", flush=True)
                continue
            try:
                with torch.inference_mode():
                    if variant == "decode":
                        res = time_decode(model, L, args.decode_tokens, args.decode_reps,
                                          shape.vocab, device, not args.dry, time_left)
                    else:
                        res = time_prefill(model, L, args.reps, shape.vocab, device, time_left)
            except torch.cuda.OutOfMemoryError:
                model._decoding_cache = None
                torch.cuda.empty_cache()
                rep.skip(L, variant, "oom")
                print(f"{variant:>8} {L:>8}    skipped (out of memory)", flush=True)
                continue
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                rep.skip(L, variant, "error", msg)
                print(f"{variant:>8} {L:>8}    failed: {msg}", flush=True)
                failed = True
                continue
            if variant == "decode":
                rep.data["decode"] = res
                print(f"{variant:>8} {args.decode_tokens:>8} {res['s'] * 1e3:>10.2f} "
                      f"{res['tokens_per_s']:>12.1f}  ({res['decode_steps']} steps after a "
                      f"{L}-token prompt; generate {res['generate_s'] * 1e3:.1f} ms)", flush=True)
            else:
                rep.data["prefill"][str(L)] = res
                print(f"{variant:>8} {L:>8} {res['s'] * 1e3:>10.2f} {res['tok_per_s']:>12.0f}",
                      flush=True)
            rep.save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"wrote {rep.path}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s" + ("; FAILED (see above)" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
