// CPU kernels of steps 1-4 (smoothed self-information and curvature sign) and their backward:
// rows in parallel (at::parallel_for), the row's valid sequence compacted into a scratch
// buffer, the per-element formulas of information_row.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "../enact.h"
#include "../information_row.h"

namespace enact {
namespace {

// Rows per task: at least ATen's grain of work (N K multiply-adds per row), so small batches
// stay on one thread instead of paying a parallel region per call.
int64_t rows_per_task(int64_t N, int64_t K) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, N * K));
}

template <typename T>
void information_forward_row(const T* logits, const bool* valid, const T* taps, int64_t K, int64_t N,
                             T* smoothed, bool* sign, T* probs, int64_t* length, int64_t* runs,
                             std::vector<T>& h, std::vector<T>& sm) {
  T mx = -std::numeric_limits<T>::infinity();
  int64_t len = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (valid != nullptr && !valid[n]) continue;
    mx = std::max(mx, logits[n]);
    ++len;
  }
  *length = len;
  *runs = 0;
  if (len == 0) {
    for (int64_t n = 0; n < N; ++n) smoothed[n] = probs[n] = T(0), sign[n] = false;
    return;
  }
  T z = 0;
  for (int64_t n = 0; n < N; ++n)
    if (valid == nullptr || valid[n]) z += exp_of(logits[n] - mx);
  h.resize(len);
  sm.resize(len);
  for (int64_t n = 0, j = 0; n < N; ++n) {
    if (valid != nullptr && !valid[n]) {
      probs[n] = T(0);
      continue;
    }
    const T q = exp_of(logits[n] - mx) / z;
    probs[n] = q;
    h[j++] = information_of(q);
  }
  for (int64_t j = 0; j < len; ++j) sm[j] = correlate_at(h.data(), len, taps, K, j);
  bool last = false;
  for (int64_t n = 0, j = 0; n < N; ++n) {
    if (valid != nullptr && !valid[n]) {
      smoothed[n] = T(0);
      sign[n] = false;
      continue;
    }
    const bool s = curvature_positive_at(sm.data(), len, j);
    smoothed[n] = sm[j];
    sign[n] = s;
    *runs += (j == 0 || s != last);
    last = s;
    ++j;
  }
}

template <typename T>
void information_backward_row(const T* grad, const T* probs, const bool* valid, const T* taps, int64_t K,
                              int64_t N, T* grad_logits, std::vector<T>& g, std::vector<T>& gh) {
  int64_t len = 0;
  g.resize(N);
  for (int64_t n = 0; n < N; ++n)
    if (valid == nullptr || valid[n]) g[len++] = grad[n];
  gh.resize(len);
  for (int64_t k = 0; k < len; ++k) gh[k] = correlate_adjoint_at(g.data(), len, taps, K, k);
  T dot = 0;  // sum_j q_j dL/dq_j
  for (int64_t n = 0, j = 0; n < N; ++n)
    if (valid == nullptr || valid[n]) dot += information_dot_term(probs[n], gh[j++]);
  for (int64_t n = 0, j = 0; n < N; ++n)
    grad_logits[n] = (valid == nullptr || valid[n]) ? logit_grad_of(probs[n], gh[j++], dot) : T(0);
}

}  // namespace

InformationTuple smoothed_information_cpu(const at::Tensor& logits_in, const std::optional<at::Tensor>& valid_in,
                                          const at::Tensor& taps_in) {
  check_information_inputs(logits_in, valid_in, taps_in);
  const auto logits = logits_in.contiguous();
  const auto taps = taps_in.contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), N = logits.size(1), K = taps.numel();
  const InformationOutputs out(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smoothed_information_cpu", [&] {
    const scalar_t* l = logits.data_ptr<scalar_t>();
    const bool* vd = valid.defined() ? valid.data_ptr<bool>() : nullptr;
    const scalar_t* tp = taps.data_ptr<scalar_t>();
    scalar_t* sm = out.smoothed.data_ptr<scalar_t>();
    bool* sg = out.sign.data_ptr<bool>();
    scalar_t* pr = out.probs.data_ptr<scalar_t>();
    int64_t* ln = out.lengths.data_ptr<int64_t>();
    int64_t* rn = out.runs.data_ptr<int64_t>();
    at::parallel_for(0, B, rows_per_task(N, K), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> h, s;
      for (int64_t b = b0; b < b1; ++b)
        information_forward_row(l + b * N, vd ? vd + b * N : nullptr, tp, K, N, sm + b * N, sg + b * N,
                                pr + b * N, ln + b, rn + b, h, s);
    });
  });
  return out.tuple();
}

at::Tensor smoothed_information_backward_cpu(const at::Tensor& grad_smoothed, const at::Tensor& probs_in,
                                             const std::optional<at::Tensor>& valid_in, const at::Tensor& taps_in) {
  check_information_backward_inputs(grad_smoothed, probs_in, valid_in, taps_in);
  const auto grad = grad_smoothed.contiguous();
  const auto probs = probs_in.contiguous();
  const auto taps = taps_in.contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t B = probs.size(0), N = probs.size(1), K = taps.numel();
  auto grad_logits = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "smoothed_information_backward_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* q = probs.data_ptr<scalar_t>();
    const bool* vd = valid.defined() ? valid.data_ptr<bool>() : nullptr;
    const scalar_t* tp = taps.data_ptr<scalar_t>();
    scalar_t* gl = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_per_task(N, K), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> compact, adjoint;
      for (int64_t b = b0; b < b1; ++b)
        information_backward_row(g + b * N, q + b * N, vd ? vd + b * N : nullptr, tp, K, N, gl + b * N, compact,
                                 adjoint);
    });
  });
  return grad_logits;
}

}  // namespace enact
