// CPU segment-softmax pooling.  For every segment s of row b (slot c):
//   w_i = exp(score_i - max) / sum_j exp(score_j - max)          (i, j members of s)
//   out_f[b, c, :] = sum_i w_i x_f[b, i, :]                       (each feature tensor f)
// Backward, with g_f = dL/dout_f[b, c] and d_i = sum_f <g_f, x_f[b, i]>:
//   dL/dx_f[b, i] = w_i g_f,     dL/dscore_i = w_i (d_i - sum_j w_j d_j).
// Weights and pooling are fused: no (B, N, C) weighted intermediate exists.  The "_sum" backward
// returns sum_f dL/dx_f (features of one width that feed one tensor) as one (B, N, C) gradient.
// Parallel over segments; accumulation in float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../enact.h"

namespace enact {
namespace {

struct SegIndex {
  const int64_t* tokens;
  const int64_t* seg_starts;
  const int64_t* seg_batch;
  const int64_t* row_offsets;
};

template <typename acc_t>
void segment_weights(const acc_t* scores, const SegIndex& ix, int64_t s, acc_t* weights) {
  const int64_t beg = ix.seg_starts[s], end = ix.seg_starts[s + 1];
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = beg; t < end; ++t) mx = std::max(mx, scores[ix.tokens[t]]);
  acc_t sum = 0;
  for (int64_t t = beg; t < end; ++t) sum += std::exp(scores[ix.tokens[t]] - mx);
  for (int64_t t = beg; t < end; ++t) {
    const int64_t i = ix.tokens[t];
    weights[i] = std::exp(scores[i] - mx) / sum;
  }
}

// dL/dscore_i = w_i (d_t - sum_{j in s} w_j d_j) for token i = tokens[t] of segment s.
at::Tensor score_backward(const at::Tensor& weights, const at::Tensor& dots, const SegIndex& ix,
                          int64_t S) {
  auto grad_scores = at::zeros_like(weights);
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "score_bw_cpu", [&] {
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* d = dots.data_ptr<scalar_t>();
    scalar_t* gs = grad_scores.data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        scalar_t wd = 0;
        for (int64_t t = ix.seg_starts[s]; t < ix.seg_starts[s + 1]; ++t)
          wd += w[ix.tokens[t]] * d[t];
        for (int64_t t = ix.seg_starts[s]; t < ix.seg_starts[s + 1]; ++t) {
          const int64_t i = ix.tokens[t];
          gs[i] = w[i] * (d[t] - wd);
        }
      }
    });
  });
  return grad_scores;
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> segment_softmax_pool_forward_cpu(
    const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
    const at::Tensor& seg_starts, const at::Tensor& seg_batch, const at::Tensor& row_offsets,
    int64_t max_clusters) {
  check_pool_inputs(scores, features, tokens, seg_starts, seg_batch, row_offsets);
  TORCH_CHECK(max_clusters >= 0, "enact_ops: max_clusters must be >= 0");
  const int64_t B = scores.size(0), N = scores.size(1), S = seg_batch.numel();
  const SegIndex ix{tokens.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
                    seg_batch.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>()};
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ix.row_offsets[b + 1] - ix.row_offsets[b] <= max_clusters,
                "enact_ops: max_clusters (", max_clusters, ") is smaller than the ",
                ix.row_offsets[b + 1] - ix.row_offsets[b], " clusters of row ", b);
  }
  auto weights = at::zeros_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "segment_weights_cpu", [&] {
    const scalar_t* sc = scores.data_ptr<scalar_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) segment_weights(sc, ix, s, w);
    });
  });
  std::vector<at::Tensor> pooled;
  for (const auto& x : features) {
    const int64_t C = x.size(2), sb = x.stride(0), sn = x.stride(1);
    auto out = at::zeros({B, max_clusters, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* w = weights.data_ptr<acc_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
        std::vector<acc_t> acc(C);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t b = ix.seg_batch[s], slot = s - ix.row_offsets[b];
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t t = ix.seg_starts[s]; t < ix.seg_starts[s + 1]; ++t) {
            const int64_t i = ix.tokens[t];
            const acc_t wi = w[i];
            const scalar_t* row = xp + (i / N) * sb + (i % N) * sn;
            for (int64_t c = 0; c < C; ++c) acc[c] += wi * static_cast<acc_t>(row[c]);
          }
          scalar_t* dst = op + (b * max_clusters + slot) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      });
    });
    pooled.push_back(out);
  }
  return {pooled, weights};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> segment_softmax_pool_backward_cpu(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets) {
  check_pool_inputs(weights, features, tokens, seg_starts, seg_batch, row_offsets);
  const auto grads = checked_grad_pooled(grad_pooled, features, row_offsets, /*summed=*/false);
  const int64_t N = weights.size(1), S = seg_batch.numel(), T = tokens.numel();
  const SegIndex ix{tokens.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
                    seg_batch.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>()};
  // d_t = sum_f <g_f[seg(t)], x_f[token t]>, accumulated tensor by tensor (acc dtype = weights').
  auto dots = at::zeros({T}, weights.options());
  std::vector<at::Tensor> grad_features;
  for (size_t f = 0; f < features.size(); ++f) {
    const auto& x = features[f];
    const auto& g = grads[f];
    const int64_t C = x.size(2), sb = x.stride(0), sn = x.stride(1), M = g.size(1);
    auto gx = at::zeros(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_bw_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* w = weights.data_ptr<acc_t>();
      acc_t* d = dots.data_ptr<acc_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* gxp = gx.data_ptr<scalar_t>();
      at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
        std::vector<acc_t> grow(C);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t b = ix.seg_batch[s], slot = s - ix.row_offsets[b];
          const scalar_t* gsrc = gp + (b * M + slot) * C;
          for (int64_t c = 0; c < C; ++c) grow[c] = static_cast<acc_t>(gsrc[c]);
          for (int64_t t = ix.seg_starts[s]; t < ix.seg_starts[s + 1]; ++t) {
            const int64_t i = ix.tokens[t];
            const acc_t wi = w[i];
            const scalar_t* row = xp + (i / N) * sb + (i % N) * sn;
            scalar_t* grow_out = gxp + i * C;
            acc_t dot = 0;
            for (int64_t c = 0; c < C; ++c) {
              dot += grow[c] * static_cast<acc_t>(row[c]);
              grow_out[c] = static_cast<scalar_t>(wi * grow[c]);
            }
            d[t] += dot;
          }
        }
      });
    });
    grad_features.push_back(gx);
  }
  auto grad_scores = score_backward(weights, dots, ix, S);
  return {grad_scores, grad_features};
}

// Backward for feature tensors of one width C whose input-gradients all flow into one tensor
// (keys = src + pos and values = src in encoder self-attention): instead of one (B, N, C)
// gradient per feature it returns their sum,  grad_sum[b, n] = w_i sum_f g_f[b, seg(i)],  laid
// out like features[0] (zeros outside any cluster), in a single pass over the tokens.
std::tuple<at::Tensor, at::Tensor> segment_softmax_pool_backward_sum_cpu(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets) {
  check_pool_inputs(weights, features, tokens, seg_starts, seg_batch, row_offsets);
  const auto g = checked_grad_pooled(grad_pooled, features, row_offsets, /*summed=*/true);
  const int64_t N = weights.size(1), S = seg_batch.numel(), T = tokens.numel();
  const int64_t F = static_cast<int64_t>(features.size()), C = features[0].size(2);
  const SegIndex ix{tokens.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(),
                    seg_batch.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>()};
  // features[0]'s layout (e.g. sequence-first); every clustered row is written below, the others
  // (pads, cropped tokens) are zeroed here
  auto grad_sum = at::empty_like(features[0]);
  if (C > 0 && grad_sum.stride(2) != 1) grad_sum = at::empty(features[0].sizes(), features[0].options());
  const int64_t ob = grad_sum.stride(0), on = grad_sum.stride(1);
  {
    std::vector<char> clustered(weights.numel(), 0);
    for (int64_t t = 0; t < T; ++t) clustered[ix.tokens[t]] = 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_sum.scalar_type(), "pool_bw_sum_zero", [&] {
      scalar_t* out = grad_sum.data_ptr<scalar_t>();
      at::parallel_for(0, weights.numel(), 256, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          if (!clustered[i]) std::fill_n(out + (i / N) * ob + (i % N) * on, C, scalar_t(0));
      });
    });
  }
  auto dots = at::zeros({T}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "pool_bw_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = weights.data_ptr<acc_t>();
    acc_t* d = dots.data_ptr<acc_t>();
    std::vector<const scalar_t*> xp(F), gp(F);
    std::vector<int64_t> sb(F), sn(F), M(F);
    for (int64_t f = 0; f < F; ++f) {
      xp[f] = features[f].data_ptr<scalar_t>();
      gp[f] = g[f].data_ptr<scalar_t>();
      sb[f] = features[f].stride(0);
      sn[f] = features[f].stride(1);
      M[f] = g[f].size(1);
    }
    scalar_t* out = grad_sum.data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
      std::vector<acc_t> grow(F * C), gsum(C);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = ix.seg_batch[s], slot = s - ix.row_offsets[b];
        std::fill(gsum.begin(), gsum.end(), acc_t(0));
        for (int64_t f = 0; f < F; ++f) {
          const scalar_t* gsrc = gp[f] + (b * M[f] + slot) * C;
          acc_t* gf = grow.data() + f * C;
          for (int64_t c = 0; c < C; ++c) {
            gf[c] = static_cast<acc_t>(gsrc[c]);
            gsum[c] += gf[c];
          }
        }
        for (int64_t t = ix.seg_starts[s]; t < ix.seg_starts[s + 1]; ++t) {
          const int64_t i = ix.tokens[t], bi = i / N, ni = i % N;
          acc_t dot = 0;
          for (int64_t f = 0; f < F; ++f) {
            const scalar_t* row = xp[f] + bi * sb[f] + ni * sn[f];
            const acc_t* gf = grow.data() + f * C;
            for (int64_t c = 0; c < C; ++c) dot += gf[c] * static_cast<acc_t>(row[c]);
          }
          d[t] = dot;
          const acc_t wi = w[i];
          scalar_t* dst = out + bi * ob + ni * on;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(wi * gsum[c]);
        }
      }
    });
  });
  return {score_backward(weights, dots, ix, S), grad_sum};
}

}  // namespace enact
