// Per-element steps 1-4 of ENACT on one row's valid sequence, shared by the CPU kernel (serial
// loops over a row) and the CUDA kernel (one block per row, threads over the row's elements).
//
// For a row with valid logits l_1..l_n (pads removed, order kept), forward:
//   q_i  = softmax(l)_i                            (saved for backward)
//   h_i  = -p_i log2 p_i,  p_i = q_i + 1e-8        steps 1-2
//   h~_j = sum_t taps_t h_{j+t-r}                  step 3 (cross-correlation, zero padding, 'same')
//   s_j  = [2 h~_j - h~_{j-1} - h~_{j+1} > 0]      step 4 (zero padding at both ends)
// backward, from dL/dh~:
//   dL/dh_k = sum_t taps_t dL/dh~_{k-t+r}           the adjoint of step 3
//   dL/dq_i = dL/dh_i * -(log2 p_i + 1 / ln 2)
//   dL/dl_i = q_i (dL/dq_i - sum_j q_j dL/dq_j)     softmax backward
// All in the row's scalar type (float32 or float64): no fast math, no TF32.
#pragma once
#include <cmath>
#include <cstdint>

#include "segment_rows.h"  // ENACT_HOST_DEVICE

namespace enact {

ENACT_HOST_DEVICE float log2_of(float x) { return log2f(x); }
ENACT_HOST_DEVICE double log2_of(double x) { return log2(x); }
ENACT_HOST_DEVICE float exp_of(float x) { return expf(x); }
ENACT_HOST_DEVICE double exp_of(double x) { return exp(x); }

// h = -p log2 p with p = q + 1e-8 (steps 1-2 after the softmax).
template <typename T>
ENACT_HOST_DEVICE T information_of(T q) {
  const T p = q + T(1e-8);
  return -p * log2_of(p);
}

// dh/dq at q.
template <typename T>
ENACT_HOST_DEVICE T information_grad_of(T q) {
  const T p = q + T(1e-8);
  return -(log2_of(p) + T(1.4426950408889634));  // 1 / ln 2
}

// Backward of steps 1-2 at a valid token with softmax q and dL/dh = grad_h: its term of
// sum_j q_j dL/dq_j, then dL/dl = q (dL/dq - that sum).
template <typename T>
ENACT_HOST_DEVICE T information_dot_term(T q, T grad_h) {
  return q * grad_h * information_grad_of(q);
}
template <typename T>
ENACT_HOST_DEVICE T logit_grad_of(T q, T grad_h, T dot) {
  return q * (grad_h * information_grad_of(q) - dot);
}

// Cross-correlation of x[0..len) with taps[0..K) (K odd, centre r = K / 2) at j, zero outside.
template <typename T>
ENACT_HOST_DEVICE T correlate_at(const T* x, int64_t len, const T* taps, int64_t K, int64_t j) {
  const int64_t r = K / 2;
  T acc = 0;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t k = j + t - r;
    if (k >= 0 && k < len) acc += taps[t] * x[k];
  }
  return acc;
}

// The adjoint of correlate_at: sum_t taps_t g_{k-t+r} over 0 <= k-t+r < len.
template <typename T>
ENACT_HOST_DEVICE T correlate_adjoint_at(const T* g, int64_t len, const T* taps, int64_t K, int64_t k) {
  const int64_t r = K / 2;
  T acc = 0;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t j = k - t + r;
    if (j >= 0 && j < len) acc += taps[t] * g[j];
  }
  return acc;
}

// Step 4 at j: ([-1, 2, -1] * h~)_j > 0 with zeros outside [0, len).
template <typename T>
ENACT_HOST_DEVICE bool curvature_positive_at(const T* smoothed, int64_t len, int64_t j) {
  const T left = j > 0 ? smoothed[j - 1] : T(0);
  const T right = j + 1 < len ? smoothed[j + 1] : T(0);
  return (T(2) * smoothed[j] - left) - right > T(0);
}

}  // namespace enact
