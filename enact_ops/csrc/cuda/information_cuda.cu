// CUDA kernels of steps 1-4 (smoothed self-information and curvature sign) and their backward:
// one block per row.  Each thread owns a contiguous chunk of the row's tokens; a block-wide
// exclusive scan of the chunks' valid counts gives every valid token its position in the row's
// valid sequence, so the row is compacted into a scratch buffer in one pass, the correlations
// run over the compacted row (threads strided over its positions) and the results are written
// back to the token positions.  The per-element formulas are information_row.h's (shared with
// the CPU kernels).  One launch forward, one backward; no host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../enact.h"
#include "../information_row.h"
#include "block_reduce.cuh"

namespace enact {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ bool is_valid(const bool* valid, int64_t n) { return valid == nullptr || valid[n]; }

// Forward.  Per row b: probs (softmax over the valid logits, 0 at pads), smoothed h~ and sign s
// at the token positions (0 / false at pads), lengths[b] (valid tokens) and runs[b] (maximal runs
// of equal s over the valid sequence).  compact / smooth: (B, N) scratch.
template <typename T>
__global__ void smoothed_information_kernel(const T* __restrict__ logits, const bool* __restrict__ valid,
                                            const T* __restrict__ taps, int64_t K, int64_t N,
                                            T* __restrict__ smoothed, bool* __restrict__ sign,
                                            T* __restrict__ probs, int64_t* __restrict__ lengths,
                                            int64_t* __restrict__ runs, T* __restrict__ compact,
                                            T* __restrict__ smooth) {
  __shared__ T shared[kWarp + 1];
  __shared__ int64_t shared_i[kWarp + 1];
  const int64_t b = blockIdx.x;
  logits += b * N, smoothed += b * N, sign += b * N, probs += b * N, compact += b * N, smooth += b * N;
  if (valid != nullptr) valid += b * N;
  const int64_t chunk = (N + blockDim.x - 1) / blockDim.x;
  const int64_t beg = min(N, threadIdx.x * chunk), end = min(N, beg + chunk);

  T mx = -INFINITY;
  int64_t count = 0;
  for (int64_t n = beg; n < end; ++n) {
    if (!is_valid(valid, n)) continue;
    mx = max(mx, logits[n]);
    ++count;
  }
  mx = block_reduce<T, true>(mx, shared);
  int64_t len = 0;
  const int64_t offset = block_exclusive_sum<int64_t>(count, shared_i, &len);  // chunk's first position
  if (len == 0) {  // the whole block takes this branch
    for (int64_t n = beg; n < end; ++n) smoothed[n] = probs[n] = T(0), sign[n] = false;
    if (threadIdx.x == 0) lengths[b] = runs[b] = 0;
    return;
  }
  T z = 0;
  for (int64_t n = beg; n < end; ++n)
    if (is_valid(valid, n)) z += exp_of(logits[n] - mx);
  z = block_reduce<T, false>(z, shared);
  for (int64_t n = beg, j = offset; n < end; ++n) {
    if (!is_valid(valid, n)) {
      probs[n] = T(0);
      continue;
    }
    const T q = exp_of(logits[n] - mx) / z;
    probs[n] = q;
    compact[j++] = information_of(q);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) smooth[j] = correlate_at(compact, len, taps, K, j);
  __syncthreads();
  int64_t changes = 0;  // sign changes between consecutive valid tokens of this chunk and the one before
  for (int64_t n = beg, j = offset; n < end; ++n) {
    if (!is_valid(valid, n)) {
      smoothed[n] = T(0);
      sign[n] = false;
      continue;
    }
    const bool s = curvature_positive_at(smooth, len, j);
    smoothed[n] = smooth[j];
    sign[n] = s;
    changes += (j > 0 && s != curvature_positive_at(smooth, len, j - 1));
    ++j;
  }
  int64_t total = 0;
  block_exclusive_sum<int64_t>(changes, shared_i, &total);
  if (threadIdx.x == 0) {
    lengths[b] = len;
    runs[b] = 1 + total;
  }
}

// Backward: grad_logits from grad_smoothed (the formulas of information_row.h), 0 at pads.
// compact / adjoint: (B, N) scratch.
template <typename T>
__global__ void smoothed_information_backward_kernel(const T* __restrict__ grad, const T* __restrict__ probs,
                                                     const bool* __restrict__ valid, const T* __restrict__ taps,
                                                     int64_t K, int64_t N, T* __restrict__ grad_logits,
                                                     T* __restrict__ compact, T* __restrict__ adjoint) {
  __shared__ T shared[kWarp + 1];
  __shared__ int64_t shared_i[kWarp + 1];
  const int64_t b = blockIdx.x;
  grad += b * N, probs += b * N, grad_logits += b * N, compact += b * N, adjoint += b * N;
  if (valid != nullptr) valid += b * N;
  const int64_t chunk = (N + blockDim.x - 1) / blockDim.x;
  const int64_t beg = min(N, threadIdx.x * chunk), end = min(N, beg + chunk);

  int64_t count = 0;
  for (int64_t n = beg; n < end; ++n) count += is_valid(valid, n);
  int64_t len = 0;
  const int64_t offset = block_exclusive_sum<int64_t>(count, shared_i, &len);
  for (int64_t n = beg, j = offset; n < end; ++n)
    if (is_valid(valid, n)) compact[j++] = grad[n];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x)
    adjoint[k] = correlate_adjoint_at(compact, len, taps, K, k);
  __syncthreads();
  T dot = 0;  // sum_j q_j dL/dq_j
  for (int64_t n = beg, j = offset; n < end; ++n)
    if (is_valid(valid, n)) dot += information_dot_term(probs[n], adjoint[j++]);
  dot = block_reduce<T, false>(dot, shared);
  for (int64_t n = beg, j = offset; n < end; ++n)
    grad_logits[n] = is_valid(valid, n) ? logit_grad_of(probs[n], adjoint[j++], dot) : T(0);
}

}  // namespace

InformationTuple smoothed_information_cuda(const at::Tensor& logits_in, const std::optional<at::Tensor>& valid_in,
                                           const at::Tensor& taps_in) {
  check_information_inputs(logits_in, valid_in, taps_in);
  TORCH_CHECK(logits_in.is_cuda(), "enact_ops: smoothed_information_cuda expects CUDA tensors");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto taps = taps_in.contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), N = logits.size(1), K = taps.numel();
  const InformationOutputs out(logits);
  if (B > 0) {
    auto scratch = at::empty({2, B, N}, logits.options());
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smoothed_information_cuda", [&] {
      smoothed_information_kernel<scalar_t><<<grid_x(B, "smoothed_information"), kRowThreads, 0,
                                              c10::cuda::getCurrentCUDAStream()>>>(
          logits.data_ptr<scalar_t>(), valid.defined() ? valid.data_ptr<bool>() : nullptr,
          taps.data_ptr<scalar_t>(), K, N, out.smoothed.data_ptr<scalar_t>(), out.sign.data_ptr<bool>(),
          out.probs.data_ptr<scalar_t>(), out.lengths.data_ptr<int64_t>(), out.runs.data_ptr<int64_t>(),
          scratch[0].data_ptr<scalar_t>(), scratch[1].data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.tuple();
}

at::Tensor smoothed_information_backward_cuda(const at::Tensor& grad_smoothed, const at::Tensor& probs_in,
                                              const std::optional<at::Tensor>& valid_in, const at::Tensor& taps_in) {
  check_information_backward_inputs(grad_smoothed, probs_in, valid_in, taps_in);
  TORCH_CHECK(probs_in.is_cuda(), "enact_ops: smoothed_information_backward_cuda expects CUDA tensors");
  c10::cuda::CUDAGuard guard(probs_in.device());
  const auto grad = grad_smoothed.contiguous();
  const auto probs = probs_in.contiguous();
  const auto taps = taps_in.contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = probs.size(0), N = probs.size(1), K = taps.numel();
  auto grad_logits = at::empty_like(probs);
  if (B > 0) {
    auto scratch = at::empty({2, B, N}, probs.options());
    AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "smoothed_information_backward_cuda", [&] {
      smoothed_information_backward_kernel<scalar_t><<<grid_x(B, "smoothed_information backward"),
                                                       kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), valid.defined() ? valid.data_ptr<bool>() : nullptr,
          taps.data_ptr<scalar_t>(), K, N, grad_logits.data_ptr<scalar_t>(), scratch[0].data_ptr<scalar_t>(),
          scratch[1].data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad_logits;
}

}  // namespace enact
