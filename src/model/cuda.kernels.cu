// CUDA kernels of the Mamba-1 mixer (decimamba). Compiled at run time by NVRTC, with
// -DNSTATE=<d_state>. All tensors are f32.
//
// Layouts are token-major, as in the CPU kernels (src/model/kernels.rs): element
// (b, t, d) of an [B, L, D] tensor sits at b*L*D + t*D + d unless explicit strides say
// otherwise.

#ifndef NSTATE
#define NSTATE 16
#endif

typedef long long i64;

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// Causal depthwise conv1d + SiLU over `L` tokens, with the K-1 inputs that precede the
// chunk in `hist` ([B, K-1, D]); the input x is the first D columns of rows of `xz`
// (token (b, t) at b*bs + t*rs). Also writes the new window (the last K-1 inputs of
// hist ++ chunk) into `new_hist`. One thread per output element.
extern "C" __global__ void conv_silu(const float* __restrict__ xz, i64 bs, i64 rs,
                                     const float* __restrict__ hist,
                                     const float* __restrict__ wt,  // [K, D]
                                     const float* __restrict__ bias, float* __restrict__ out,
                                     float* __restrict__ new_hist, int B, int L, int D,
                                     int K) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int W = K - 1;
    if (i < (i64)B * L * D) {
        int d = (int)(i % D);
        i64 bt = i / D;
        int t = (int)(bt % L);
        int b = (int)(bt / L);
        float acc = bias[d];
        for (int j = 0; j < K; ++j) {
            int back = K - 1 - j;  // tap j multiplies the input `back` steps earlier
            float v;
            if (t >= back) {
                v = xz[b * bs + (i64)(t - back) * rs + d];
            } else {
                v = hist[((i64)b * W + (W - (back - t))) * D + d];
            }
            acc += wt[(i64)j * D + d] * v;
        }
        out[i] = silu_f(acc);
    }
    if (i < (i64)B * W * D) {
        int d = (int)(i % D);
        i64 bj = i / D;
        int j = (int)(bj % W);
        int b = (int)(bj / W);
        int p = L - W + j;  // position in this chunk; negative: still in the old window
        new_hist[i] = p >= 0 ? xz[b * bs + (i64)p * rs + d] : hist[((i64)b * W + (W + p)) * D + d];
    }
}

// delta = softplus(dt + bias), dt rows of D channels. softplus(v) = max(v,0) + log1p(e^-|v|).
extern "C" __global__ void softplus_bias(const float* __restrict__ dt,
                                         const float* __restrict__ bias, float* __restrict__ out,
                                         i64 n, int D) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = dt[i] + bias[i % D];
        out[i] = fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
    }
}

// Selective scan (Gu & Dao 2023, Alg. 2) with the discretisation fused:
//   h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,   y_t = (C_t · h_t + D x_t) · SiLU(z_t).
// One thread per (batch, channel) pair g = b*D + d, its NSTATE states in registers,
// f32 throughout. blockIdx.y is a chunk of the time axis, so that short batches still
// fill the GPU: every chunk but the last is first scanned from a zero state
// (scan_chunk_summary: its end state S and Σ Δ), the summaries are chained in order per
// (g, n) (scan_combine: chunk c starts from exp(A ΣΔ_{c-1}) h_in(c-1) + S_{c-1}), and
// each chunk is scanned again from its true initial state, writing y (scan_output).
// Memory is O(n_chunks · B · D · N): no [B, D, L, N] tensor.
#define LOG2E 1.4426950408889634f

#define SCAN_PARAMS                                                                          \
    const float *__restrict__ x, const float *__restrict__ delta,                            \
        const float *__restrict__ bc, i64 bc_bs, i64 bc_rs, int b_off, int c_off,             \
        const float *__restrict__ z, i64 z_bs, i64 z_rs, const float *__restrict__ A,         \
        const float *__restrict__ Dskip, int B, int L, int D, int chunk_len

// S: [n_chunks][NSTATE][B*D] end states from zero; T: [n_chunks][B*D] sums of Δ.
extern "C" __global__ void scan_chunk_summary(SCAN_PARAMS, float* __restrict__ S,
                                              float* __restrict__ T) {
    const i64 G = (i64)B * D;
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int c = blockIdx.y;
    if (g >= G) return;
    const int b = (int)(g / D), d = (int)(g % D);
    float a2[NSTATE], h[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        a2[n] = A[(i64)d * NSTATE + n] * LOG2E;
        h[n] = 0.0f;
    }
    float sdt = 0.0f;
    const int t0 = c * chunk_len;
    const int t1 = min(L, t0 + chunk_len);
    const float* bcb = bc + b * bc_bs + b_off;
    for (int t = t0; t < t1; ++t) {
        const i64 r = ((i64)b * L + t) * D + d;
        const float dt = delta[r];
        const float dtx = dt * x[r];
        const float* row = bcb + (i64)t * bc_rs;
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            h[n] = exp2f(dt * a2[n]) * h[n] + dtx * row[n];
        }
        sdt += dt;
    }
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        S[((i64)c * NSTATE + n) * G + g] = h[n];
    }
    T[(i64)c * G + g] = sdt;
}

// One thread per (n, g): replaces S[c] by chunk c's initial state, chaining from h0
// ([B*D][NSTATE]). S has n_chunks slots; the last one's summary is not needed.
extern "C" __global__ void scan_combine(const float* __restrict__ A,
                                        const float* __restrict__ h0, float* __restrict__ S,
                                        const float* __restrict__ T, int B, int D,
                                        int n_chunks) {
    const i64 G = (i64)B * D;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= G * NSTATE) return;
    const int n = (int)(i / G);
    const i64 g = i % G;
    const int d = (int)(g % D);
    const float a2 = A[(i64)d * NSTATE + n] * LOG2E;
    float carry = h0[g * NSTATE + n];
    for (int c = 0; c + 1 < n_chunks; ++c) {
        const i64 o = ((i64)c * NSTATE + n) * G + g;
        const float s = S[o];
        S[o] = carry;
        carry = exp2f(a2 * T[(i64)c * G + g]) * carry + s;
    }
    S[((i64)(n_chunks - 1) * NSTATE + n) * G + g] = carry;
}

// Chunk c from its initial state hin[c*hin_c + g*hin_g + n*hin_n]; writes y, and the
// final state h1 ([B*D][NSTATE]) from the last chunk.
extern "C" __global__ void scan_output(SCAN_PARAMS, const float* __restrict__ hin, i64 hin_c,
                                       i64 hin_g, i64 hin_n, float* __restrict__ h1,
                                       float* __restrict__ y) {
    const i64 G = (i64)B * D;
    const i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const int c = blockIdx.y;
    if (g >= G) return;
    const int b = (int)(g / D), d = (int)(g % D);
    float a2[NSTATE], h[NSTATE];
    const float* h_init = hin + c * hin_c + g * hin_g;
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        a2[n] = A[(i64)d * NSTATE + n] * LOG2E;
        h[n] = h_init[n * hin_n];
    }
    const float dskip = Dskip[d];
    const int t0 = c * chunk_len;
    const int t1 = min(L, t0 + chunk_len);
    const float* bcb = bc + b * bc_bs;
    const float* zb = z + b * z_bs + d;
    for (int t = t0; t < t1; ++t) {
        const i64 r = ((i64)b * L + t) * D + d;
        const float dt = delta[r];
        const float xv = x[r];
        const float dtx = dt * xv;
        const float* row = bcb + (i64)t * bc_rs;
        float acc = 0.0f;
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            h[n] = exp2f(dt * a2[n]) * h[n] + dtx * row[b_off + n];
            acc += h[n] * row[c_off + n];
        }
        const float zv = zb[(i64)t * z_rs];
        y[r] = (acc + dskip * xv) * __fdividef(zv, 1.0f + __expf(-zv));
    }
    if (c == gridDim.y - 1) {
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            h1[g * NSTATE + n] = h[n];
        }
    }
}
