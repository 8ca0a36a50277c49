// A CPU stand-in for the CUDA features that approxctl/kernels/*.cu use, so the kernels' own
// source runs under g++ in tests/test_kernels_emulated.py (no GPU needed).
//
// Blocks run one after another; the threads of a block run as real std::threads that meet at a
// std::barrier in __syncthreads(). `__shared__` becomes `static`: one copy of each shared array
// per kernel instantiation, shared by all the threads of the running block, exactly the
// visibility CUDA gives shared memory. Races that the kernels' __syncthreads() would not prevent
// on a GPU can therefore show up here as wrong results.
#pragma once

#define APPROXCTL_CPU_EMULATION 1

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct emu_dim3 {
    unsigned int x, y, z;
};

inline thread_local emu_dim3 threadIdx;
inline thread_local emu_dim3 blockIdx;
inline emu_dim3 blockDim;
inline emu_dim3 gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __shared__ static

struct alignas(16) int4 {
    int x, y, z, w;
};

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

inline int min(int a, int b) { return a < b ? a : b; }

// The lut kernels' dynamic shared memory (the largest table: 256 x 256 int32).
alignas(16) static unsigned char lut_smem[256 * 256 * 4];

template <typename... Args, std::size_t... I>
void emu_call(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(params[I])...);
}

// Runs `kernel` over the grid; params[i] points at the value of argument i (cuLaunchKernel's
// convention).
template <typename... Args>
int emu_run(void (*kernel)(Args...), unsigned gx, unsigned gy, unsigned gz, unsigned threads,
            void** params) {
    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                std::barrier<> barrier(threads);
                emu_block_barrier = &barrier;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([=] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        emu_call(kernel, params, std::index_sequence_for<Args...>{});
                    });
                }
                for (auto& th : pool) {
                    th.join();
                }
            }
        }
    }
    return 0;
}
