// The pointwise work of inject mode on CUDA (approxctl/proxy_ops.py, approxctl/noise.py): the
// proxies' forward with the injected error and the output's affine map, their backward, and the
// error draw alone. Each is one launch where composed torch ops take dozens (the polynomials alone
// take two per coefficient), which is most of an inject step on a GPU whose float step is a few
// milliseconds.
//
// Layout: a contiguous tensor of n elements; element i belongs to channel (i / inner) % channels,
// which has one output scale and bias (approxctl.noise.ChannelLayout).
//
// The injected error at accumulator value v (SPEC section 4) is mu(t) + sigma(t) * eps, t =
// clamp(v, lo, hi) mapped onto [-1, 1], mu and sigma polynomials held within the bounds of the
// statistics they were fitted to. `params` holds [lo, hi, mu_min, mu_max, sigma_max, mu[0..m),
// sigma[0..m)] (lowest order first). eps is an inverse-CDF sample: the lowbias32 hash of the
// element's index and a per-call key picks one of the equiprobable quantiles of N(0, 1) in `table`
// (2^(32 - shift) entries, the CPU kernels' table). One hash per element: the draws differ from the
// CPU kernels' (which share one hash between two elements), not their distribution.
//
// Every product that feeds a sum is an explicit fmaf and no other expression can be contracted, so
// a GPU (which contracts a * b + c by default) and the C++ emulation of
// tests/test_kernels_emulated.py compute the same bits. (On the GPU, CuPy compiles with -ftz=true:
// subnormal results flush to zero there, which the emulation does not do.)

__device__ __forceinline__ unsigned int lowbias32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ float normal_sample(long long i, unsigned int key, const float* table,
                                               int shift) {
    const unsigned long long u = (unsigned long long)i;
    // the index's high half (0 below 2^32 elements) goes into the salt
    const unsigned int salt = key ^ (unsigned int)((u >> 32) * 0x85EBCA6Bull);
    return table[lowbias32(salt ^ (unsigned int)u) >> shift];
}

__device__ __forceinline__ float horner(const float* coef, int m, float x) {
    float acc = coef[m - 1];
    for (int j = m - 2; j >= 0; --j) {
        acc = fmaf(acc, x, coef[j]);
    }
    return acc;
}

__device__ __forceinline__ float error_at(float v, long long i, const float* params, int m,
                                          unsigned int key, const float* table, int shift) {
    const float lo = params[0];
    const float hi = params[1];
    const float mid = 0.5f * (lo + hi);
    const float inv_half = 2.0f / (hi - lo);
    const float t = (fminf(fmaxf(v, lo), hi) - mid) * inv_half;
    const float mu = fminf(fmaxf(horner(params + 5, m, t), params[2]), params[3]);
    const float sigma = fminf(fmaxf(horner(params + 5 + m, m, t), 0.0f), params[4]);
    return fmaf(sigma, normal_sample(i, key, table, shift), mu);
}

// exp(-z) for z >= 0 (negative z is taken as 0): the CPU kernels' method (cpu_pointwise._exp_neg),
// 2^-k e^-r with k = round(z log2 e), r = z - k ln 2 (ln 2 in two parts), e^-r by its degree-7
// Taylor polynomial; relative error < 3e-8 where the result is a normal float.
__device__ __forceinline__ float exp_neg(float z) {
    z = fminf(fmaxf(z, 0.0f), 87.0f);
    const float k = floorf(fmaf(z, 1.44269504f, 0.5f));
    const float r = fmaf(k, 2.12194440e-4f, fmaf(-k, 0.693359375f, z));
    float p = -1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, -1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, -1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, -1.0f);
    p = fmaf(p, r, 1.0f);
    return ldexpf(p, -(int)k);
}

__device__ __forceinline__ int channel_of(long long i, long long inner, int channels) {
    return (int)((i / inner) % channels);
}

#define GRID_STRIDE_LOOP(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (long long)gridDim.x * blockDim.x)

// out = y + error(v) * scale[c], v = (y - bias[c]) / scale[c] (approxctl.noise.add_error). `out`
// may be `y`.
extern "C" __global__ void add_error(const float* y, float* out, long long n, int channels,
                                     long long inner, const float* scale, const float* bias,
                                     const float* params, int m, long long key,
                                     const float* table, int shift) {
    const unsigned int key32 = (unsigned int)key;
    GRID_STRIDE_LOOP(i, n) {
        const int c = channel_of(i, inner, channels);
        const float s = scale[c];
        const float value = y[i];
        const float v = (value - bias[c]) * (1.0f / s);
        out[i] = fmaf(error_at(v, i, params, m, key32, table, shift), s, value);
    }
}

// SC_act (SPEC 3.2) with its affine map: v = e^-z- - e^-z+, out = (v + error(v)) * scale[c] +
// bias[c] (no error unless `noise`); e_pos, e_neg keep e^-z+- for the backward.
extern "C" __global__ void sc_proxy_forward(const float* z_pos, const float* z_neg, float* out,
                                            float* e_pos, float* e_neg, long long n, int channels,
                                            long long inner, const float* scale,
                                            const float* bias, int noise, const float* params,
                                            int m, long long key, const float* table, int shift) {
    const unsigned int key32 = (unsigned int)key;
    GRID_STRIDE_LOOP(i, n) {
        const int c = channel_of(i, inner, channels);
        const float a = exp_neg(z_pos[i]);
        const float b = exp_neg(z_neg[i]);
        e_pos[i] = a;
        e_neg[i] = b;
        float v = b - a;
        if (noise) {
            v = v + error_at(v, i, params, m, key32, table, shift);
        }
        out[i] = fmaf(v, scale[c], bias[c]);
    }
}

// d/dz+ = g * scale[c] * e+, d/dz- = -g * scale[c] * e-.
extern "C" __global__ void sc_proxy_backward(const float* grad, const float* e_pos,
                                             const float* e_neg, float* grad_pos,
                                             float* grad_neg, long long n, int channels,
                                             long long inner, const float* scale) {
    GRID_STRIDE_LOOP(i, n) {
        const float gs = grad[i] * scale[channel_of(i, inner, channels)];
        grad_pos[i] = gs * e_pos[i];
        grad_neg[i] = -(gs * e_neg[i]);
    }
}

// Analog_act (SPEC 3.3) with its affine map: v = clamp(z0, 0, T) - clamp(z1, 0, T) [+ clamp(z3,
// 0, T) - clamp(z2, 0, T) with `four`: the negative inputs' pair, subtracted], out = (v +
// error(v)) * scale[c] + bias[c]; `inside` gets bit j set where 0 <= z_j <= T (the gradient
// mask). z2 and z3 are read only with `four`.
extern "C" __global__ void hardtanh_proxy_forward(const float* z0, const float* z1,
                                                  const float* z2, const float* z3, int four,
                                                  float limit, float* out, unsigned char* inside,
                                                  long long n, int channels, long long inner,
                                                  const float* scale, const float* bias,
                                                  int noise, const float* params, int m,
                                                  long long key, const float* table, int shift) {
    const unsigned int key32 = (unsigned int)key;
    GRID_STRIDE_LOOP(i, n) {
        const int c = channel_of(i, inner, channels);
        const float a = z0[i];
        const float b = z1[i];
        float v = fminf(fmaxf(a, 0.0f), limit) - fminf(fmaxf(b, 0.0f), limit);
        unsigned int code = (0.0f <= a && a <= limit ? 1u : 0u) | (0.0f <= b && b <= limit ? 2u : 0u);
        if (four) {
            const float d = z2[i];
            const float e = z3[i];
            v = v + (fminf(fmaxf(e, 0.0f), limit) - fminf(fmaxf(d, 0.0f), limit));
            code |= (0.0f <= d && d <= limit ? 4u : 0u) | (0.0f <= e && e <= limit ? 8u : 0u);
        }
        inside[i] = (unsigned char)code;
        if (noise) {
            v = v + error_at(v, i, params, m, key32, table, shift);
        }
        out[i] = fmaf(v, scale[c], bias[c]);
    }
}

// g_j = +-grad * scale[c] where bit j of `inside` is set (the forward's signs: +, -, -, +), else
// 0; g2 and g3 are written only with `four`.
extern "C" __global__ void hardtanh_proxy_backward(const float* grad, const unsigned char* inside,
                                                   float* g0, float* g1, float* g2, float* g3,
                                                   int four, long long n, int channels,
                                                   long long inner, const float* scale) {
    GRID_STRIDE_LOOP(i, n) {
        const float gs = grad[i] * scale[channel_of(i, inner, channels)];
        const unsigned int code = inside[i];
        g0[i] = (code & 1u) ? gs : 0.0f;
        g1[i] = (code & 2u) ? -gs : 0.0f;
        if (four) {
            g2[i] = (code & 4u) ? -gs : 0.0f;
            g3[i] = (code & 8u) ? gs : 0.0f;
        }
    }
}
