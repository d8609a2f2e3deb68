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

// The identity of max: -infinity for floating types, the lowest value for integers.
template <typename T>
__device__ __forceinline__ T lowest_of() {
  return std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::lowest();
}

// Block-wide reduction of one value per thread; every thread gets the result.
// shared: kWarp entries of T.
template <typename T, bool IsMax>
__device__ T block_reduce(T v, T* shared) {
  CUDA_KERNEL_ASSERT(blockDim.x % kWarp == 0);  // full warps: the shuffles' masks are all lanes
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = IsMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T r = lane < warps ? shared[lane] : (IsMax ? lowest_of<T>() : T(0));
    r = IsMax ? warp_max(r) : warp_sum(r);
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  const T out = shared[0];
  __syncthreads();
  return out;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};

// Block-wide exclusive scan of one value per thread with the associative `op` (identity
// `identity`), in thread order: thread t gets op(v_0, ..., v_{t-1}), thread 0 `identity`;
// every thread's *total (optional) gets op over the block.  T: a type __shfl_up_sync moves
// (32- or 64-bit integers, float, double).  shared: kWarp + 1 entries of T.
template <typename T, typename Op>
__device__ T block_exclusive_scan(T v, T identity, Op op, T* shared, T* total = nullptr) {
  CUDA_KERNEL_ASSERT(blockDim.x % kWarp == 0);  // full warps: the shuffles' masks are all lanes
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  T inclusive = v;  // inclusive scan within the warp
  for (int off = 1; off < kWarp; off *= 2) {
    const T up = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive = op(up, inclusive);
  }
  T exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) exclusive = identity;
  if (lane == kWarp - 1) shared[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the warps' totals
    const T w = lane < warps ? shared[lane] : identity;
    T acc = w;
    for (int off = 1; off < kWarp; off *= 2) {
      const T up = __shfl_up_sync(0xffffffffu, acc, off);
      if (lane >= off) acc = op(up, acc);
    }
    T before = __shfl_up_sync(0xffffffffu, acc, 1);
    if (lane == 0) before = identity;
    __syncwarp();
    if (lane < warps) shared[lane] = before;   // what the warps before warp `lane` hold
    if (lane == kWarp - 1) shared[kWarp] = acc;  // the block's total
  }
  __syncthreads();
  const T out = op(shared[warp], exclusive);
  if (total != nullptr) *total = shared[kWarp];
  __syncthreads();
  return out;
}

// Block-wide exclusive prefix sum of one value per thread, in thread order: thread t gets
// v_0 + ... + v_{t-1}; every thread's *total (optional) gets the sum over the block.
// shared: kWarp + 1 entries of T.
template <typename T>
__device__ T block_exclusive_sum(T v, T* shared, T* total = nullptr) {
  return block_exclusive_scan(v, T(0), SumOp(), shared, total);
}

// Block-wide exclusive max: thread t gets max(lowest, v_0, ..., v_{t-1}).
template <typename T>
__device__ T block_exclusive_max(T v, T lowest, T* shared, T* total = nullptr) {
  return block_exclusive_scan(v, lowest, MaxOp(), shared, total);
}

}  // namespace enact
