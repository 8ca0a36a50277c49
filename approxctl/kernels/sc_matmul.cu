// sc_matmul (SPEC 3.2): split-unipolar stochastic-computing GEMM (N,K) x (O,K) -> int64 (N,O,2).
//
// The stream of value q at reduction index k has bit t = (C[(t + phase(k)) mod L] < q). The host
// (approxctl/backends/cuda_kernels.py) builds, from the LFSR cycles of approxctl/streams.py, the
// packed stream of every (phase, value): table[(phase * (L + 1) + value) * words + w] holds bits
// t = 32 w .. 32 w + 31 (bit i of the word is t = 32 w + i; L = 16 uses the low 16 bits of one
// word). It also passes phase(k) for k = 0..K-1 of the activation and weight rules. Then
//
//   out[n,o,0] = popcount(OR_k (stream_A(a[n,k], k) AND stream_B(b_pos[o,k], k)))
//   out[n,o,1] = popcount(OR_k (stream_A(a[n,k], k) AND stream_B(b_neg[o,k], k)))
//
// AND and OR act bit for bit, so each 32-bit word of the streams is independent: blockIdx.z
// selects the word, the block ORs that word over all of K for a 64 x 64 output tile (4 x 4
// outputs per thread, accumulators in registers) and adds its popcounts to the zero-initialized
// output with atomicAdd (integer addition: the order of the words cannot change the result).
// Padded operands (rows past N/O, k past K) load the all-zero word, which is neutral for OR.

#define SC_TILE_N 64
#define SC_TILE_O 64
#define SC_TILE_K 16
#define SC_THREADS 256

extern "C" __global__ void __launch_bounds__(SC_THREADS) sc_matmul(
    const short* __restrict__ a,               // (N, K) activation stream values in [0, L]
    const short* __restrict__ b_pos,           // (O, K) weight stream values in [0, L]
    const short* __restrict__ b_neg,           // (O, K)
    const int* __restrict__ phase_a,           // (K,) activation phase(k) in [0, L)
    const int* __restrict__ phase_b,           // (K,) weight phase(k) in [0, L)
    const unsigned int* __restrict__ table_a,  // (L, L + 1, words) packed activation streams
    const unsigned int* __restrict__ table_b,  // (L, L + 1, words) packed weight streams
    unsigned long long* __restrict__ out,      // (N, O, 2) int64, zero on entry
    int n_rows, int o_rows, int k_len, int length, int words)
{
    __shared__ unsigned int s_a[SC_TILE_K][SC_TILE_N + 1];
    __shared__ unsigned int s_pos[SC_TILE_K][SC_TILE_O + 1];
    __shared__ unsigned int s_neg[SC_TILE_K][SC_TILE_O + 1];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const long long n0 = (long long)blockIdx.x * SC_TILE_N;
    const long long o0 = (long long)blockIdx.y * SC_TILE_O;
    const int w = blockIdx.z;
    const int values = length + 1;

    unsigned int acc_pos[4][4];
    unsigned int acc_neg[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc_pos[i][j] = 0u;
            acc_neg[i][j] = 0u;
        }
    }

    for (int k0 = 0; k0 < k_len; k0 += SC_TILE_K) {
        for (int e = tid; e < SC_TILE_N * SC_TILE_K; e += SC_THREADS) {
            const int r = e / SC_TILE_K;
            const int c = e % SC_TILE_K;
            const long long n = n0 + r;
            const int k = k0 + c;
            unsigned int word = 0u;
            if (n < n_rows && k < k_len) {
                const int q = a[n * k_len + k];
                word = __ldg(table_a + ((long long)phase_a[k] * values + q) * words + w);
            }
            s_a[c][r] = word;
        }
        for (int e = tid; e < SC_TILE_O * SC_TILE_K; e += SC_THREADS) {
            const int r = e / SC_TILE_K;
            const int c = e % SC_TILE_K;
            const long long o = o0 + r;
            const int k = k0 + c;
            unsigned int word_pos = 0u;
            unsigned int word_neg = 0u;
            if (o < o_rows && k < k_len) {
                const long long base = (long long)phase_b[k] * values;
                const int q_pos = b_pos[o * k_len + k];
                const int q_neg = b_neg[o * k_len + k];
                word_pos = __ldg(table_b + (base + q_pos) * words + w);
                word_neg = __ldg(table_b + (base + q_neg) * words + w);
            }
            s_pos[c][r] = word_pos;
            s_neg[c][r] = word_neg;
        }
        __syncthreads();

#pragma unroll 4
        for (int kk = 0; kk < SC_TILE_K; ++kk) {
            unsigned int sa[4], sp[4], sn[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                sa[i] = s_a[kk][ty + 16 * i];
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                sp[j] = s_pos[kk][tx + 16 * j];
                sn[j] = s_neg[kk][tx + 16 * j];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc_pos[i][j] |= sa[i] & sp[j];  // AND multiplies, OR accumulates
                    acc_neg[i][j] |= sa[i] & sn[j];
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
                unsigned long long* cell = out + (n * o_rows + o) * 2;
                atomicAdd(cell, (unsigned long long)__popc(acc_pos[i][j]));
                atomicAdd(cell + 1, (unsigned long long)__popc(acc_neg[i][j]));
            }
        }
    }
}
