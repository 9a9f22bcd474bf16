// CUDA kernels of the Mamba-1 model (decimamba), compiled at run time by NVRTC with
// -DNSTATE=<d_state>, -DDCONV=<d_conv> and -DELEM=<0: f32, 1: bf16, 2: f16>, the model's
// dtype.
//
// Activations travel in the model dtype (`elem`); the recurrent state, the residual
// stream and every accumulation are f32. Where the model rounds to its dtype (a GEMM's
// output, a cast before a norm) the kernels round the same way, so the fused paths
// compute what the unfused ops would.
//
// Layouts are token-major, as in the CPU kernels (src/model/kernels.rs): element
// (b, t, d) of an [B, L, D] tensor sits at b*L*D + t*D + d unless strides say otherwise.
// No headers: NVRTC then needs no include path, and the 16-bit conversions are a few
// instructions written out below.

#ifndef NSTATE
#define NSTATE 16
#endif
#ifndef ELEM
#define ELEM 0
#endif
#ifndef DCONV
#define DCONV 4
#endif

typedef long long i64;

#if ELEM == 0
typedef float elem;
__device__ __forceinline__ float ld(elem v) { return v; }
__device__ __forceinline__ elem st(float v) { return v; }
#elif ELEM == 1
typedef unsigned short elem;  // bfloat16: the high half of an f32
__device__ __forceinline__ float ld(elem v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ elem st(float f) {  // round to nearest even, as __float2bfloat16
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (elem)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (elem)(u >> 16);
}
#else
typedef unsigned short elem;  // IEEE half
__device__ __forceinline__ float ld(elem v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ elem st(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// The value `v` takes once stored in the model dtype.
__device__ __forceinline__ float rnd(float v) { return ld(st(v)); }

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// 2^x in one MUFU instruction (relative error ~2^-22; tiny results flush to 0). The scan
// evaluates d_state of these per token and channel: they bound its speed.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 2^x for x <= 0 on the FMA pipe: round x to an integer i with the 1.5*2^23 shift, a degree-5
// polynomial for 2^f on f = x - i in [-0.5, 0.5] with p(0) = 1 exactly (a zeroed Δ must keep the
// state: decay 1, as ex2.approx gives; the other coefficients fitted by iterated relative-error
// least squares; max relative error 1.9e-7 in f32, like ex2.approx's 2^-22.5; p(f) <= 1 for
// f <= 0, so no decay exceeds 1), and i added to the exponent bits. x is clamped at -125 so the result stays normal (2^-125 where ex2.approx.ftz
// gives 0). The scan evaluates SCAN_POLY_EXP of each token's NSTATE exponentials this way,
// so that the MUFU and FMA pipes share the work (the balance FlashAttention-4 strikes for
// softmax).
__device__ __forceinline__ float poly_exp2(float x) {
    x = fmaxf(x, -125.0f);
    const float shifted = x + 12582912.0f;
    const float f = x - (shifted - 12582912.0f);
    float p = 0.001326472731307149f;
    p = fmaf(p, f, 0.009671512991189957f);
    p = fmaf(p, f, 0.05550733581185341f);
    p = fmaf(p, f, 0.24022242426872253f);
    p = fmaf(p, f, 0.6931470036506653f);
    p = fmaf(p, f, 1.0f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(shifted) << 23));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// softplus(v) = max(v, 0) + log1p(e^-|v|), stable for any v (as the CPU kernels).
__device__ __forceinline__ float softplus_f(float v) {
    return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename T>
__device__ T block_sum(T v, T* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // `sh` may still be read from a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sh[lane] : (T)0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

// ---------------------------------------------------------------------------------------
// Norm statistics of one row of the residual stream, as Norm::forward computes them: the
// row is first cast to the model dtype, then RMSNorm (nb == 0) or LayerNorm. Returns
// (mean, 1/std); for RMSNorm the mean is 0. `row(i)` yields the f32 residual value i.
template <typename Row>
__device__ float2 norm_stats(Row row, int D, float eps, bool layer_norm, float* sh) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = rnd(row(i));
        s += layer_norm ? v : v * v;
    }
    s = block_sum(s, sh);
    if (!layer_norm) return make_float2(0.0f, rsqrtf(s / D + eps));
    const float mean = s / D;
    float q = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = rnd(row(i)) - mean;
        q += v * v;
    }
    q = block_sum(q, sh);
    return make_float2(mean, rsqrtf(q / D + eps));
}

__device__ __forceinline__ float norm_apply(float v, float2 st_, const elem* w, const elem* b,
                                            int i) {
    float o = (rnd(v) - st_.x) * st_.y * ld(w[i]);
    if (b) o += ld(b[i]);
    return rnd(o);
}

// Residual add + norm of a prefill, one warp per row of D:
//   r' = r + delta (rounded to the model dtype when the residual is kept in it)
//   out = norm(r') in the model dtype, r' first cast to it (as Norm::forward).
// delta == 0: no add (r' = r, res_out unused). out == 0: only the add. LayerNorm when
// b != 0, else RMSNorm.
extern "C" __global__ void add_norm(const float* __restrict__ res_in,
                                    const elem* __restrict__ delta, float* __restrict__ res_out,
                                    const elem* __restrict__ w, const elem* __restrict__ b,
                                    elem* __restrict__ out, int rows, int D, float eps,
                                    int round_res) {
    const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const i64 base = row * D;
    const bool layer_norm = b != 0;
    float s = 0.0f;
    // Each lane reads back only the elements it wrote.
    const float* r = (delta ? res_out : res_in) + base;
    for (int i = lane; i < D; i += 32) {
        float v = res_in[base + i];
        if (delta) {
            v += ld(delta[base + i]);
            if (round_res) v = rnd(v);
            res_out[base + i] = v;
        }
        const float x = rnd(v);
        s += layer_norm ? x : x * x;
    }
    if (!out) return;
    s = warp_sum(s);
    float mean = 0.0f, rstd;
    if (layer_norm) {
        mean = s / D;
        float q = 0.0f;
        for (int i = lane; i < D; i += 32) {
            const float x = rnd(r[i]) - mean;
            q += x * x;
        }
        rstd = rsqrtf(warp_sum(q) / D + eps);
    } else {
        rstd = rsqrtf(s / D + eps);
    }
    const float2 st_ = make_float2(mean, rstd);
    for (int i = lane; i < D; i += 32) out[base + i] = st(norm_apply(r[i], st_, w, b, i));
}

// ---------------------------------------------------------------------------------------
// Causal depthwise conv1d + SiLU over `L` tokens, with the DCONV-1 inputs that precede
// the chunk in `hist` ([B, DCONV-1, D], f32); the input x is the first D columns of rows
// of `xz` (token (b, t) at b*bs + t*rs). Grid (channel blocks, time tiles, batch): a
// thread runs `tile` consecutive tokens of one channel with the window in registers, so
// every input is read once. The thread whose tile ends the chunk writes the new window
// (the last DCONV-1 inputs of hist ++ chunk) into `new_hist`.
extern "C" __global__ void conv_silu(const elem* __restrict__ xz, i64 bs, i64 rs,
                                     const float* __restrict__ hist,
                                     const float* __restrict__ wt,  // [DCONV, D]
                                     const float* __restrict__ bias, elem* __restrict__ out,
                                     float* __restrict__ new_hist, int L, int D, int tile) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.z;
    const int t0 = blockIdx.y * tile;
    if (d >= D || t0 >= L) return;
    const int W = DCONV - 1;
    const elem* xb = xz + b * bs + d;
    float w[DCONV], win[DCONV > 1 ? DCONV - 1 : 1];
#pragma unroll
    for (int j = 0; j < DCONV; ++j) w[j] = wt[(i64)j * D + d];
#pragma unroll
    for (int j = 0; j < W; ++j) {  // inputs t0-W .. t0-1, oldest first
        const int p = t0 - W + j;
        win[j] = p >= 0 ? ld(xb[(i64)p * rs]) : hist[((i64)b * W + (W + p)) * D + d];
    }
    const float bi = bias[d];
    const int t1 = min(L, t0 + tile);
    elem* ob = out + (i64)b * L * D + d;
#pragma unroll 8
    for (int t = t0; t < t1; ++t) {
        const float xv = ld(xb[(i64)t * rs]);
        float acc = bi + w[W] * xv;  // tap j multiplies the input W-j steps back
#pragma unroll
        for (int j = 0; j < W; ++j) acc += w[j] * win[j];
#pragma unroll
        for (int j = 0; j + 1 < W; ++j) win[j] = win[j + 1];
        if (W > 0) win[W - 1] = xv;
        ob[(i64)t * D] = st(silu_f(acc));
    }
    if (t1 == L) {
#pragma unroll
        for (int j = 0; j < W; ++j) new_hist[((i64)b * W + j) * D + d] = win[j];
    }
}

// Δ under a layer plan (policy/mod.rs): softplus(dt + bias), scaled per channel, then 0
// where it is ≤ the channel's threshold (−∞: untouched). Vanilla passes 1 and −∞.
__device__ __forceinline__ float planned_delta(float dt, float bias, float scale, float thresh) {
    const float v = softplus_f(dt + bias) * scale;
    return v <= thresh ? 0.0f : v;
}

// The keep rule's token score ‖Δ_t‖₂ over the D channels, Δ under the plan, one block per
// token (the L2 norm of Δ_t, Ben-Kish et al. 2025, §4). Summed in f64 like the CPU.
extern "C" __global__ void delta_norms(const elem* __restrict__ dt, const float* __restrict__ bias,
                                       const float* __restrict__ dscale,
                                       const float* __restrict__ dthresh,
                                       float* __restrict__ out, int D) {
    __shared__ double sh[32];
    const i64 base = (i64)blockIdx.x * D;
    double s = 0.0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        double v = planned_delta(ld(dt[base + i]), bias[i], dscale[i], dthresh[i]);
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)sqrt(s);
}

// Exclusive prefix sum over the block (blockDim.x = 1024 = 32 warps); also returns the
// block total through `total`. `sh` holds 33 ints.
__device__ int block_exclusive_scan(int v, int* sh, int* total) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();  // `sh` may still be read from a previous call
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = sh[lane];
        int wx = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, wx, o);
            if (lane >= o) wx += y;
        }
        sh[lane] = wx - w;  // exclusive prefix of the warp totals
        if (lane == 31) sh[32] = wx;
    }
    __syncthreads();
    *total = sh[32];
    return sh[warp] + x - v;
}

// The keep rule's choice of tokens on the GPU, one block of 1024 threads: among the first C
// positions, the K with the largest scores (ties to the earlier position, as
// select_by_scores on the CPU), in ascending order, then the protected tail C..L-1.
// Writes idx[0 .. K + L - C). Scores are ≥ 0, so their bit patterns order like their
// values: a most-significant-byte-first radix select finds the K-th largest score T, then
// one ordered pass keeps every score > T and the earliest ones equal to T.
extern "C" __global__ void select_top_k(const float* __restrict__ scores, int C, int K, int L,
                                        unsigned* __restrict__ idx) {
    __shared__ unsigned hist[256];
    __shared__ unsigned found[2];  // the chosen byte, and how many of the K remain
    __shared__ int sh[33];
    unsigned prefix = 0, mask = 0, remaining = (unsigned)K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < C; i += blockDim.x) {
            const unsigned u = __float_as_uint(scores[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned acc = 0;
            int bin = 255;
            for (; bin > 0; --bin) {
                if (acc + hist[bin] >= remaining) break;
                acc += hist[bin];
            }
            found[0] = (unsigned)bin;
            found[1] = remaining - acc;
        }
        __syncthreads();
        prefix |= found[0] << shift;
        mask |= 255u << shift;
        remaining = found[1];
        __syncthreads();
    }
    // prefix = T, the K-th largest score; `remaining` of the scores equal to T are kept.
    int out_base = 0, eq_base = 0;
    for (int start = 0; start < C; start += blockDim.x) {
        const int i = start + threadIdx.x;
        const unsigned u = i < C ? __float_as_uint(scores[i]) : 0u;
        const bool gt = i < C && u > prefix;
        const bool eq = i < C && u == prefix;
        int eq_total, take_total;
        const int eq_rank = eq_base + block_exclusive_scan(eq ? 1 : 0, sh, &eq_total);
        const bool take = gt || (eq && eq_rank < (int)remaining);
        const int pos = out_base + block_exclusive_scan(take ? 1 : 0, sh, &take_total);
        if (take) idx[pos] = (unsigned)i;
        out_base += take_total;
        eq_base += eq_total;
    }
    for (int j = threadIdx.x; j < L - C; j += blockDim.x) idx[K + j] = (unsigned)(C + j);
}

// ---------------------------------------------------------------------------------------
// Selective scan (Gu & Dao 2023, Alg. 2) with the discretisation, softplus and gate fused:
//   Δ_t = softplus(dt_t + bias) under the layer plan (planned_delta),  h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,
//   y_t = (C_t · h_t + D x_t) · SiLU(z_t).
// One thread per (batch, channel), its NSTATE states in registers, f32 arithmetic; B_t and
// C_t, shared by every channel, are staged through shared memory a tile of steps at a
// time. blockIdx.y is a chunk of the time axis, so that short batches still fill the
// GPU: every chunk but the last is first scanned from a zero state (scan_chunk_summary:
// its end state S and Σ Δ), the summaries are chained in order per (g, n) (scan_combine:
// chunk c starts from exp(A ΣΔ_{c-1}) h_in(c-1) + S_{c-1}), and each chunk is scanned
// again from its true initial state, writing y (scan_output). Memory is
// O(n_chunks · B · D · N): no [B, D, L, N] tensor.
#define LOG2E 1.4426950408889634f
// Tuning of the scan (register use vs. occupancy), overridable at compile time. Unrolling
// 8 steps: 36.3 ms against 39.0 (4 steps) for a 130m bf16 prefill at 32K on an H100.
#ifndef SCAN_UNROLL
#define SCAN_UNROLL 8
#endif
#ifndef SCAN_MIN_BLOCKS
#define SCAN_MIN_BLOCKS 4
#endif
// Steps of B/C staged per barrier pair.
#ifndef TILE
#define TILE 32
#endif
// 1: load the next tile of B/C into registers while this one is scanned, so that the
// global loads are not on the critical path between the barriers.
#ifndef SCAN_PREFETCH
#define SCAN_PREFETCH 1
#endif
// Elements of a B (or C) tile each of the block's 128 threads stages.
#define TILE_PER_THREAD ((TILE * NSTATE + 127) / 128)
// How many of a token's NSTATE decays exp(Δ A_n) use poly_exp2 instead of MUFU (the last
// ones); 0 keeps every one on MUFU.
#ifndef SCAN_POLY_EXP
#define SCAN_POLY_EXP 0
#endif
__device__ __forceinline__ float scan_decay(int n, float x) {
    return n >= NSTATE - SCAN_POLY_EXP ? poly_exp2(x) : fast_exp2(x);
}
#define STRINGIFY(x) #x
#define PRAGMA_UNROLL(n) _Pragma(STRINGIFY(unroll n))

#define SCAN_PARAMS                                                                          \
    const elem *__restrict__ x, const elem *__restrict__ dt,                                 \
        const float *__restrict__ dt_bias, const float *__restrict__ dscale,                   \
        const float *__restrict__ dthresh, const elem *__restrict__ bc, i64 bc_bs, i64 bc_rs, \
        int b_off, int c_off, const elem *__restrict__ z, i64 z_bs, i64 z_rs,                \
        const float *__restrict__ A, const float *__restrict__ Dskip, int B, int L, int D,    \
        int chunk_len

// N floats of a row in shared memory into registers, 16 bytes per load where N allows (the
// row then starts 16-byte aligned). The chunked scan reads B_t and C_t (N = NSTATE: every
// channel of the block reads the same row, so broadcasts, and fewer of them), the
// single-pass scan a lane's steps (N = SS_ITEMS).
template <int N>
__device__ __forceinline__ void load_row(float* dst, const float* row) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 v = reinterpret_cast<const float4*>(row)[q];
            dst[4 * q] = v.x;
            dst[4 * q + 1] = v.y;
            dst[4 * q + 2] = v.z;
            dst[4 * q + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int n = 0; n < N; ++n) dst[n] = row[n];
    }
}

// A scan channel's constants: dt_proj's bias, the skip D, and the plan's Δ scale and
// filter threshold (the neutral values stand for a channel past D).
struct ChannelConsts {
    float bias = 0.0f, dskip = 0.0f, scale = 1.0f, thresh = 0.0f;
};
__device__ __forceinline__ ChannelConsts channel_consts(int d, const float* __restrict__ dt_bias,
                                                        const float* __restrict__ Dskip,
                                                        const float* __restrict__ dscale,
                                                        const float* __restrict__ dthresh) {
    ChannelConsts c;
    c.bias = dt_bias[d];
    c.dskip = Dskip[d];
    c.scale = dscale[d];
    c.thresh = dthresh[d];
    return c;
}

template <bool OUT>
__device__ void scan_body(SCAN_PARAMS, const float* __restrict__ hin, i64 hin_c, i64 hin_g,
                          i64 hin_n, float* __restrict__ S, float* __restrict__ T,
                          float* __restrict__ h1, elem* __restrict__ y) {
    __shared__ __align__(16) float sB[TILE][NSTATE];
    __shared__ __align__(16) float sC[OUT ? TILE : 1][NSTATE];
    const int b = blockIdx.z, c = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = d < D;
    const i64 G = (i64)B * D, g = (i64)b * D + d;
    float a2[NSTATE], h[NSTATE];
    ChannelConsts ch;
    if (active) {
        ch = channel_consts(d, dt_bias, Dskip, dscale, dthresh);
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            a2[n] = A[(i64)d * NSTATE + n] * LOG2E;
            h[n] = OUT ? hin[c * hin_c + g * hin_g + n * hin_n] : 0.0f;
        }
    }
    float sdt = 0.0f;
    const int t0 = c * chunk_len;
    const int t1 = min(L, t0 + chunk_len);
    const elem* bcb = bc + b * bc_bs;
    // Tile loads: element i = threadIdx.x + 128 j of a tile's [TILE][NSTATE] B (and C) rows.
    float pb[TILE_PER_THREAD], pc[TILE_PER_THREAD];
    auto fetch = [&](int tt) {
        const int nt = min(TILE, t1 - tt);
#pragma unroll
        for (int j = 0; j < TILE_PER_THREAD; ++j) {
            const int i = threadIdx.x + 128 * j;
            const int k = i / NSTATE, n = i % NSTATE;
            if (k < nt) {
                const elem* row = bcb + (i64)(tt + k) * bc_rs;
                pb[j] = ld(row[b_off + n]);
                if (OUT) pc[j] = ld(row[c_off + n]);
            }
        }
    };
    if (SCAN_PREFETCH && t0 < t1) fetch(t0);
    for (int tt = t0; tt < t1; tt += TILE) {
        const int nt = min(TILE, t1 - tt);
        __syncthreads();
        if (!SCAN_PREFETCH) fetch(tt);
#pragma unroll
        for (int j = 0; j < TILE_PER_THREAD; ++j) {
            const int i = threadIdx.x + 128 * j;
            const int k = i / NSTATE, n = i % NSTATE;
            if (k < nt) {
                sB[k][n] = pb[j];
                if (OUT) sC[k][n] = pc[j];
            }
        }
        __syncthreads();
        if (SCAN_PREFETCH && tt + TILE < t1) fetch(tt + TILE);
        if (!active) continue;
        PRAGMA_UNROLL(SCAN_UNROLL)
        for (int k = 0; k < nt; ++k) {
            const int t = tt + k;
            const i64 r = ((i64)b * L + t) * D + d;
            const float delta = planned_delta(ld(dt[r]), ch.bias, ch.scale, ch.thresh);
            const float xv = ld(x[r]);
            const float dx = delta * xv;
            float bk[NSTATE];
            load_row<NSTATE>(bk, sB[k]);
            if (OUT) {
                float ck[NSTATE];
                load_row<NSTATE>(ck, sC[k]);
                float acc = 0.0f;
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) {
                    h[n] = scan_decay(n, delta * a2[n]) * h[n] + dx * bk[n];
                    acc += h[n] * ck[n];
                }
                const float zv = ld(z[b * z_bs + (i64)t * z_rs + d]);
                y[r] = st((acc + ch.dskip * xv) * __fdividef(zv, 1.0f + __expf(-zv)));
            } else {
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) h[n] = scan_decay(n, delta * a2[n]) * h[n] + dx * bk[n];
                sdt += delta;
            }
        }
    }
    if (!active) return;
    if (OUT) {
        if (c == gridDim.y - 1) {
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) h1[g * NSTATE + n] = h[n];
        }
    } else {
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) S[((i64)c * NSTATE + n) * G + g] = h[n];
        T[(i64)c * G + g] = sdt;
    }
}

// S: [n_chunks][NSTATE][B*D] end states from zero; T: [n_chunks][B*D] sums of Δ.
extern "C" __global__ void __launch_bounds__(128, SCAN_MIN_BLOCKS)
    scan_chunk_summary(SCAN_PARAMS, float* __restrict__ S,
                                              float* __restrict__ T) {
    scan_body<false>(x, dt, dt_bias, dscale, dthresh, bc, bc_bs, bc_rs, b_off, c_off, z, z_bs, z_rs, A, Dskip, B,
                     L, D, chunk_len, 0, 0, 0, 0, S, T, 0, 0);
}

// One thread per (n, g): replaces S[c] by chunk c's initial state, chaining from h0
// ([B*D][NSTATE]). S has n_chunks slots; the last one's summary is not needed.
extern "C" __global__ void scan_combine(const float* __restrict__ A,
                                        const float* __restrict__ h0, float* __restrict__ S,
                                        const float* __restrict__ T, int B, int D,
                                        int n_chunks) {
    const int G = B * D;  // B*D*NSTATE < 2^31: the state itself is one allocation
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= G * NSTATE) return;
    const int n = i / G;
    const int g = i % G;
    const int d = g % D;
    const float a2 = A[(i64)d * NSTATE + n] * LOG2E;
    float carry = h0[g * NSTATE + n];
    // The chain is serial; the loads are not: issue four chunks' S and T before using them
    // (the compiler cannot, since S is also written).
    const int last = n_chunks - 1;
    int c = 0;
    for (; c + 4 <= last; c += 4) {
        float s4[4], e4[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            s4[j] = S[((i64)(c + j) * NSTATE + n) * G + g];
            e4[j] = fast_exp2(a2 * T[(i64)(c + j) * G + g]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            S[((i64)(c + j) * NSTATE + n) * G + g] = carry;
            carry = e4[j] * carry + s4[j];
        }
    }
    for (; c < last; ++c) {
        const i64 o = ((i64)c * NSTATE + n) * G + g;
        const float s = S[o];
        S[o] = carry;
        carry = fast_exp2(a2 * T[(i64)c * G + g]) * carry + s;
    }
    S[((i64)(n_chunks - 1) * NSTATE + n) * G + g] = carry;
}

// Chunk c from its initial state hin[c*hin_c + g*hin_g + n*hin_n]; writes y, and the
// final state h1 ([B*D][NSTATE]) from the last chunk.
extern "C" __global__ void __launch_bounds__(128, SCAN_MIN_BLOCKS) scan_output(SCAN_PARAMS, const float* __restrict__ hin, i64 hin_c,
                                       i64 hin_g, i64 hin_n, float* __restrict__ h1,
                                       elem* __restrict__ y) {
    scan_body<true>(x, dt, dt_bias, dscale, dthresh, bc, bc_bs, bc_rs, b_off, c_off, z, z_bs, z_rs, A, Dskip, B,
                    L, D, chunk_len, hin, hin_c, hin_g, hin_n, 0, 0, h1, y);
}

// ---------------------------------------------------------------------------------------
// Single-pass selective scan: each d_state exponential once per token, against twice in the
// chunked scan above (its summary pass, then its output pass). One warp per (batch, channel)
// walks the sequence in windows of 32 · SS_ITEMS steps: lane l holds steps l·SS_ITEMS ..
// +SS_ITEMS of the window. For each state n a lane folds its steps into (P, S) — the decay
// exp(A_n ΣΔ) of its steps and their state from zero — a warp scan of those pairs (Blelloch
// 1990's first-order recurrence, as mamba_ssm's selective_scan_fwd does across threads) gives
// each lane the state entering its steps, and the lane replays them with the decays it kept
// in registers, accumulating C_t · h_t. The window's end state carries to the next one.
// SS_CHANNELS warps (adjacent channels) share one block, so that B_t and C_t, common to every
// channel, and the channels' Δ and x are staged once per window through shared memory, read
// from global memory in whole rows. SS_CHANNELS and SS_ITEMS come from the host
// (gpu_plan::SingleScan), which also checks that the tiles fit the device's shared memory.
#ifndef SS_CHANNELS
#define SS_CHANNELS 4
#endif
#ifndef SS_ITEMS
#define SS_ITEMS 8
#endif
#define SS_WINDOW (32 * SS_ITEMS)
#define SS_THREADS (32 * SS_CHANNELS)
// Channel-tile elements each thread stages (the window's steps × channels over the threads).
#define SS_PER_THREAD SS_ITEMS
// B/C elements of one row group a thread loads before storing them.
#ifndef SS_LOADS
#define SS_LOADS 8
#endif
// States per iteration of the state loop: all of them (registers only) by default; fewer
// keep the loop's code small (a2 and the carried state then sit in shared memory).
#ifndef SS_STATE_UNROLL
#define SS_STATE_UNROLL NSTATE
#endif
// Tiles are [lane][item]. With SS_ITEMS a multiple of 4 a row holds SS_ITEMS floats, plus 4
// where that makes the row an even number of 16-byte units, so that the lanes read their
// items 16 bytes at a time with each quarter-warp on distinct banks; otherwise rows of
// SS_ITEMS + 1, read a float at a time (32 banks for 32 lanes). The strides between tiles
// are padded so that the staging stores (2 steps × 16 states, or 8 steps × 4 channels per
// warp) spread over the banks too.
#if SS_ITEMS % 4 == 0
#define SS_ROW (SS_ITEMS % 8 == 0 ? SS_ITEMS + 4 : SS_ITEMS)
#else
#define SS_ROW (SS_ITEMS + 1)
#endif
#define SS_BC_STRIDE (32 * SS_ROW + 4)
#define SS_CH_STRIDE (32 * SS_ROW + 8)
#define SS_AT(j) (((j) / SS_ITEMS) * SS_ROW + (j) % SS_ITEMS)
// Grid: (⌈D / SS_CHANNELS⌉, 1, batch), SS_CHANNELS warps per block, and
// 4 · (2 · NSTATE · SS_BC_STRIDE + 2 · SS_CHANNELS · SS_CH_STRIDE) bytes of dynamic shared
// memory (gpu_plan::SingleScan::smem_bytes). From h0 ([B*D][NSTATE]); writes y and the
// final state h1 (same layout).
extern "C" __global__ void __launch_bounds__(SS_THREADS)
    scan_single(SCAN_PARAMS, const float* __restrict__ h0, float* __restrict__ h1,
                elem* __restrict__ y) {
    extern __shared__ __align__(16) float ss_smem[];
    float* sB = ss_smem;
    float* sC = sB + NSTATE * SS_BC_STRIDE;
    float* sDelta = sC + NSTATE * SS_BC_STRIDE;
    float* sX = sDelta + SS_CHANNELS * SS_CH_STRIDE;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int b = blockIdx.z;
    const int d0 = blockIdx.x * SS_CHANNELS;
    const int d = d0 + w;
    const bool active = d < D;
    const i64 g = (i64)b * D + d;
#if SS_STATE_UNROLL < NSTATE
    // A rolled state loop indexes a2 and carry at run time: they live in shared memory.
    __shared__ float ss_state[SS_CHANNELS][2][NSTATE];
    float* a2 = ss_state[w][0];
    float* carry = ss_state[w][1];
#else
    float a2[NSTATE], carry[NSTATE];
#endif
    if (active) {
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            a2[n] = A[(i64)d * NSTATE + n] * LOG2E;
            carry[n] = h0[g * NSTATE + n];
        }
    }
    // The channel this thread stages (blockDim.x is a multiple of SS_CHANNELS).
    const int sc = threadIdx.x % SS_CHANNELS, sd = d0 + sc;
    const bool s_active = sd < D;
    ChannelConsts ch;
    if (s_active) ch = channel_consts(sd, dt_bias, Dskip, dscale, dthresh);
    const elem* bcb = bc + b * bc_bs;
    const int base = w * SS_CH_STRIDE + lane * SS_ROW;
    for (int t0 = 0; t0 < L; t0 += SS_WINDOW) {
        const int nt = min(SS_WINDOW, L - t0);
        __syncthreads();  // the previous window's output is read out of sDelta and sX
        // Steps past the end get Δ = 0 and B = 0: decay 1 and no input, so they change nothing.
        // Each thread issues SS_LOADS rows' loads before its first store, so that a window's
        // staging waits on a few memory latencies, not on one per element.
        for (int i0 = 0; i0 < SS_WINDOW * NSTATE; i0 += SS_THREADS * SS_LOADS) {
            float bv[SS_LOADS], cv[SS_LOADS];
#pragma unroll
            for (int u = 0; u < SS_LOADS; ++u) {
                const int i = i0 + u * SS_THREADS + threadIdx.x, j = i / NSTATE, n = i % NSTATE;
                bv[u] = cv[u] = 0.0f;
                if (i < SS_WINDOW * NSTATE && j < nt) {
                    const elem* row = bcb + (i64)(t0 + j) * bc_rs;
                    bv[u] = ld(row[b_off + n]);
                    cv[u] = ld(row[c_off + n]);
                }
            }
#pragma unroll
            for (int u = 0; u < SS_LOADS; ++u) {
                const int i = i0 + u * SS_THREADS + threadIdx.x, j = i / NSTATE, n = i % NSTATE;
                if (i < SS_WINDOW * NSTATE) {
                    sB[n * SS_BC_STRIDE + SS_AT(j)] = bv[u];
                    sC[n * SS_BC_STRIDE + SS_AT(j)] = cv[u];
                }
            }
        }
        {
            float dv[SS_PER_THREAD], xv[SS_PER_THREAD];
#pragma unroll
            for (int u = 0; u < SS_PER_THREAD; ++u) {
                const int j = (u * SS_THREADS + threadIdx.x) / SS_CHANNELS;
                dv[u] = xv[u] = 0.0f;
                if (j < nt && s_active) {
                    const i64 r = ((i64)b * L + t0 + j) * D + sd;
                    dv[u] = ld(dt[r]);
                    xv[u] = ld(x[r]);
                }
            }
#pragma unroll
            for (int u = 0; u < SS_PER_THREAD; ++u) {
                const int j = (u * SS_THREADS + threadIdx.x) / SS_CHANNELS;
                const bool in = j < nt && s_active;
                sDelta[sc * SS_CH_STRIDE + SS_AT(j)] = in ? planned_delta(dv[u], ch.bias, ch.scale, ch.thresh) : 0.0f;
                sX[sc * SS_CH_STRIDE + SS_AT(j)] = xv[u];
            }
        }
        __syncthreads();
        if (active) {
            float delta[SS_ITEMS], dx[SS_ITEMS], acc[SS_ITEMS];
            load_row<SS_ITEMS>(delta, sDelta + base);
            load_row<SS_ITEMS>(dx, sX + base);
            float dsum = 0.0f;
#pragma unroll
            for (int k = 0; k < SS_ITEMS; ++k) {
                dx[k] *= delta[k];
                acc[k] = 0.0f;
                dsum += delta[k];
            }
            PRAGMA_UNROLL(SS_STATE_UNROLL)
            for (int n = 0; n < NSTATE; ++n) {
                float decay[SS_ITEMS], input[SS_ITEMS], ck[SS_ITEMS];
                load_row<SS_ITEMS>(input, sB + n * SS_BC_STRIDE + lane * SS_ROW);
                float s = 0.0f;
#pragma unroll
                for (int k = 0; k < SS_ITEMS; ++k) {
                    decay[k] = fast_exp2(delta[k] * a2[n]);
                    input[k] *= dx[k];
                    s = fmaf(decay[k], s, input[k]);
                }
                // The lane's decay in one exponential: Π_k exp(Δ_k A) = exp(A ΣΔ).
                float p = fast_exp2(dsum * a2[n]);
                // Inclusive scan over the lanes of (P, S) ∘ (P', S') = (P P', P' S + S').
#pragma unroll
                for (int off = 1; off < 32; off <<= 1) {
                    const float pp = __shfl_up_sync(0xffffffffu, p, off);
                    const float sp = __shfl_up_sync(0xffffffffu, s, off);
                    if (lane >= off) {
                        s = fmaf(p, sp, s);
                        p *= pp;
                    }
                }
                const float pe = __shfl_up_sync(0xffffffffu, p, 1);
                const float se = __shfl_up_sync(0xffffffffu, s, 1);
                float h = lane == 0 ? carry[n] : fmaf(pe, carry[n], se);
                load_row<SS_ITEMS>(ck, sC + n * SS_BC_STRIDE + lane * SS_ROW);
#pragma unroll
                for (int k = 0; k < SS_ITEMS; ++k) {
                    h = fmaf(decay[k], h, input[k]);
                    acc[k] = fmaf(h, ck[k], acc[k]);
                }
                // The window's end state: where the last lane's replay ended.
                carry[n] = __shfl_sync(0xffffffffu, h, 31);
            }
            __syncwarp();
#pragma unroll
            for (int k = 0; k < SS_ITEMS; ++k) sDelta[base + k] = acc[k];
        }
        __syncthreads();
        float zv[SS_PER_THREAD];
#pragma unroll
        for (int u = 0; u < SS_PER_THREAD; ++u) {
            const int j = (u * SS_THREADS + threadIdx.x) / SS_CHANNELS;
            zv[u] = j < nt && s_active ? ld(z[b * z_bs + (i64)(t0 + j) * z_rs + sd]) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SS_PER_THREAD; ++u) {
            const int j = (u * SS_THREADS + threadIdx.x) / SS_CHANNELS;
            if (j < nt && s_active) {
                const int o = sc * SS_CH_STRIDE + SS_AT(j);
                y[((i64)b * L + t0 + j) * D + sd] =
                    st((sDelta[o] + ch.dskip * sX[o]) * __fdividef(zv[u], 1.0f + __expf(-zv[u])));
            }
        }
    }
    if (active) {
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) h1[g * NSTATE + n] = carry[n];
    }
}

// ---------------------------------------------------------------------------------------
// Decode: one token per sequence, B ≤ MAXB sequences. A layer is four launches —
// norm + in_proj + conv step, x_proj, dt_proj + scan step + gate, out_proj + residual
// add — with the conv window and SSM state updated in place; or four stages of the one
// persistent launch per token (decode_persistent, at the end of this file).
#define MAXB 8

// Elements of one 16-byte load.
#define VEC (16 / (int)sizeof(elem))

__device__ __forceinline__ void unpack(uint4 u, float* w) {
#if ELEM == 0
    w[0] = __uint_as_float(u.x);
    w[1] = __uint_as_float(u.y);
    w[2] = __uint_as_float(u.z);
    w[3] = __uint_as_float(u.w);
#else
    const unsigned p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[2 * i] = ld((elem)(p[i] & 0xffffu));
        w[2 * i + 1] = ld((elem)(p[i] >> 16));
    }
#endif
}

// 1: the decode matvecs stage their input with 16-byte loads, four per thread in flight
// (2.8b decode 203 → 245 tokens/s on an H100, docs/gpu-benchmarks.md); 0: one scalar
// load per thread and step.
#ifndef STAGE_VEC
#define STAGE_VEC 1
#endif

// store(c, load(c)) for c < nv over the block's threads, four loads per thread in flight
// before the first store (T: a 16-byte vector, zero when value-initialised).
template <typename T, typename Load, typename Store>
__device__ __forceinline__ void copy_chunks(int nv, Load load, Store store) {
    for (int i = threadIdx.x; i < nv; i += 4 * blockDim.x) {
        T q[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = i + j * blockDim.x;
            q[j] = c < nv ? load(c) : T{};
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = i + j * blockDim.x;
            if (c < nv) store(c, q[j]);
        }
    }
}

// Loads of activations that another block of the same launch may have written: with CG
// (the persistent decode step) they go to L2 (ld.global.cg), as L1 and the read-only
// cache are not kept coherent within a launch; without it, plain loads.
template <bool CG>
__device__ __forceinline__ uint4 ld_u4(const uint4* p) {
    if (!CG) return *p;
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
template <bool CG>
__device__ __forceinline__ float4 ld_f4(const float4* p) {
    if (!CG) return *p;
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}
template <bool CG>
__device__ __forceinline__ float ld_f(const float* p) {
    if (!CG) return *p;
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
template <bool CG>
__device__ __forceinline__ float ld_e(const elem* p) {
    if (!CG) return ld(*p);
#if ELEM == 0
    return ld_f<true>(p);
#else
    unsigned short v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return ld((elem)v);
#endif
}

// Stages the B input rows of a decode matvec in shared memory as f32 (B*K floats), x in
// the model dtype, row stride K. Every block stages the whole input before its first
// product, so this is latency that every decode kernel pays.
template <bool CG = false>
__device__ void stage_plain(float* xs, const elem* __restrict__ x, int B, int K) {
    const int n = B * K;
    if (STAGE_VEC && n % VEC == 0 && reinterpret_cast<unsigned long long>(x) % 16 == 0) {
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        copy_chunks<uint4>(
            n / VEC, [&](int c) { return ld_u4<CG>(xv + c); },
            [&](int c, uint4 q) {
                float w[8];
                unpack(q, w);
#pragma unroll
                for (int e = 0; e < VEC; ++e) xs[c * VEC + e] = w[e];
            });
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = ld_e<CG>(x + i);
    }
}

// ... x = norm(residual), weight nw, bias nb (0: RMSNorm). With STAGE_VEC the f32 rows are
// copied in 16-byte loads, then normalised in place (each thread owns the same elements in
// the statistics and the update, as norm_stats sums them, so the result is the same as
// reading the residual directly).
template <bool CG = false>
__device__ void stage_norm(float* xs, const float* __restrict__ res, const elem* __restrict__ nw,
                           const elem* __restrict__ nb, float eps, int B, int K, float* sh) {
    if (!STAGE_VEC) {
        for (int b = 0; b < B; ++b) {
            const float* r = res + (i64)b * K;
            const float2 s = norm_stats([&](int i) { return ld_f<CG>(r + i); }, K, eps, nb != 0, sh);
            for (int i = threadIdx.x; i < K; i += blockDim.x)
                xs[b * K + i] = norm_apply(ld_f<CG>(r + i), s, nw, nb, i);
        }
        return;
    }
    const int n = B * K;
    if (n % 4 == 0 && reinterpret_cast<unsigned long long>(res) % 16 == 0) {
        const float4* rv = reinterpret_cast<const float4*>(res);
        float4* xv = reinterpret_cast<float4*>(xs);
        copy_chunks<float4>(
            n / 4, [&](int c) { return ld_f4<CG>(rv + c); }, [&](int c, float4 q) { xv[c] = q; });
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = ld_f<CG>(res + i);
    }
    __syncthreads();
    for (int b = 0; b < B; ++b) {
        float* r = xs + (i64)b * K;
        const float2 s = norm_stats([&](int i) { return r[i]; }, K, eps, nb != 0, sh);
#pragma unroll 4
        for (int i = threadIdx.x; i < K; i += blockDim.x) r[i] = norm_apply(r[i], s, nw, nb, i);
    }
}

// The conv step that in_proj's kernel runs for each of the first D of its output rows
// (the x half of xz): the warp that produced x_t for channel d also convolves it with the
// window ([B, DCONV-1, D], slot DCONV-2 the newest input), writes SiLU of that in the
// model dtype (as the prefill's conv output) and shifts the window. One warp owns a
// channel, so the in-place update needs no synchronisation.
struct ConvStep {
    float* window;
    const float* wt;    // [DCONV, D]
    const float* bias;  // [D]
    elem* out;          // [B, D]
    int D;
};

__device__ __forceinline__ void conv_step(const ConvStep& c, int b, int d, float xin) {
    const int W = DCONV - 1;
    float* s = c.window + (i64)b * W * c.D + d;
    float acc = c.bias[d] + c.wt[(i64)W * c.D + d] * xin;
#pragma unroll
    for (int j = 0; j < W; ++j) acc += c.wt[(i64)j * c.D + d] * s[(i64)j * c.D];
#pragma unroll
    for (int j = 0; j + 1 < W; ++j) s[(i64)j * c.D] = s[(i64)(j + 1) * c.D];
    s[(i64)(W - 1) * c.D] = xin;
    c.out[(i64)b * c.D + d] = st(silu_f(acc));
}

// Weight loads each lane of a decode matvec keeps in flight (16 bytes each), and the
// blocks of 256 threads per SM its registers must allow.
#ifndef MATVEC_UNROLL
#define MATVEC_UNROLL 4
#endif
#ifndef MATVEC_MIN_BLOCKS
#define MATVEC_MIN_BLOCKS 3
#endif
#define MATVEC_BOUNDS __launch_bounds__(256, MATVEC_MIN_BLOCKS)
// 1: a lane's next group of weight loads is issued before the current one is multiplied,
// across row ends too (2.8b bf16 decode 267 → 291 tokens/s at 3 blocks per SM on an H100,
// docs/gpu-benchmarks.md); 0: each group is loaded, then multiplied.
#ifndef MATVEC_PIPELINE
#define MATVEC_PIPELINE 1
#endif

// Programmatic dependent launch (sm_90+): a decode kernel launched with the attribute may
// start while the kernel before it finishes; griddep_wait() returns once that kernel has
// completed and its writes are visible, and everything before it may only read what no
// earlier kernel of the step writes (the weights). Without the attribute both are no-ops.
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Weights a decode kernel prefetches into L2 for the kernels after it (host:
// gpu_plan::decode_prefetch): the weight stream then runs a fixed number of bytes ahead of
// the matvecs, so HBM keeps streaming through the latency-bound stages (x_proj, the scan
// step) and the kernel boundaries. `n` ranges of 16-byte-aligned bytes at `ranges`
// (address, length pairs); n 0: none.
struct Prefetch {
    const i64* ranges;
    int n;
};

// 1: prefetch 128-byte lines with prefetch.global.L2 even where the bulk prefetch exists.
#ifndef L2_PREFETCH_LINES
#define L2_PREFETCH_LINES 0
#endif

// Part `part` of `parts` of this block's share of the prefetches: each range is cut into
// parts × gridDim.x pieces of whole 16-byte units (the last ones may be empty), part-major, so that at every part the
// grid prefetches the next stretch of each range in the order the later kernel reads it.
// sm_90: one thread hands its pieces to the bulk-copy unit (cp.async.bulk.prefetch.L2),
// which fetches them without holding the thread; before: the block's threads issue one
// line prefetch each per 128 bytes.
__device__ __forceinline__ void prefetch_part(Prefetch pf, int part, int parts) {
    // 32-bit division: a 64-bit one is a subroutine with a stack frame. A range is under
    // 64 GiB (host: decode_prefetch).
    const unsigned pieces = (unsigned)parts * gridDim.x, piece = part * gridDim.x + blockIdx.x;
    for (int r = 0; r < pf.n; ++r) {
        const unsigned units = (unsigned)(pf.ranges[2 * r + 1] >> 4);
        const unsigned per = units / pieces + (units % pieces != 0);
        const i64 u0 = min((i64)piece * per, (i64)units), u1 = min(u0 + per, (i64)units);
        const char* p = reinterpret_cast<const char*>(pf.ranges[2 * r]) + u0 * 16;
        const i64 len = (u1 - u0) * 16;
#if __CUDA_ARCH__ >= 900 && !L2_PREFETCH_LINES
        if (threadIdx.x == 0)
            for (i64 o = 0; o < len; o += 1 << 16) {
                const unsigned bytes = (unsigned)min((i64)1 << 16, len - o);
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(bytes)
                             : "memory");
            }
#else
        for (i64 o = (i64)threadIdx.x * 128; o < len; o += (i64)blockDim.x * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
#endif
    }
}

// Rounds of rows a decode matvec of N rows, `rows` per block, takes: its prefetches come
// in that many parts (at least one).
__device__ __forceinline__ int prefetch_parts(int N, int rows) {
    const int groups = (N + rows - 1) / rows;
    return max(1, (groups + (int)gridDim.x - 1) / (int)gridDim.x);
}

// 1: the matvecs' weight loads ask L2 to evict their lines first, so that a stream of
// weights not prefetched does not push out the prefetched ones before they are read.
#ifndef MATVEC_EVICT_FIRST
#define MATVEC_EVICT_FIRST 0
#endif

// One 16-byte load of weights (read once a step: no L1 allocation).
__device__ __forceinline__ uint4 ld_weights(const uint4* p) {
#if MATVEC_EVICT_FIRST && __CUDA_ARCH__ >= 800
    uint4 v;
    asm volatile(
        "{\n\t.reg .b64 pol;\n\t"
        "createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n\t"
        "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], pol;\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
#else
    return __ldg(p);
#endif
}

// A warp's share of a decode matvec: `split` warps per row, each a contiguous slice
// [u0, u1) of the row's 16-byte chunks (or elements, without vec_ok).
struct MatvecSlice {
    int rows, slot, rloc, u0, u1;
};

__device__ __forceinline__ MatvecSlice matvec_slice(int K, int vec_ok, int split) {
    const int warp = threadIdx.x >> 5;
    const int units = vec_ok ? K / VEC : K;
    const int per = (units + split - 1) / split;
    MatvecSlice s;
    s.rows = (blockDim.x >> 5) / split;
    s.slot = warp % split;
    s.rloc = warp / split;
    s.u0 = s.slot * per;
    s.u1 = min(units, s.u0 + per);
    return s;
}

// The first MATVEC_UNROLL weight loads of this lane (block's first rows), issued before
// griddep_wait so that they overlap the previous kernel.
__device__ __forceinline__ void first_loads(uint4* pre, const elem* __restrict__ W, int K, int N,
                                            int vec_ok, int split) {
    const MatvecSlice sl = matvec_slice(K, vec_ok, split);
    const int n = blockIdx.x * sl.rows + sl.rloc, lane = threadIdx.x & 31;
    const uint4* wv = reinterpret_cast<const uint4*>(W + (i64)n * K);
#pragma unroll
    for (int j = 0; j < MATVEC_UNROLL; ++j) {
        const int u = sl.u0 + lane + 32 * j;
        pre[j] = vec_ok && n < N && u < sl.u1 ? ld_weights(wv + u) : make_uint4(0, 0, 0, 0);
    }
}

// acc[b] += w[0..VEC) · xs[b, k..k+VEC), the staged rows read 16 bytes at a time (K·4 is a
// multiple of 16 whenever the weights are read 16 bytes at a time).
__device__ __forceinline__ void fma_chunk(float* acc, const float* w, const float* xs, int B, int K,
                                          int k) {
#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
        if (b < B) {
            const float4* xv = reinterpret_cast<const float4*>(xs + (i64)b * K + k);
#pragma unroll
            for (int q = 0; q < VEC / 4; ++q) {
                const float4 v = xv[q];
                acc[b] += w[4 * q] * v.x;
                acc[b] += w[4 * q + 1] * v.y;
                acc[b] += w[4 * q + 2] * v.z;
                acc[b] += w[4 * q + 3] * v.w;
            }
        }
    }
}

// y[b, n] = W[n, :] · xs[b, :] for b < B (W is [N, K] row-major). `split` warps of a block
// share a row (split divides the block's warps): each takes a contiguous slice of K,
// reading W 16 bytes at a time when vec_ok with MATVEC_UNROLL loads in flight per lane,
// and the block adds the slices' sums in slice order (gpu_plan.rs: decode_split). The
// product is rounded to the model dtype, then the bias added and rounded again (as a GEMM
// followed by a broadcast add); then
//   OUT = 0: stored in the model dtype; OUT = 1: stored as f32 (logits);
//   OUT = 2: added to the f32 residual in place (rounded when round_res);
//   OUT = 3: stored in the model dtype, and rows n < conv.D run the conv step.
// `pre` holds the lane's first loads (first_loads). Each round of rows after the first
// issues the next part of the block's prefetches (the first is issued before
// griddep_wait), one part per round, so they keep pace with the weights read.
template <int OUT, bool CG = false>
__device__ void matvec_rows(const float* xs, const elem* __restrict__ W,
                            const elem* __restrict__ bias, void* __restrict__ yout, int B, int K,
                            int N, int vec_ok, int split, int round_res, const uint4* pre,
                            ConvStep conv = ConvStep{}, const i64* pf_ranges = nullptr,
                            int pf_n = 0) {
    __shared__ float part[MAXB][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const MatvecSlice sl = matvec_slice(K, vec_ok, split);
    const int rows = sl.rows, slot = sl.slot, rloc = sl.rloc, u0 = sl.u0, u1 = sl.u1;
    uint4 q[MATVEC_UNROLL];  // MATVEC_PIPELINE: the lane's current group of weight loads
#pragma unroll
    for (int j = 0; j < MATVEC_UNROLL; ++j) q[j] = pre[j];
    const Prefetch pf{pf_ranges, pf_n};
    const int parts = prefetch_parts(N, rows);
    int round = 0;
    // n0 is the same for the whole block, so every thread meets the barriers.
    for (int n0 = blockIdx.x * rows; n0 < N; n0 += gridDim.x * rows) {
        if (round > 0) prefetch_part(pf, round, parts);
        ++round;
        const int n = n0 + rloc;
        float acc[MAXB];
#pragma unroll
        for (int b = 0; b < MAXB; ++b) acc[b] = 0.0f;
        if (n < N) {
            const elem* wr = W + (i64)n * K;
            if (vec_ok && MATVEC_PIPELINE) {
                // While one group of loads is multiplied the next is in flight, whether it
                // lies in this row or in the warp's next one (n + stride), so the stream of
                // weight loads does not drain at row ends.
                const int stride = gridDim.x * rows;
                for (int u = u0 + lane; u < u1; u += 32 * MATVEC_UNROLL) {
                    const bool same = u + 32 * MATVEC_UNROLL < u1;
                    const int nn = same ? n : n + stride;
                    const int ub = same ? u + 32 * MATVEC_UNROLL : u0 + lane;
                    const uint4* wn = reinterpret_cast<const uint4*>(W + (i64)nn * K);
                    uint4 next[MATVEC_UNROLL];
#pragma unroll
                    for (int j = 0; j < MATVEC_UNROLL; ++j)
                        next[j] = nn < N && ub + 32 * j < u1 ? ld_weights(wn + ub + 32 * j)
                                                             : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int j = 0; j < MATVEC_UNROLL; ++j) {
                        if (u + 32 * j < u1) {
                            float w[8];
                            unpack(q[j], w);
                            fma_chunk(acc, w, xs, B, K, (u + 32 * j) * VEC);
                        }
                    }
#pragma unroll
                    for (int j = 0; j < MATVEC_UNROLL; ++j) q[j] = next[j];
                }
            } else if (vec_ok) {
                const uint4* wv = reinterpret_cast<const uint4*>(wr);
                for (int u = u0 + lane; u < u1; u += 32 * MATVEC_UNROLL) {
                    const bool first = n0 == (int)blockIdx.x * rows && u == u0 + lane;
                    uint4 g[MATVEC_UNROLL];
#pragma unroll
                    for (int j = 0; j < MATVEC_UNROLL; ++j)
                        g[j] = first            ? pre[j]
                               : u + 32 * j < u1 ? ld_weights(wv + u + 32 * j)
                                                 : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int j = 0; j < MATVEC_UNROLL; ++j) {
                        if (u + 32 * j < u1) {
                            float w[8];
                            unpack(g[j], w);
                            fma_chunk(acc, w, xs, B, K, (u + 32 * j) * VEC);
                        }
                    }
                }
            } else {
                for (int k = u0 + lane; k < u1; k += 32) {
                    const float w = ld(wr[k]);
#pragma unroll
                    for (int b = 0; b < MAXB; ++b)
                        if (b < B) acc[b] += w * xs[(i64)b * K + k];
                }
            }
        }
#pragma unroll
        for (int b = 0; b < MAXB; ++b) acc[b] = warp_sum(acc[b]);
        if (split > 1) {
            if (lane == 0)
                for (int b = 0; b < B; ++b) part[b][warp] = acc[b];
            __syncthreads();
            if (slot == 0 && lane == 0) {
                for (int b = 0; b < B; ++b) {
                    float sum = 0.0f;
                    for (int p = 0; p < split; ++p) sum += part[b][warp + p];
                    acc[b] = sum;
                }
            }
            __syncthreads();  // part is rewritten by the next rows
        }
        if (slot == 0 && lane == 0 && n < N) {
            for (int b = 0; b < B; ++b) {
                float v = rnd(acc[b]);
                if (bias) v = rnd(v + ld(bias[n]));
                const i64 o = (i64)b * N + n;
                if (OUT == 0 || OUT == 3) {
                    ((elem*)yout)[o] = st(v);
                    if (OUT == 3 && n < conv.D) conv_step(conv, b, n, v);
                } else if (OUT == 1) {
                    ((float*)yout)[o] = v;
                } else {
                    float r = ld_f<CG>((const float*)yout + o) + v;
                    ((float*)yout)[o] = round_res ? rnd(r) : r;
                }
            }
        }
    }
    // A block with one round fewer than the grid's issues its last part here.
    for (int p = max(round, 1); p < parts; ++p) prefetch_part(pf, p, parts);
}

#define MATVEC_W                                                                          \
    const elem *__restrict__ W, const elem *__restrict__ bias, void *__restrict__ yout, int B, \
        int K, int N, int vec_ok

// `split` (warps per row) is every matvec kernel's last argument.
// The decode matvecs' staged input rows (dynamic shared memory, B*K floats).
extern __shared__ float staged[];

// norm(residual) · in_projᵀ (OUT 0) or · lm_headᵀ (OUT 1, f32 logits).
template <int OUT>
__device__ void norm_matvec(const float* res, const elem* nw, const elem* nb, float eps,
                            int round_res, MATVEC_W, int split, Prefetch pf,
                            ConvStep conv = ConvStep{}) {
    uint4 pre[MATVEC_UNROLL];
    first_loads(pre, W, K, N, vec_ok, split);
    prefetch_part(pf, 0, prefetch_parts(N, (blockDim.x >> 5) / split));
    griddep_wait();
    griddep_launch_dependents();
    float* xs = staged;
    __shared__ float sh[32];
    stage_norm(xs, res, nw, nb, eps, B, K, sh);
    __syncthreads();
    matvec_rows<OUT>(xs, W, bias, yout, B, K, N, vec_ok, split, round_res, pre, conv, pf.ranges,
                     pf.n);
}

// norm(residual) · in_projᵀ → xz, and the conv step on its x half → x_t.
extern "C" __global__ void MATVEC_BOUNDS matvec_norm_conv(const float* __restrict__ res,
                                            const elem* __restrict__ nw,
                                            const elem* __restrict__ nb, float eps, int round_res,
                                            MATVEC_W, float* __restrict__ window,
                                            const float* __restrict__ wt,
                                            const float* __restrict__ cbias,
                                            elem* __restrict__ xconv, int D, int split,
                                            const i64* __restrict__ pf, int npf) {
    const ConvStep conv{window, wt, cbias, xconv, D};
    norm_matvec<3>(res, nw, nb, eps, round_res, W, bias, yout, B, K, N, vec_ok, split,
                   Prefetch{pf, npf}, conv);
}

extern "C" __global__ void MATVEC_BOUNDS matvec_norm_logits(const float* __restrict__ res,
                                              const elem* __restrict__ nw,
                                              const elem* __restrict__ nb, float eps,
                                              int round_res, MATVEC_W, int split,
                                              const i64* __restrict__ pf, int npf) {
    norm_matvec<1>(res, nw, nb, eps, round_res, W, bias, yout, B, K, N, vec_ok, split,
                   Prefetch{pf, npf});
}

// x_t · x_projᵀ: dt, B and C in the model dtype.
extern "C" __global__ void MATVEC_BOUNDS matvec_plain(const elem* __restrict__ x, MATVEC_W, int split,
                                                      const i64* __restrict__ pf, int npf) {
    uint4 pre[MATVEC_UNROLL];
    first_loads(pre, W, K, N, vec_ok, split);
    const Prefetch p{pf, npf};
    prefetch_part(p, 0, prefetch_parts(N, (blockDim.x >> 5) / split));
    griddep_wait();
    griddep_launch_dependents();
    float* xs = staged;
    stage_plain(xs, x, B, K);
    __syncthreads();
    matvec_rows<0>(xs, W, bias, yout, B, K, N, vec_ok, split, 0, pre, ConvStep{}, pf, npf);
}

// y · out_projᵀ added to the residual in place.
extern "C" __global__ void MATVEC_BOUNDS matvec_residual(const elem* __restrict__ x, int round_res, MATVEC_W,
                                           int split, const i64* __restrict__ pf, int npf) {
    uint4 pre[MATVEC_UNROLL];
    first_loads(pre, W, K, N, vec_ok, split);
    const Prefetch p{pf, npf};
    prefetch_part(p, 0, prefetch_parts(N, (blockDim.x >> 5) / split));
    griddep_wait();
    griddep_launch_dependents();
    float* xs = staged;
    stage_plain(xs, x, B, K);
    __syncthreads();
    matvec_rows<2>(xs, W, bias, yout, B, K, N, vec_ok, split, round_res, pre, ConvStep{}, pf,
                   npf);
}

// The residual stream of a decode step: residual[b] = embedding[ids[b]] in f32.
extern "C" __global__ void embed_rows(const elem* __restrict__ emb, const unsigned* __restrict__ ids,
                                      float* __restrict__ res, int B, int D) {
    griddep_wait();
    griddep_launch_dependents();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * D) return;
    const int b = i / D, d = i % D;
    res[i] = ld(emb[(i64)ids[b] * D + d]);
}

// One scan step of (b, d) = i by one warp (lane n owns states n, n+32, ...; the loads of
// the state, B, C and dt_proj's row are coalesced): dt = dt_w[d, :] · dbc[b, :R] (rounded
// like the GEMM's output), Δ = softplus(dt + bias), the recurrence on x_t (from
// matvec_norm_conv) and the gate z; h ([B, D, NSTATE]) is updated in place.
template <bool CG = false>
__device__ __forceinline__ void scan_step_warp(int i, int lane, const elem* __restrict__ x,
                                               const elem* __restrict__ xz, int xz_rs,
                                               const elem* __restrict__ dbc, int dbc_rs, int R,
                                               const elem* __restrict__ dt_w,
                                               const float* __restrict__ dt_bias,
                                               const float* __restrict__ A,
                                               const float* __restrict__ Dskip,
                                               float* __restrict__ h, elem* __restrict__ y, int D) {
    const int b = i / D, d = i % D;
    const float xv = ld_e<CG>(x + i);
    const elem* row = dbc + (i64)b * dbc_rs;
    const elem* w = dt_w + (i64)d * R;
    float dt = 0.0f;
    for (int r = lane; r < R; r += 32) dt += ld(w[r]) * ld_e<CG>(row + r);
    dt = warp_sum(dt);
    const float delta = softplus_f(rnd(dt) + dt_bias[d]);
    const float dx = delta * xv;
    float* hs = h + (i64)i * NSTATE;
    float acc = 0.0f;
    for (int n = lane; n < NSTATE; n += 32) {
        const float hn = fast_exp2(delta * (A[(i64)d * NSTATE + n] * LOG2E)) * hs[n] +
                         dx * ld_e<CG>(row + R + n);
        hs[n] = hn;
        acc += hn * ld_e<CG>(row + R + NSTATE + n);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const float zv = ld_e<CG>(xz + (i64)b * xz_rs + D + d);
        y[i] = st((acc + Dskip[d] * xv) * silu_f(zv));
    }
}

extern "C" __global__ void scan_step(const elem* __restrict__ x, const elem* __restrict__ xz,
                                     int xz_rs, const elem* __restrict__ dbc, int dbc_rs, int R,
                                     const elem* __restrict__ dt_w,
                                     const float* __restrict__ dt_bias,
                                     const float* __restrict__ A, const float* __restrict__ Dskip,
                                     float* __restrict__ h, elem* __restrict__ y, int B, int D,
                                     const i64* __restrict__ pf, int npf) {
    prefetch_part(Prefetch{pf, npf}, 0, 1);
    griddep_wait();
    griddep_launch_dependents();
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // (b, d) of this warp
    if (i >= B * D) return;
    scan_step_warp(i, threadIdx.x & 31, x, xz, xz_rs, dbc, dbc_rs, R, dt_w, dt_bias, A, Dskip, h,
                   y, D);
}

// ---------------------------------------------------------------------------------------
// The persistent decode step: the whole token (embedding, every layer's four stages, the
// final norm and LM head) in one cooperative launch whose blocks are all resident, the
// stages separated by grid barriers instead of kernel boundaries. Each stage runs the same
// device functions as the per-stage kernels above, on the same rows and in the same order
// of sums, so the logits are bit-identical; only the rows' assignment to blocks differs.
// Between arriving at a barrier and waiting on it a block issues its first weight loads
// of the next stage (weights are never written), as the dependent launches do.

// One layer's tensors (host: cuda.rs, DecodeLayerTable; sixteen 8-byte fields).
struct DecodeLayer {
    const elem* norm_w;
    const elem* norm_b;  // 0: RMSNorm
    const elem* in_w;
    const elem* in_b;
    const elem* x_w;
    const elem* dt_w;
    const float* dt_b;
    const float* A;
    const float* Dskip;
    const elem* out_w;
    const elem* out_b;
    const float* conv_wt;
    const float* conv_b;
    float* conv_state;
    float* ssm;
    i64 vec;  // bit 0: in_proj, 1: x_proj, 2: out_proj read 16 bytes at a time
};

// Grid barrier k of the step completes when every block has arrived k times (`count` is
// zeroed before the launch). The fence before the arrival publishes the block's writes
// (its threads' stores are ordered before thread 0's by the __syncthreads); the acquire
// load and fence order the block's later loads after every other block's writes.
__device__ __forceinline__ void grid_arrive(unsigned* count) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(count, 1u);
    }
}
__device__ __forceinline__ void grid_wait(const unsigned* count, unsigned target) {
    if (threadIdx.x == 0) {
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
        } while (v < target);
        __threadfence();
    }
    __syncthreads();
}

// Blocks of 256 threads per SM the persistent step's registers must allow (at 3 it
// spills).
#ifndef PERSIST_MIN_BLOCKS
#define PERSIST_MIN_BLOCKS 2
#endif

extern "C" __global__ void __launch_bounds__(256, PERSIST_MIN_BLOCKS) decode_persistent(
    const DecodeLayer* __restrict__ layers, int n_layer, const elem* __restrict__ emb,
    const unsigned* __restrict__ ids, const elem* __restrict__ normf_w,
    const elem* __restrict__ normf_b, const elem* __restrict__ head, int head_vec, float eps,
    int round_res, float* res, elem* xz, elem* xc, elem* dbc, elem* y, float* logits, int B,
    int d_model, int d_inner, int xw, int R, int vocab, int in_split, int x_split, int out_split,
    int head_split, unsigned* barrier) {
    __shared__ float sh[32];
    float* xs = staged;
    const unsigned blocks = gridDim.x;
    unsigned target = 0;
    const int lane = threadIdx.x & 31;
    uint4 pre[MATVEC_UNROLL];
    // Ends a stage: arrive, issue the next stage's first loads of W (rows of K, N of them,
    // `split` warps a row), wait for every block.
    auto next_stage = [&](const elem* W, int K, int N, int vec_ok, int split) {
        grid_arrive(barrier);
        first_loads(pre, W, K, N, vec_ok, split);
        target += blocks;
        grid_wait(barrier, target);
    };
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < B * d_model; i += blocks * blockDim.x)
        res[i] = ld(emb[(i64)ids[i / d_model] * d_model + i % d_model]);
    for (int l = 0; l < n_layer; ++l) {
        const DecodeLayer L = layers[l];
        const int vin = L.vec & 1, vx = (L.vec >> 1) & 1, vo = (L.vec >> 2) & 1;
        next_stage(L.in_w, d_model, 2 * d_inner, vin, in_split);
        stage_norm<true>(xs, res, L.norm_w, L.norm_b, eps, B, d_model, sh);
        __syncthreads();
        const ConvStep conv{L.conv_state, L.conv_wt, L.conv_b, xc, d_inner};
        matvec_rows<3, true>(xs, L.in_w, L.in_b, xz, B, d_model, 2 * d_inner, vin, in_split,
                             round_res, pre, conv);
        next_stage(L.x_w, d_inner, xw, vx, x_split);
        stage_plain<true>(xs, xc, B, d_inner);
        __syncthreads();
        matvec_rows<0, true>(xs, L.x_w, nullptr, dbc, B, d_inner, xw, vx, x_split, 0, pre);
        grid_arrive(barrier);
        target += blocks;
        grid_wait(barrier, target);
        for (int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < B * d_inner;
             i += blocks * (blockDim.x >> 5))
            scan_step_warp<true>(i, lane, xc, xz, 2 * d_inner, dbc, xw, R, L.dt_w, L.dt_b, L.A,
                                 L.Dskip, L.ssm, y, d_inner);
        next_stage(L.out_w, d_inner, d_model, vo, out_split);
        stage_plain<true>(xs, y, B, d_inner);
        __syncthreads();
        matvec_rows<2, true>(xs, L.out_w, L.out_b, res, B, d_inner, d_model, vo, out_split,
                             round_res, pre);
    }
    next_stage(head, d_model, vocab, head_vec, head_split);
    stage_norm<true>(xs, res, normf_w, normf_b, eps, B, d_model, sh);
    __syncthreads();
    matvec_rows<1, true>(xs, head, nullptr, logits, B, d_model, vocab, head_vec, head_split,
                         round_res, pre);
}
