// analog_matmul (SPEC 3.3): compute-in-memory GEMM with ADC-quantized partial sums,
// (N,K) x (O,K) -> int64 (N,O).
//
// K is cut into consecutive arrays of `array_size` (the last may be shorter). For each array c
// and weight sign s the exact partial sum p = sum_{k in c} a_k * b^s_k (b+ = max(b, 0),
// b- = max(-b, 0)) is converted by the ADC
//
//   q = clamp(floor((2 p levels + adc_max) / (2 adc_max)), 0, levels),  levels = 2^bits - 1
//
// and out[n,o] = sum_c (q+_c - q-_c). Partial sums live in registers only: a block of 256
// threads computes a 64 x 64 output tile (4 x 4 outputs per thread) and walks K in tiles of 16;
// after the last k of each array (and after k = K - 1) every thread converts its partial sums
// and clears them. That k is the same for every thread of the block: the branch never diverges.
// ACC is int when 255 * 127 * array_size fits in int32 (the host checks), else long long.

#define ANALOG_TILE_N 64
#define ANALOG_TILE_O 64
#define ANALOG_TILE_K 16
#define ANALOG_THREADS 256

// The ADC code in integer arithmetic. p >= 0 and 1 <= adc_max < 2^40 (the host checks).
// p >= adc_max saturates: then 2 p levels + adc_max >= (2 levels + 1) adc_max, so the quotient is
// at least levels. Otherwise x < (2 levels + 1) adc_max < 2^58 and q <= levels; a float estimate
// of x / d is corrected by exact integer comparisons until q * d <= x < (q + 1) * d, so the
// result is floor(x / d) exactly whatever the estimate's rounding.
__device__ __forceinline__ long long adc_code(long long p, long long levels, long long adc_max,
                                              float inv_two_max)
{
    if (p >= adc_max) {
        return levels;
    }
    const long long x = 2 * p * levels + adc_max;
    const long long d = 2 * adc_max;
    long long q = (long long)((float)x * inv_two_max);
    if (q > levels + 1) {
        q = levels + 1;
    }
    if (q < 0) {
        q = 0;
    }
    while (q > 0 && q * d > x) {
        --q;
    }
    while ((q + 1) * d <= x) {
        ++q;
    }
    return q < levels ? q : levels;
}

template <typename ACC>
__device__ __forceinline__ void analog_matmul_body(
    const short* __restrict__ a,  // (N, K) inputs in [0, 255]
    const short* __restrict__ b,  // (O, K) weights in [-127, 127]
    long long* __restrict__ out,  // (N, O) int64
    int n_rows, int o_rows, int k_len, int array_size, long long levels, long long adc_max,
    float inv_two_max)
{
    __shared__ ACC s_a[ANALOG_TILE_K][ANALOG_TILE_N + 1];
    __shared__ ACC s_pos[ANALOG_TILE_K][ANALOG_TILE_O + 1];
    __shared__ ACC s_neg[ANALOG_TILE_K][ANALOG_TILE_O + 1];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const long long n0 = (long long)blockIdx.x * ANALOG_TILE_N;
    const long long o0 = (long long)blockIdx.y * ANALOG_TILE_O;

    ACC p_pos[4][4];
    ACC p_neg[4][4];
    long long codes[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p_pos[i][j] = 0;
            p_neg[i][j] = 0;
            codes[i][j] = 0;
        }
    }

    int left = array_size;  // products still to add to the current array
    for (int k0 = 0; k0 < k_len; k0 += ANALOG_TILE_K) {
        for (int e = tid; e < ANALOG_TILE_N * ANALOG_TILE_K; e += ANALOG_THREADS) {
            const int r = e / ANALOG_TILE_K;
            const int c = e % ANALOG_TILE_K;
            const long long n = n0 + r;
            const int k = k0 + c;
            s_a[c][r] = (n < n_rows && k < k_len) ? (ACC)a[n * k_len + k] : (ACC)0;
        }
        for (int e = tid; e < ANALOG_TILE_O * ANALOG_TILE_K; e += ANALOG_THREADS) {
            const int r = e / ANALOG_TILE_K;
            const int c = e % ANALOG_TILE_K;
            const long long o = o0 + r;
            const int k = k0 + c;
            const int v = (o < o_rows && k < k_len) ? (int)b[o * k_len + k] : 0;
            s_pos[c][r] = (ACC)(v > 0 ? v : 0);
            s_neg[c][r] = (ACC)(v < 0 ? -v : 0);
        }
        __syncthreads();

        const int k_count = min(ANALOG_TILE_K, k_len - k0);
        for (int kk = 0; kk < k_count; ++kk) {
            ACC xa[4], wp[4], wn[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                xa[i] = s_a[kk][ty + 16 * i];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                wp[j] = s_pos[kk][tx + 16 * j];
                wn[j] = s_neg[kk][tx + 16 * j];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    p_pos[i][j] += xa[i] * wp[j];
                    p_neg[i][j] += xa[i] * wn[j];
                }
            }
            // The last k of an array (or of K, for a shorter last array): convert, clear.
            if (--left == 0 || k0 + kk + 1 == k_len) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        codes[i][j] += adc_code(p_pos[i][j], levels, adc_max, inv_two_max)
                                     - adc_code(p_neg[i][j], levels, adc_max, inv_two_max);
                        p_pos[i][j] = 0;
                        p_neg[i][j] = 0;
                    }
                }
                left = array_size;
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long n = n0 + ty + 16 * i;
        if (n >= n_rows) {
            continue;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long o = o0 + tx + 16 * j;
            if (o < o_rows) {
                out[n * o_rows + o] = codes[i][j];
            }
        }
    }
}

#define ANALOG_MATMUL_KERNEL(NAME, ACC)                                                         \
    extern "C" __global__ void __launch_bounds__(ANALOG_THREADS) NAME(                          \
        const short* __restrict__ a, const short* __restrict__ b, long long* __restrict__ out,  \
        int n_rows, int o_rows, int k_len, int array_size, long long levels, long long adc_max, \
        float inv_two_max)                                                                      \
    {                                                                                           \
        analog_matmul_body<ACC>(a, b, out, n_rows, o_rows, k_len, array_size, levels, adc_max,  \
                                inv_two_max);                                                   \
    }

ANALOG_MATMUL_KERNEL(analog_matmul_acc32, int)
ANALOG_MATMUL_KERNEL(analog_matmul_acc64, long long)
