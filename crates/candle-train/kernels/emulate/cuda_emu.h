// Compiles kernels/optim.cu as host C++ (g++ -std=c++20 -ffp-contract=off), so its kernels
// can be checked against the CPU kernels on a machine without a GPU (tests/cuda_kernels.rs).
// A block's threads are real threads sharing the block's `__shared__` arrays (function-local
// statics: blocks run one after another) and meeting at `__syncthreads` (a std::barrier);
// the round-to-nearest intrinsics are IEEE host operations (no contraction: -ffp-contract=off).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline dim3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;
inline thread_local dim3 threadIdx;
inline std::barrier<> *emu_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// Runs `kernel` on a grid of `grid` blocks of `block` threads, one block at a time.
inline void emu_launch(unsigned grid, unsigned block, const std::function<void()> &kernel) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> barrier(block);
    emu_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([t, &kernel] {
        threadIdx.x = t;
        kernel();
      });
    }
    for (auto &th : threads) {
      th.join();
    }
    emu_barrier = nullptr;
  }
}
