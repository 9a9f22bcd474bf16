#!/usr/bin/env python3
"""Times the reference GPU implementation of Mamba-1 prefill (mamba_ssm's selective-scan
CUDA kernel driven by plain PyTorch), vanilla and DeciMamba, on random-weight models, and
writes the same JSON layout as `decimamba bench --json` so that scripts/gpu_compare.py can
put the two side by side.

What is timed
-------------
The non-fused path of mamba_ssm's Mamba-1 block (the one the DeciMamba authors' code
runs), with batch 1: embedding -> per layer [residual += hidden (fp32 residual); RMSNorm;
in_proj -> x, z; causal depthwise conv1d (kernel 4) + SiLU; x_proj -> dt, B, C; dt_proj
(weight only); `selective_scan_cuda.fwd` with D, z gating, the dt_proj bias as delta_bias
and delta_softplus; out_proj] -> final RMSNorm -> tied LM head on the last token. The
DeciMamba variant (--decimated) scores each token at layer 12 (0-based, --decimate-layer)
by the L2 norm over channels of softplus(dt + dt_bias), keeps the top --keep tokens among
all but the last (in position order) plus the last, and runs the scan of that layer and
every later layer on the kept tokens only. Each measurement is 1 warm-up and --reps timed
forwards (torch.cuda.synchronize() around each), reported as the median.

The kernel is the `selective_scan` extension of the mamba-ssm sdist, built at start-up
with torch.utils.cpp_extension.load from --src (the sdist's csrc/selective_scan folder):
only selective_scan.cpp and the three selective_scan_fwd_*.cu files, plus
scripts/selective_scan_bwd_stub.cpp in place of the backward kernels, for sm_90 only
(about a minute with MAX_JOBS=16). The build is cached in --build-dir.

Runs
----
`--runs SHAPE:DTYPE,...` names the (shape, dtype) pairs to time, in order (e.g.
`130m:bf16,2.8b:bf16,130m:fp32`). Without --runs, the product of --shapes and --dtypes
is timed, shape-major. Shapes: 130m (d_model 768, 24 layers), 2.8b (2560, 64), and tiny
(64, 14, vocab 512; for --dry). Dtypes: bf16, fp32 (fp16 also works). Lengths take a k
suffix (k = 1024). Each (shape, dtype) writes OUT/ref-<shape>-<dtype>.json, rewritten
after every measurement, so an interrupted run keeps what it measured. Once --deadline
seconds (counted from the start of the script, build included) have passed, remaining
measurements are not started and are listed under "skipped"; the reps of a measurement
are also cut down (to at least 1) when its warm-up says they would run past the deadline.
A measurement that runs out of GPU memory is listed under "skipped" too.

Before timing (unless --no-check) a cheap self-check runs: the 130m shape in fp32 at
L = 300, last-token logits of the kernel path against the same model with a float64
sequential reference scan (relative L2 error -> "check_rel_err"), the same for a
decimated forward that keeps 100 tokens ("check_decimated_rel_err"), and DeciMamba with
--keep >= L-1 (no-op, and through the gather path with every index) against vanilla
("check_keep_all_max_abs_diff", which should be 0).

On the GPU machine (copy the sdist's csrc/selective_scan to .ref/selective_scan and carry it):

    python3 scripts/gpu_reference_bench.py --src .ref/selective_scan \\
        --runs 130m:bf16,2.8b:bf16,130m:fp32 --lengths 2k,8k,32k,128k \\
        --decimated --deadline 480 --out $OUT

CPU smoke test (no build; the float64 reference scan stands in for the kernel; tiny shape):

    python3 scripts/gpu_reference_bench.py --dry --out /tmp/refdry
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IMPLEMENTATION = "mamba_ssm selective_scan (non-fused PyTorch path)"

NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-gencode",
    "arch=compute_90,code=sm_90",
]
KERNEL_SOURCES = [
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu",
    "selective_scan_fwd_fp16.cu",
    "selective_scan_fwd_bf16.cu",
]
STUB = Path(__file__).resolve().parent / "selective_scan_bwd_stub.cpp"

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_ALIASES = {"f32": "fp32", "float32": "fp32", "bfloat16": "bf16", "f16": "fp16"}


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    vocab: int = 50280
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    eps: float = 1e-5

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.d_model / 16)


SHAPES = {
    "130m": Shape(768, 24),
    "2.8b": Shape(2560, 64),
    "tiny": Shape(64, 14, vocab=512),
}


# --------------------------------------------------------------------------- the scan


def reference_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A float64 sequential selective scan with the signature and return value of
    `selective_scan_cuda.fwd`: u, delta, z are (batch, dim, L); A is (dim, dstate) (real);
    B and C are (batch, n_groups, dstate, L) (or (dim, dstate), constant over time); D and
    delta_bias are (dim,). Returns [out, last_state, out_z] where out = y (with the D skip)
    and out_z = y * silu(z), both in u's dtype (the kernel's second item holds per-chunk
    states; here it is the final state (batch, dim, dstate), float64). Without z it
    returns [out, last_state]."""
    batch, dim, L = u.shape
    dt = delta.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uu = u.double()
    Ad = A.double()

    def per_channel(M):  # -> (batch, dim, dstate, L) or (1, dim, dstate, 1)
        if M.dim() == 2:
            return M.double()[None, :, :, None]
        groups = M.shape[1]
        return M.double().repeat_interleave(dim // groups, dim=1)

    Bd, Cd = per_channel(B), per_channel(C)
    h = torch.zeros(batch, dim, Ad.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(L):
        tb = t if Bd.shape[-1] > 1 else 0
        tc = t if Cd.shape[-1] > 1 else 0
        h = torch.exp(dt[:, :, t, None] * Ad) * h + (dt[:, :, t] * uu[:, :, t])[..., None] * Bd[..., tb]
        ys.append((h * Cd[..., tc]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else torch.zeros_like(uu)
    if D is not None:
        y = y + uu * D.double()[:, None]
    result = [y.to(u.dtype), h]
    if z is not None:
        result.append((y * F.silu(z.double())).to(u.dtype))
    return result


class Scan:
    """Calls a `fwd` with selective_scan_cuda's signature the way mamba_ssm's
    selective_scan_fn does for inference: last dims made unit-stride, 3-d B/C given a
    group axis, and the z-gated output returned when z is given."""

    def __init__(self, fwd, name):
        self.fwd = fwd
        self.name = name

    def __call__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
        def unit_stride(t):
            return t if t is None or t.stride(-1) == 1 else t.contiguous()

        u, delta, z, B, C = (unit_stride(t) for t in (u, delta, z, B, C))
        if B.dim() == 3:
            B = B.unsqueeze(1)
        if C.dim() == 3:
            C = C.unsqueeze(1)
        out = self.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return out[2] if z is not None else out[0]


def build_kernel(src: Path, build_dir: Path, std: str, verbose: bool):
    """Builds (or loads from build_dir's cache) the forward-only selective_scan_cuda."""
    missing = [n for n in KERNEL_SOURCES if not (src / n).is_file()]
    if missing or not (src / "selective_scan.h").is_file():
        sys.exit(f"error: --src {src} lacks {missing or ['selective_scan.h']} "
                 "(want the sdist's csrc/selective_scan folder)")
    if not STUB.is_file():
        sys.exit(f"error: {STUB} not found")
    sources = [src / n for n in KERNEL_SOURCES] + [STUB]
    return build_extension("selective_scan_cuda", src, sources, build_dir, std, verbose)


def build_extension(name: str, src: Path, sources, build_dir: Path, std: str, verbose: bool):
    """Builds (or loads from build_dir's cache) the CUDA extension `name` from `sources`,
    with `src` on the include path, for sm_90 (NVCC_FLAGS); returns it and the seconds."""
    from torch.utils.cpp_extension import load

    os.environ.setdefault("MAX_JOBS", "16")
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"building {name} from {src} in {build_dir} "
          f"(-std={std}, MAX_JOBS={os.environ['MAX_JOBS']})...", flush=True)
    t0 = time.perf_counter()
    module = load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", f"-std={std}"],
        extra_cuda_cflags=NVCC_FLAGS + [f"-std={std}"],
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        verbose=verbose,
    )
    build_s = time.perf_counter() - t0
    print(f"build {name}: {build_s:.1f} s", flush=True)
    return module, build_s


def default_std() -> str:
    """c++17 as mamba_ssm builds, unless this torch's headers need C++20 (torch >= 2.12)."""
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 12) else "c++17"


# --------------------------------------------------------------------------- the model


class RandomMamba:
    """A Mamba-1 language model of `shape` with random weights in `dtype` (A_log, D and the
    dt bias in fp32, as mamba_ssm keeps them), laid out as mamba_ssm's modules hold them."""

    def __init__(self, shape: Shape, dtype, device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, device
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        d, di, n, r, k = shape.d_model, shape.d_inner, shape.d_state, shape.dt_rank, shape.d_conv

        def normal(*size, std):
            w = torch.randn(*size, generator=g, device=device, dtype=torch.float32) * std
            return w.to(dtype)

        self.embedding = normal(shape.vocab, d, std=0.02)
        self.layers = []
        for _ in range(shape.n_layer):
            # dt = softplus(bias) log-uniform in [1e-3, 1e-1]; bias = softplus^-1(dt).
            dt = torch.exp(
                torch.rand(di, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            )
            self.layers.append({
                "norm": torch.ones(d, device=device, dtype=dtype),
                "in_proj": normal(2 * di, d, std=d ** -0.5),
                "conv_w": normal(di, 1, k, std=k ** -0.5),
                "conv_b": normal(di, std=0.1),
                "x_proj": normal(r + 2 * n, di, std=di ** -0.5),
                "dt_proj": normal(di, r, std=r ** -0.5),
                "dt_bias": dt + torch.log(-torch.expm1(-dt)),
                "A_log": torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=device))
                .repeat(di, 1).contiguous(),
                "D": torch.ones(di, device=device, dtype=torch.float32),
                "out_proj": normal(d, di, std=di ** -0.5),
            })
        self.norm_f = torch.ones(d, device=device, dtype=dtype)

    def rms_norm(self, x32, weight):
        """RMSNorm of an fp32 tensor, computed in fp32, returned in the model dtype."""
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.eps)
        return (y * weight.float()).to(self.dtype)

    def mixer(self, h, w, scan, decimate=None):
        """One Mamba-1 mixer on h (batch, L, d_model). `decimate` = (keep, force_gather) at
        the decimating layer. Returns (output (batch, L', d_model), kept indices or None)."""
        s = self.shape
        batch, L, d = h.shape
        di, n, r = s.d_inner, s.d_state, s.dt_rank
        # in_proj as one matmul over (batch*L) tokens, to (batch, 2*d_inner, L).
        xz = (w["in_proj"] @ h.reshape(batch * L, d).t()).view(2 * di, batch, L).permute(1, 0, 2)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, w["conv_w"], w["conv_b"], padding=s.d_conv - 1, groups=di)[..., :L])
        x_dbl = F.linear(x.transpose(1, 2).reshape(batch * L, di), w["x_proj"])
        dt, B, C = x_dbl.split([r, n, n], dim=-1)
        dt = (w["dt_proj"] @ dt.t()).view(di, batch, L).permute(1, 0, 2)
        B = B.view(batch, L, n).transpose(1, 2).contiguous()
        C = C.view(batch, L, n).transpose(1, 2).contiguous()
        A = -torch.exp(w["A_log"].float())

        kept = None
        if decimate is not None:
            keep, force_gather = decimate
            if L - 1 > keep or force_gather:
                kept = self.select_tokens(dt, w["dt_bias"], min(keep, L - 1))
                x, dt, B, C, z = (gather_time(t, kept) for t in (x, dt, B, C, z))

        y = scan(x, dt, A, B, C, w["D"], z, w["dt_bias"], delta_softplus=True)
        return F.linear(y.transpose(1, 2), w["out_proj"]), kept

    @staticmethod
    def select_tokens(dt, dt_bias, keep):
        """DeciMamba's selection: the `keep` tokens among all but the last with the largest
        L2 norm (over channels) of softplus(dt + bias), in position order, then the last."""
        batch, _, L = dt.shape
        score = F.softplus(dt.float() + dt_bias[None, :, None]).norm(dim=1)  # (batch, L)
        top = score[:, : L - 1].topk(keep, dim=-1).indices.sort(dim=-1).values
        last = torch.full((batch, 1), L - 1, dtype=top.dtype, device=top.device)
        return torch.cat([top, last], dim=-1)

    def forward(self, ids, scan, decimate_layer=None, keep=None, force_gather=False):
        """Last-token logits (batch, vocab) in fp32, and the sequence length leaving each
        decimating layer."""
        h = F.embedding(ids, self.embedding)
        residual = None
        kept_per_layer = []
        for i, w in enumerate(self.layers):
            residual = h.float() if residual is None else residual + h.float()
            dec = (keep, force_gather) if i == decimate_layer else None
            h, kept = self.mixer(self.rms_norm(residual, w["norm"]), w, scan, dec)
            if dec is not None:
                if kept is not None:
                    residual = residual.gather(
                        1, kept[:, :, None].expand(-1, -1, residual.shape[-1]))
                kept_per_layer.append(h.shape[1])
        residual = residual + h.float()
        last = self.rms_norm(residual[:, -1], self.norm_f)
        return F.linear(last, self.embedding).float(), kept_per_layer


def gather_time(t, idx):
    """t (batch, channels, L) at time indices idx (batch, L') -> (batch, channels, L')."""
    return t.gather(2, idx[:, None, :].expand(-1, t.shape[1], -1))


# --------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_prefill(model, L, scan, reps, decimate_layer, keep, time_left):
    """1 warm-up + up to `reps` timed forwards of L random tokens; the reps are cut (to at
    least 1) when the warm-up says they would outlast `time_left()` seconds."""
    g = torch.Generator(device=model.device)
    g.manual_seed(L)
    ids = torch.randint(0, min(model.shape.vocab, 50000), (1, L), generator=g,
                        device=model.device)
    kept = []

    def once():
        nonlocal kept
        sync(model.device)
        t0 = time.perf_counter()
        logits, kept = model.forward(ids, scan, decimate_layer, keep)
        sync(model.device)
        dt = time.perf_counter() - t0
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"non-finite logits at L={L}")
        del logits
        return dt

    warm = once()
    n = reps
    left = time_left()
    if left is not None:
        n = max(1, min(reps, int(left / max(warm, 1e-9))))
    runs = [once() for _ in range(n)]
    s = statistics.median(runs)
    res = {"s": s, "tok_per_s": L / s, "runs_s": runs}
    if decimate_layer is not None:
        res["kept_per_layer"] = kept
    return res


# --------------------------------------------------------------------------- self-check


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def self_check(shape_name, device, kernel_scan, keep, decimate_layer, L=300):
    """Kernel path vs float64 reference scan (vanilla and decimated), and keep-all
    decimation vs vanilla. Returns a dict of the numbers."""
    ref_scan = Scan(reference_scan_fwd, "reference float64")
    model = RandomMamba(SHAPES[shape_name], torch.float32, device, seed=1)
    g = torch.Generator(device=device)
    g.manual_seed(7)
    ids = torch.randint(0, min(model.shape.vocab, 50000), (1, L), generator=g, device=device)
    out = {"check_shape": shape_name, "check_dtype": "fp32", "check_len": L}
    with torch.inference_mode():
        k_van, _ = model.forward(ids, kernel_scan)
        r_van, _ = model.forward(ids, ref_scan)
        out["check_rel_err"] = rel_err(k_van, r_van)
        small = min(100, L - 2)
        k_dec, kept = model.forward(ids, kernel_scan, decimate_layer, small)
        r_dec, _ = model.forward(ids, ref_scan, decimate_layer, small)
        assert kept == [small + 1], kept
        out["check_decimated_keep"] = small
        out["check_decimated_rel_err"] = rel_err(k_dec, r_dec)
        out["check_decimated_vs_vanilla_rel_err"] = rel_err(k_dec, k_van)
        diffs = []
        for k in (L - 1, max(keep, L - 1)):
            for force in (False, True):
                logits, kept = model.forward(ids, kernel_scan, decimate_layer, k, force)
                assert kept == [L], kept
                diffs.append((logits - k_van).abs().max().item())
        out["check_keep_all_max_abs_diff"] = max(diffs)
    print(f"self-check ({shape_name}, fp32, L={L}, {kernel_scan.name} vs float64 reference scan): "
          f"rel err {out['check_rel_err']:.2e}; decimated to {small + 1} tokens: rel err "
          f"{out['check_decimated_rel_err']:.2e} (vs vanilla {out['check_decimated_vs_vanilla_rel_err']:.2e}); "
          f"keep-all vs vanilla max |diff| {out['check_keep_all_max_abs_diff']:.2e}", flush=True)
    ok = (out["check_rel_err"] < 1e-3 and out["check_decimated_rel_err"] < 1e-3
          and out["check_keep_all_max_abs_diff"] == 0.0)
    if not ok:
        print("WARNING: self-check outside tolerance (rel err < 1e-3, keep-all diff == 0)",
              flush=True)
    out["check_ok"] = ok
    return out


# --------------------------------------------------------------------------- CLI


def parse_lengths(spec):
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            sys.exit(f"error: bad length {part!r} (want an integer, optionally with a k suffix)")
    return out


def norm_dtype(name):
    name = name.strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        sys.exit(f"error: unknown dtype {name!r} (want one of {', '.join(DTYPES)})")
    return name


def parse_runs(args):
    if args.runs:
        pairs = []
        for part in args.runs.split(","):
            if not part.strip():
                continue
            shape, _, dtype = part.strip().partition(":")
            pairs.append((shape, norm_dtype(dtype or "bf16")))
    else:
        pairs = [(s.strip(), norm_dtype(d)) for s in args.shapes.split(",") if s.strip()
                 for d in args.dtypes.split(",") if d.strip()]
    for shape, _ in pairs:
        if shape not in SHAPES:
            sys.exit(f"error: unknown shape {shape!r} (want one of {', '.join(SHAPES)})")
    return pairs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="mamba-ssm sdist's csrc/selective_scan folder")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/ss_build"))
    p.add_argument("--std", default=None,
                   help="C++ standard for the build (default c++17; c++20 for torch >= 2.12)")
    p.add_argument("--runs", help="SHAPE:DTYPE,... (overrides --shapes x --dtypes)")
    p.add_argument("--shapes", default="130m,2.8b")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--lengths", default=None, help="default 2k,8k,32k,128k (--dry: 64,128)")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 5; --dry: 2)")
    p.add_argument("--decimated", action="store_true",
                   help="also time DeciMamba prefill (always on with --dry)")
    p.add_argument("--keep", type=int, default=None,
                   help="tokens kept at the decimating layer (default 2000; --dry: 40)")
    p.add_argument("--decimate-layer", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start past which no new measurement begins")
    p.add_argument("--no-check", action="store_true", help="skip the correctness self-check")
    p.add_argument("--check-len", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry", action="store_true",
                   help="CPU smoke test: no build, float64 reference scan, tiny shape")
    p.add_argument("--verbose", action="store_true", help="show the build's compiler lines")
    args = p.parse_args()

    start = time.perf_counter()

    def time_left():
        return None if args.deadline is None else args.deadline - (time.perf_counter() - start)

    if args.dry:
        if not args.runs and args.shapes == "130m,2.8b":
            args.runs = "tiny:fp32,tiny:bf16"
        args.lengths = args.lengths or "64,128"
        args.reps = args.reps or 2
        args.keep = args.keep if args.keep is not None else 40
        args.decimated = True
        device = torch.device("cpu")
    else:
        args.lengths = args.lengths or "2k,8k,32k,128k"
        args.reps = args.reps or 5
        args.keep = args.keep if args.keep is not None else 2000
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device (use --dry for the CPU smoke test)")
        if args.src is None:
            sys.exit("error: --src (the sdist's csrc/selective_scan folder) is required")
        device = torch.device("cuda")
    runs = parse_runs(args)
    lengths = parse_lengths(args.lengths)
    args.out.mkdir(parents=True, exist_ok=True)

    build_s = None
    if args.dry:
        scan = Scan(reference_scan_fwd, "reference float64 (dry)")
        gpu = "none (dry run on CPU)"
    else:
        module, build_s = build_kernel(args.src.resolve(), args.build_dir, args.std or default_std(),
                                       args.verbose)
        scan = Scan(module.fwd, "selective_scan_cuda.fwd")
        gpu = torch.cuda.get_device_name(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, stated: fp32 matmuls stay fp32
    print(f"torch {torch.__version__} | device {gpu} | runs "
          f"{', '.join(f'{s}:{d}' for s, d in runs)} | lengths {lengths} | reps {args.reps}"
          + (f" | decimated: layer {args.decimate_layer} keeps {args.keep}" if args.decimated else ""),
          flush=True)

    check = {}
    if not args.no_check:
        check = self_check("tiny" if args.dry else "130m", device, scan, args.keep,
                           args.decimate_layer, args.check_len)

    for shape_name, dtype_name in runs:
        shape = SHAPES[shape_name]
        report = {
            "implementation": IMPLEMENTATION,
            "impl": IMPLEMENTATION,
            "model": f"random-{shape_name}",
            "dtype": dtype_name,
            "device": device.type,
            "threads": 0,
            "prefill": {},
            "prefill_decimated": {},
            "decimation": {"layer": args.decimate_layer, "keep": args.keep,
                           "score": "l2 norm over channels of softplus(dt + dt_bias)"}
            if args.decimated else None,
            "build_s": build_s,
            "gpu": gpu,
            "torch": torch.__version__,
            "reps": args.reps,
            "skipped": [],
            **check,
        }
        path = args.out / f"ref-{shape_name}-{dtype_name}.json"

        def save():
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(path)

        jobs = [(L, variant) for L in lengths
                for variant in (("prefill", "prefill_decimated") if args.decimated else ("prefill",))]
        if time_left() is not None and time_left() <= 0:
            report["skipped"] += [{"length": L, "variant": v, "reason": "deadline"} for L, v in jobs]
            save()
            print(f"== {shape_name} {dtype_name}: skipped (deadline)", flush=True)
            continue
        print(f"== {shape_name} {dtype_name}: building random model "
              f"(d_model {shape.d_model}, {shape.n_layer} layers)", flush=True)
        try:
            model = RandomMamba(shape, DTYPES[dtype_name], device, seed=args.seed)
        except torch.cuda.OutOfMemoryError:
            report["skipped"] += [{"length": L, "variant": v, "reason": "oom"} for L, v in jobs]
            save()
            continue
        save()
        print(f"{'length':>8} {'variant':>18} {'ms':>10} {'tok/s':>12}  kept", flush=True)
        for L, variant in jobs:
            left = time_left()
            if left is not None and left <= 0:
                report["skipped"].append({"length": L, "variant": variant, "reason": "deadline"})
                save()
                print(f"{L:>8} {variant:>18}    skipped (deadline)", flush=True)
                continue
            dec_layer = args.decimate_layer if variant == "prefill_decimated" else None
            try:
                with torch.inference_mode():
                    res = time_prefill(model, L, scan, args.reps, dec_layer, args.keep, time_left)
            except torch.cuda.OutOfMemoryError:
                report["skipped"].append({"length": L, "variant": variant, "reason": "oom"})
                torch.cuda.empty_cache()
                save()
                print(f"{L:>8} {variant:>18}    skipped (out of memory)", flush=True)
                continue
            report[variant][str(L)] = res
            save()
            print(f"{L:>8} {variant:>18} {res['s'] * 1e3:>10.2f} {res['tok_per_s']:>12.0f}  "
                  f"{res.get('kept_per_layer', '')}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"wrote {path}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
