// CUDA kernels of the enact_ops pooling operators (the segmentations are in segment_cuda.cu).
//
// Pooling forward: one block per segment; the block reduces the segment's max and sum of exps,
// writes the weights, then every thread owns channels and accumulates w_i x_i over the members.
// Pooling backward: one block per segment, one warp per member: the warp writes
// dx_i = w_i g and reduces d_i = <g, x_i>; a second kernel (one warp per segment) turns d into
// dscore_i = w_i (d_i - sum_j w_j d_j).  The fused variant (backward_sum) writes one gradient
// w_i sum_f g_f for features that flow into one tensor (keys = src + pos and values = src) and
// d_i = sum_f <g_f, x_f,i>.  Accumulation in float (double for double inputs).
// Index values are checked with device-side assertions (no host sync); sizes on the host.  No
// host syncs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include "../enact.h"
#include "block_reduce.cuh"

namespace enact {
namespace {

// Segment s of a CSR segmentation of B rows and T clustered tokens: its row b, its slot in the
// row and its token range [beg, end), each index checked by a device-side assertion before it is
// used (the op is public: no host sync, no read out of bounds).
struct SegmentView {
  int64_t b, slot, beg, end;
};

__device__ __forceinline__ SegmentView segment_at(int64_t s, const int64_t* __restrict__ seg_starts,
                                                  const int64_t* __restrict__ seg_batch,
                                                  const int64_t* __restrict__ row_offsets, int64_t B, int64_t T) {
  const int64_t b = seg_batch[s];
  CUDA_KERNEL_ASSERT(b >= 0 && b < B);
  const int64_t beg = seg_starts[s], end = seg_starts[s + 1];
  CUDA_KERNEL_ASSERT(beg >= 0 && beg <= end && end <= T);
  return {b, s - row_offsets[b], beg, end};
}

template <typename acc_t>
__global__ void segment_weights_kernel(const acc_t* __restrict__ scores,
                                       const int64_t* __restrict__ tokens,
                                       const int64_t* __restrict__ seg_starts,
                                       const int64_t* __restrict__ seg_batch,
                                       const int64_t* __restrict__ row_offsets, int64_t B, int64_t N,
                                       int64_t T, int64_t M, acc_t* __restrict__ weights) {
  __shared__ acc_t shared[kWarp];
  const auto [b, slot, beg, end] = segment_at(blockIdx.x, seg_starts, seg_batch, row_offsets, B, T);
  CUDA_KERNEL_ASSERT(slot >= 0 && slot < M);  // max_clusters covers the row
  acc_t mx = -INFINITY;
  for (int64_t t = beg + threadIdx.x; t < end; t += blockDim.x) {
    CUDA_KERNEL_ASSERT(tokens[t] >= b * N && tokens[t] < (b + 1) * N);
    mx = max(mx, scores[tokens[t]]);
  }
  mx = block_reduce<acc_t, true>(mx, shared);
  acc_t sum = 0;
  for (int64_t t = beg + threadIdx.x; t < end; t += blockDim.x) sum += exp(scores[tokens[t]] - mx);
  sum = block_reduce<acc_t, false>(sum, shared);
  for (int64_t t = beg + threadIdx.x; t < end; t += blockDim.x) {
    const int64_t i = tokens[t];
    weights[i] = exp(scores[i] - mx) / sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_pool_kernel(const acc_t* __restrict__ weights,
                                    const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                    int64_t stride_b, int64_t stride_n,
                                    const int64_t* __restrict__ tokens,
                                    const int64_t* __restrict__ seg_starts,
                                    const int64_t* __restrict__ seg_batch,
                                    const int64_t* __restrict__ row_offsets, int64_t B, int64_t T,
                                    int64_t M, scalar_t* __restrict__ out) {
  const auto [b, slot, beg, end] = segment_at(blockIdx.x, seg_starts, seg_batch, row_offsets, B, T);
  CUDA_KERNEL_ASSERT(slot >= 0 && slot < M);
  scalar_t* dst = out + (b * M + slot) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t acc = 0;
    for (int64_t t = beg; t < end; ++t) {
      const int64_t i = tokens[t];
      CUDA_KERNEL_ASSERT(i >= 0 && i / N == b);
      acc += weights[i] * static_cast<acc_t>(x[(i / N) * stride_b + (i % N) * stride_n + c]);
    }
    dst[c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_pool_backward_kernel(
    const acc_t* __restrict__ weights, const scalar_t* __restrict__ x, int64_t N, int64_t C,
    int64_t stride_b, int64_t stride_n, const scalar_t* __restrict__ grad_out, int64_t M,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_starts,
    const int64_t* __restrict__ seg_batch, const int64_t* __restrict__ row_offsets, int64_t B, int64_t T,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ dots) {
  const auto [b, slot, beg, end] = segment_at(blockIdx.x, seg_starts, seg_batch, row_offsets, B, T);
  CUDA_KERNEL_ASSERT(slot >= 0 && slot < M);  // grad_out's M covers the row
  const scalar_t* g = grad_out + (b * M + slot) * C;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t t = beg + warp; t < end; t += warps) {
    const int64_t i = tokens[t];
    CUDA_KERNEL_ASSERT(i >= 0 && i / N == b);
    const acc_t w = weights[i];
    const scalar_t* row = x + (i / N) * stride_b + (i % N) * stride_n;
    scalar_t* grow = grad_x + i * C;
    acc_t dot = 0;
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t gc = static_cast<acc_t>(g[c]);
      dot += gc * static_cast<acc_t>(row[c]);
      grow[c] = static_cast<scalar_t>(w * gc);
    }
    dot = warp_sum(dot);
    if (lane == 0) dots[t] += dot;  // one warp owns token t within a launch
  }
}

template <typename acc_t>
__global__ void segment_score_backward_kernel(const acc_t* __restrict__ weights,
                                              const acc_t* __restrict__ dots,
                                              const int64_t* __restrict__ tokens,
                                              const int64_t* __restrict__ seg_starts, int64_t S,
                                              int64_t T, acc_t* __restrict__ grad_scores) {
  const int lane = threadIdx.x % kWarp;
  const int64_t s = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / kWarp;
  if (s >= S) return;  // whole warps exit together
  const int64_t beg = seg_starts[s], end = seg_starts[s + 1];
  CUDA_KERNEL_ASSERT(beg >= 0 && beg <= end && end <= T);
  acc_t wd = 0;
  for (int64_t t = beg + lane; t < end; t += kWarp) wd += weights[tokens[t]] * dots[t];
  wd = warp_sum(wd);
  wd = __shfl_sync(0xffffffffu, wd, 0);
  for (int64_t t = beg + lane; t < end; t += kWarp) {
    const int64_t i = tokens[t];
    grad_scores[i] = weights[i] * (dots[t] - wd);
  }
}

// The fused backward for F features of one width whose gradients flow into one tensor: one
// block per segment, one warp per member token i: grad[i] = w_i sum_f g_f and
// dots[t] = sum_f <g_f, x_f,i> (each token is in one segment: plain stores, no atomics).
constexpr int kMaxSummed = 4;

template <typename scalar_t>
struct SummedFeatures {
  const scalar_t* x[kMaxSummed];
  const scalar_t* g[kMaxSummed];
  int64_t stride_b[kMaxSummed], stride_n[kMaxSummed], M[kMaxSummed];
  int count;
};

template <typename scalar_t, typename acc_t>
__global__ void segment_pool_backward_sum_kernel(
    const acc_t* __restrict__ weights, SummedFeatures<scalar_t> feats, int64_t N, int64_t C,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ seg_starts,
    const int64_t* __restrict__ seg_batch, const int64_t* __restrict__ row_offsets, int64_t B, int64_t T,
    scalar_t* __restrict__ grad_sum, int64_t out_b, int64_t out_n, acc_t* __restrict__ dots) {
  const auto [b, slot, beg, end] = segment_at(blockIdx.x, seg_starts, seg_batch, row_offsets, B, T);
  for (int f = 0; f < feats.count; ++f) CUDA_KERNEL_ASSERT(slot >= 0 && slot < feats.M[f]);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t t = beg + warp; t < end; t += warps) {
    const int64_t i = tokens[t];
    CUDA_KERNEL_ASSERT(i >= 0 && i / N == b);
    const int64_t bi = i / N, ni = i % N;
    const acc_t w = weights[i];
    scalar_t* grow = grad_sum + bi * out_b + ni * out_n;
    acc_t dot = 0;
    for (int64_t c = lane; c < C; c += kWarp) {
      acc_t gsum = 0;
      for (int f = 0; f < feats.count; ++f) {
        const acc_t gc = static_cast<acc_t>(feats.g[f][(b * feats.M[f] + slot) * C + c]);
        dot += gc * static_cast<acc_t>(feats.x[f][bi * feats.stride_b[f] + ni * feats.stride_n[f] + c]);
        gsum += gc;
      }
      grow[c] = static_cast<scalar_t>(w * gsum);
    }
    dot = warp_sum(dot);
    if (lane == 0) dots[t] = dot;
  }
}

int threads_for_channels(int64_t C) {
  const int64_t warps = std::min<int64_t>(8, std::max<int64_t>(1, (C + kWarp - 1) / kWarp));
  return static_cast<int>(warps * kWarp);
}

// dscore_i = w_i (d_i - sum_j w_j d_j) over each segment, from the dot products d.
at::Tensor score_backward_cuda(const at::Tensor& weights, const at::Tensor& dots,
                               const at::Tensor& tokens, const at::Tensor& seg_starts, int64_t S,
                               cudaStream_t stream) {
  auto grad_scores = at::zeros_like(weights);
  if (S > 0) {
    AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "score_bw_cuda", [&] {
      const int threads = 256, per_block = threads / kWarp;
      segment_score_backward_kernel<scalar_t><<<grid_x(blocks_for(S, per_block), "score backward"), threads, 0, stream>>>(
          weights.data_ptr<scalar_t>(), dots.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(),
          seg_starts.data_ptr<int64_t>(), S, tokens.numel(), grad_scores.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad_scores;
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> segment_softmax_pool_forward_cuda(
    const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
    const at::Tensor& seg_starts, const at::Tensor& seg_batch, const at::Tensor& row_offsets,
    int64_t max_clusters) {
  check_pool_inputs(scores, features, tokens, seg_starts, seg_batch, row_offsets);
  TORCH_CHECK(scores.is_cuda(), "enact_ops: segment_softmax_pool_forward_cuda expects CUDA tensors");
  // a row wider than max_clusters: the device-side assertion of segment_pool_kernel (no host sync)
  TORCH_CHECK(max_clusters >= 0, "enact_ops: max_clusters must be >= 0");
  c10::cuda::CUDAGuard guard(scores.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = scores.size(0), N = scores.size(1), S = seg_batch.numel();
  auto weights = at::zeros_like(scores);
  if (S > 0) {
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "segment_weights_cuda", [&] {
      segment_weights_kernel<scalar_t><<<grid_x(S, "pooling"), 128, 0, stream>>>(
          scores.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
          seg_batch.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>(), B, N, tokens.numel(), max_clusters,
          weights.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  std::vector<at::Tensor> pooled;
  for (const auto& x : features) {
    const int64_t C = x.size(2);
    auto out = at::zeros({B, max_clusters, C}, x.options());
    if (S > 0 && C > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        segment_pool_kernel<scalar_t, acc_t><<<grid_x(S, "pooling"), threads_for_channels(C), 0, stream>>>(
            weights.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), N, C, x.stride(0), x.stride(1),
            tokens.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
            seg_batch.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>(), B, tokens.numel(), max_clusters,
            out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    pooled.push_back(out);
  }
  return {pooled, weights};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> segment_softmax_pool_backward_cuda(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets) {
  check_pool_inputs(weights, features, tokens, seg_starts, seg_batch, row_offsets);
  TORCH_CHECK(weights.is_cuda(), "enact_ops: segment_softmax_pool_backward_cuda expects CUDA tensors");
  const auto grads = checked_grad_pooled(grad_pooled, features, row_offsets, /*summed=*/false);
  c10::cuda::CUDAGuard guard(weights.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = weights.size(1), S = seg_batch.numel(), T = tokens.numel();
  auto dots = at::zeros({T}, weights.options());
  std::vector<at::Tensor> grad_features;
  for (size_t f = 0; f < features.size(); ++f) {
    const auto& x = features[f];
    const auto& g = grads[f];
    const int64_t C = x.size(2);
    auto gx = at::zeros(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (S > 0 && C > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_bw_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        segment_pool_backward_kernel<scalar_t, acc_t><<<grid_x(S, "pooling backward"), 256, 0, stream>>>(
            weights.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), N, C, x.stride(0), x.stride(1),
            g.data_ptr<scalar_t>(), g.size(1), tokens.data_ptr<int64_t>(),
            seg_starts.data_ptr<int64_t>(), seg_batch.data_ptr<int64_t>(),
            row_offsets.data_ptr<int64_t>(), weights.size(0), T, gx.data_ptr<scalar_t>(), dots.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    grad_features.push_back(gx);
  }
  return {score_backward_cuda(weights, dots, tokens, seg_starts, S, stream), grad_features};
}

std::tuple<at::Tensor, at::Tensor> segment_softmax_pool_backward_sum_cuda(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets) {
  check_pool_inputs(weights, features, tokens, seg_starts, seg_batch, row_offsets);
  TORCH_CHECK(weights.is_cuda(), "enact_ops: segment_softmax_pool_backward_sum_cuda expects CUDA tensors");
  const auto g = checked_grad_pooled(grad_pooled, features, row_offsets, /*summed=*/true);
  TORCH_CHECK(features.size() <= static_cast<size_t>(kMaxSummed), "enact_ops: backward_sum takes at most ",
              kMaxSummed, " features, got ", features.size());
  c10::cuda::CUDAGuard guard(weights.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = weights.size(1), S = seg_batch.numel(), T = tokens.numel();
  const int64_t C = features[0].size(2);
  // features[0]'s layout (e.g. sequence-first); pads and cropped tokens stay zero
  auto grad_sum = at::zeros_like(features[0]);
  if (C > 0 && grad_sum.stride(2) != 1) grad_sum = at::zeros(features[0].sizes(), features[0].options());
  auto dots = at::zeros({T}, weights.options());
  if (S > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "pool_bw_sum_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      SummedFeatures<scalar_t> feats{};
      feats.count = static_cast<int>(features.size());
      for (int f = 0; f < feats.count; ++f) {
        feats.x[f] = features[f].data_ptr<scalar_t>();
        feats.g[f] = g[f].data_ptr<scalar_t>();
        feats.stride_b[f] = features[f].stride(0);
        feats.stride_n[f] = features[f].stride(1);
        feats.M[f] = g[f].size(1);
      }
      segment_pool_backward_sum_kernel<scalar_t, acc_t><<<grid_x(S, "pooling backward"), 256, 0, stream>>>(
          weights.data_ptr<acc_t>(), feats, N, C, tokens.data_ptr<int64_t>(),
          seg_starts.data_ptr<int64_t>(), seg_batch.data_ptr<int64_t>(),
          row_offsets.data_ptr<int64_t>(), weights.size(0), T, grad_sum.data_ptr<scalar_t>(), grad_sum.stride(0),
          grad_sum.stride(1), dots.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {score_backward_cuda(weights, dots, tokens, seg_starts, S, stream), grad_sum};
}

}  // namespace enact
