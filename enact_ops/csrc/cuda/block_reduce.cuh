// Warp- and block-wide reductions and scans shared by the CUDA kernels of enact_ops, and the
// launch-size helpers.  A block's threads must all call the block-wide functions (they
// synchronise); blockDim.x a multiple of 32, at most 1024.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace enact {

constexpr int kWarp = 32;

inline int64_t blocks_for(int64_t n, int threads) { return (n + threads - 1) / threads; }

// A grid of `blocks` blocks along x: CUDA's limit is 2^31 - 1.
inline unsigned int grid_x(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks >= 0 && blocks <= std::numeric_limits<int32_t>::max(), "enact_ops: ", what,
              " needs ", blocks, " blocks, more than CUDA's grid limit (2^31 - 1)");
  return static_cast<unsigned int>(blocks);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = max(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

// Block-wide reduction of one value per thread; every thread gets the result.
// shared: kWarp entries of T.
template <typename T, bool IsMax>
__device__ T block_reduce(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = IsMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T r = lane < warps ? shared[lane] : (IsMax ? -INFINITY : T(0));
    r = IsMax ? warp_max(r) : warp_sum(r);
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  const T out = shared[0];
  __syncthreads();
  return out;
}

// Block-wide exclusive prefix sum of one value per thread, in thread order: thread t gets
// v_0 + ... + v_{t-1}; every thread's *total (optional) gets the sum over the block.
// shared: kWarp + 1 entries of T.
template <typename T>
__device__ T block_exclusive_sum(T v, T* shared, T* total = nullptr) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  T inclusive = v;  // inclusive scan within the warp
  for (int off = 1; off < kWarp; off *= 2) {
    const T up = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == kWarp - 1) shared[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // scan of the warps' totals
    const T w = lane < warps ? shared[lane] : T(0);
    T acc = w;
    for (int off = 1; off < kWarp; off *= 2) {
      const T up = __shfl_up_sync(0xffffffffu, acc, off);
      if (lane >= off) acc += up;
    }
    __syncwarp();
    if (lane < warps) shared[lane] = acc - w;  // exclusive offset of warp `lane`
    if (lane == kWarp - 1) shared[kWarp] = acc;  // the block's total
  }
  __syncthreads();
  const T out = shared[warp] + inclusive - v;
  if (total != nullptr) *total = shared[kWarp];
  __syncthreads();
  return out;
}

}  // namespace enact
