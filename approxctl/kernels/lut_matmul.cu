// lut_matmul (SPEC 3.1): approximate-multiplier GEMM (N,K) x (O,K) -> int64 (N,O).
//
//   unsigned table (M,M):  out[n,o] = sum_k sign(a)sign(b) lut[|a|, |b|]
//   signed table (256,256): out[n,o] = sum_k lut[a+128, b+128]
//
// The row index is the activation (a), the column index the weight (b). The host
// (approxctl/backends/cuda_kernels.py) passes the table already converted to int32 and, when
// every entry fits, narrowed to int16/uint16 (T). For unsigned tables it zeroes row 0 and column
// 0, so a zero operand contributes 0 whatever lut[0, x] holds (sign(0) = 0 in the definition)
// and the sign can be applied as a negation. The negation wraps in 32 bits like the reference's
// int32 product, and the sum is exact in int64.
//
// Tiling: a block of 256 threads computes a 64 x 64 output tile; each thread owns 4 x 4 outputs
// (rows ty + 16 i, columns tx + 16 j). K is walked in tiles of 16: operands are staged in shared
// memory already decoded into table offsets and sign masks. The table itself sits in dynamic
// shared memory (SHARED_TABLE) when it fits the device, else it is read through the read-only
// cache from global memory.

#define LUT_TILE_N 64
#define LUT_TILE_O 64
#define LUT_TILE_K 16
#define LUT_THREADS 256

// The table's dynamic shared memory. (The CPU emulation used by the tests defines it itself.)
#ifndef APPROXCTL_CPU_EMULATION
extern __shared__ __align__(16) unsigned char lut_smem[];
#endif

template <typename T, bool SIGNED, bool SHARED_TABLE>
__device__ __forceinline__ void lut_matmul_body(
    const short* __restrict__ a,    // (N, K) activations, row-major
    const short* __restrict__ b,    // (O, K) weights, row-major
    const T* __restrict__ lut,      // (M, M) prepared table, row-major
    long long* __restrict__ out,    // (N, O) int64
    int n_rows, int o_rows, int k_len, int m)
{
    // Decoded operands: the table row offset |a| * M and column |b| (signed tables: (a + 128) * M
    // and b + 128), plus a sign mask (0 or -1; always 0 for signed tables). The +1 pads away
    // shared-memory bank conflicts of the transposed stores.
    __shared__ int s_row[LUT_TILE_K][LUT_TILE_N + 1];
    __shared__ int s_row_neg[LUT_TILE_K][LUT_TILE_N + 1];
    __shared__ int s_col[LUT_TILE_K][LUT_TILE_O + 1];
    __shared__ int s_col_neg[LUT_TILE_K][LUT_TILE_O + 1];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const long long n0 = (long long)blockIdx.x * LUT_TILE_N;
    const long long o0 = (long long)blockIdx.y * LUT_TILE_O;

    const T* table = lut;
    if (SHARED_TABLE) {
        // M*M*sizeof(T) is a multiple of 16 bytes (M is 128 or 256) and both buffers are
        // 16-byte aligned, so the copy moves int4 words.
        const int words = (int)(((long long)m * m * (long long)sizeof(T)) / 16);
        const int4* src = reinterpret_cast<const int4*>(lut);
        int4* dst = reinterpret_cast<int4*>(lut_smem);
        for (int i = tid; i < words; i += LUT_THREADS) {
            dst[i] = __ldg(src + i);
        }
        table = reinterpret_cast<const T*>(lut_smem);
    }

    long long acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0;
        }
    }

    for (int k0 = 0; k0 < k_len; k0 += LUT_TILE_K) {
        // Stage the operand tiles (consecutive threads read consecutive k: coalesced).
        for (int e = tid; e < LUT_TILE_N * LUT_TILE_K; e += LUT_THREADS) {
            const int r = e / LUT_TILE_K;
            const int c = e % LUT_TILE_K;
            const long long n = n0 + r;
            const int k = k0 + c;
            const int v = (n < n_rows && k < k_len) ? (int)a[n * k_len + k] : 0;
            if (SIGNED) {
                s_row[c][r] = (v + 128) * m;
                s_row_neg[c][r] = 0;
            } else {
                s_row[c][r] = (v < 0 ? -v : v) * m;
                s_row_neg[c][r] = v < 0 ? -1 : 0;
            }
        }
        for (int e = tid; e < LUT_TILE_O * LUT_TILE_K; e += LUT_THREADS) {
            const int r = e / LUT_TILE_K;
            const int c = e % LUT_TILE_K;
            const long long o = o0 + r;
            const int k = k0 + c;
            const int v = (o < o_rows && k < k_len) ? (int)b[o * k_len + k] : 0;
            if (SIGNED) {
                s_col[c][r] = v + 128;
                s_col_neg[c][r] = 0;
            } else {
                s_col[c][r] = v < 0 ? -v : v;
                s_col_neg[c][r] = v < 0 ? -1 : 0;
            }
        }
        __syncthreads();

        // Padded k (past K) is skipped explicitly: a signed table's lut[128, 128] need not be 0.
        const int k_count = min(LUT_TILE_K, k_len - k0);
        // A 16-bit entry times a sign stays below 2^17 in magnitude, so 16 of them are summed
        // exactly in int32 before the int64 accumulator; 32-bit entries go straight to int64.
        int part[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                part[i][j] = 0;
            }
        }
        for (int kk = 0; kk < k_count; ++kk) {
            int row[4], row_neg[4], col[4], col_neg[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                row[i] = s_row[kk][ty + 16 * i];
                row_neg[i] = s_row_neg[kk][ty + 16 * i];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                col[j] = s_col[kk][tx + 16 * j];
                col_neg[j] = s_col_neg[kk][tx + 16 * j];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int neg = row_neg[i] ^ col_neg[j];  // 0 or -1
                    const int entry = SHARED_TABLE ? (int)table[row[i] + col[j]]
                                                   : (int)__ldg(table + (row[i] + col[j]));
                    // (x ^ -1) + 1 == -x, computed in unsigned arithmetic: wraps like int32.
                    const int product = (int)(((unsigned)entry ^ (unsigned)neg) - (unsigned)neg);
                    if (sizeof(T) < 4) {
                        part[i][j] += product;
                    } else {
                        acc[i][j] += product;
                    }
                }
            }
        }
        if (sizeof(T) < 4) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] += part[i][j];
                }
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
                out[n * o_rows + o] = acc[i][j];
            }
        }
    }
}

// One entry point per (table type, signed, table placement); the host picks the name.
#define LUT_MATMUL_KERNEL(NAME, T, SIGNED, SHARED_TABLE)                                          \
    extern "C" __global__ void __launch_bounds__(LUT_THREADS) NAME(                             \
        const short* __restrict__ a, const short* __restrict__ b, const T* __restrict__ lut,    \
        long long* __restrict__ out, int n_rows, int o_rows, int k_len, int m)                  \
    {                                                                                           \
        lut_matmul_body<T, SIGNED, SHARED_TABLE>(a, b, lut, out, n_rows, o_rows, k_len, m);     \
    }

LUT_MATMUL_KERNEL(lut_matmul_i16_unsigned_shared, short, false, true)
LUT_MATMUL_KERNEL(lut_matmul_i16_unsigned_global, short, false, false)
LUT_MATMUL_KERNEL(lut_matmul_i16_signed_shared, short, true, true)
LUT_MATMUL_KERNEL(lut_matmul_i16_signed_global, short, true, false)
LUT_MATMUL_KERNEL(lut_matmul_u16_unsigned_shared, unsigned short, false, true)
LUT_MATMUL_KERNEL(lut_matmul_u16_unsigned_global, unsigned short, false, false)
LUT_MATMUL_KERNEL(lut_matmul_u16_signed_shared, unsigned short, true, true)
LUT_MATMUL_KERNEL(lut_matmul_u16_signed_global, unsigned short, true, false)
LUT_MATMUL_KERNEL(lut_matmul_i32_unsigned_shared, int, false, true)
LUT_MATMUL_KERNEL(lut_matmul_i32_unsigned_global, int, false, false)
LUT_MATMUL_KERNEL(lut_matmul_i32_signed_shared, int, true, true)
LUT_MATMUL_KERNEL(lut_matmul_i32_signed_global, int, true, false)
