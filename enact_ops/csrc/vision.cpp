// Registers the enact_ops operators with the torch library registry (torch.ops.enact_ops.*)
// and holds the host-side input checks that every device implementation runs first.
#include <torch/extension.h>

#include "enact.h"

namespace enact {

void check_segmentation_inputs(const at::Tensor& sign, const at::Tensor& valid) {
  TORCH_CHECK(sign.dim() == 2, "enact_ops: sign must be (B, N), got ", sign.dim(), " dims");
  TORCH_CHECK(sign.scalar_type() == at::kBool, "enact_ops: sign must be bool, got ",
              sign.scalar_type());
  TORCH_CHECK(valid.dim() == 2 && valid.sizes() == sign.sizes(),
              "enact_ops: valid must have the shape of sign ", sign.sizes(), ", got ",
              valid.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "enact_ops: valid must be bool, got ",
              valid.scalar_type());
  TORCH_CHECK(valid.device() == sign.device(), "enact_ops: sign and valid must be on one device");
}

void check_segmentation_sizes(std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  TORCH_CHECK(num_segments.has_value() == num_tokens.has_value(),
              "enact_ops: give both num_segments and num_tokens, or neither");
  TORCH_CHECK(!num_segments.has_value() || (*num_segments >= 0 && *num_tokens >= 0),
              "enact_ops: num_segments and num_tokens must be >= 0, got ", num_segments.value_or(0), " and ",
              num_tokens.value_or(0));
}

void check_pool_inputs(const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
                       const at::Tensor& seg_starts, const at::Tensor& seg_batch,
                       const at::Tensor& row_offsets) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(),
              "enact_ops: scores must be a contiguous (B, N) tensor");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "enact_ops: scores must be float32 or float64, got ", scores.scalar_type());
  const auto B = scores.size(0), N = scores.size(1);
  for (size_t f = 0; f < features.size(); ++f) {
    const auto& x = features[f];
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(1) == N, "enact_ops: features[", f,
                "] must be (B, N, C) = (", B, ", ", N, ", C), got ", x.sizes());
    TORCH_CHECK(x.size(2) == 0 || x.stride(2) == 1, "enact_ops: features[", f,
                "] must be contiguous in its last dimension");
    TORCH_CHECK(x.device() == scores.device(), "enact_ops: features[", f,
                "] is on ", x.device(), ", scores on ", scores.device());
    const bool want_double = x.scalar_type() == at::kDouble;
    TORCH_CHECK(want_double == (scores.scalar_type() == at::kDouble),
                "enact_ops: scores must be float64 for float64 features and float32 otherwise");
  }
  for (const auto* t : {&tokens, &seg_starts, &seg_batch, &row_offsets}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous() &&
                    t->device() == scores.device(),
                "enact_ops: segmentation tensors must be contiguous 1-D int64 on the device of "
                "scores");
  }
  TORCH_CHECK(seg_starts.numel() == seg_batch.numel() + 1,
              "enact_ops: seg_starts must have one more entry than seg_batch");
  TORCH_CHECK(row_offsets.numel() == B + 1, "enact_ops: row_offsets must have B + 1 entries");
  if (scores.device().is_cpu()) check_segmentation_values_cpu(B, N, tokens, seg_starts, seg_batch, row_offsets);
  // on CUDA the kernels check the index values with device-side assertions (no host sync)
}

void check_segmentation_values_cpu(int64_t B, int64_t N, const at::Tensor& tokens,
                                   const at::Tensor& seg_starts, const at::Tensor& seg_batch,
                                   const at::Tensor& row_offsets) {
  const int64_t T = tokens.numel(), S = seg_batch.numel();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* starts = seg_starts.data_ptr<int64_t>();
  const int64_t* batch = seg_batch.data_ptr<int64_t>();
  const int64_t* rows = row_offsets.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[S] == T, "enact_ops: seg_starts must run from 0 to the number of "
              "tokens (", T, "), got ", starts[0], " .. ", starts[S]);
  TORCH_CHECK(rows[0] == 0 && rows[B] == S, "enact_ops: row_offsets must run from 0 to the number of "
              "segments (", S, "), got ", rows[0], " .. ", rows[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rows[b] <= rows[b + 1], "enact_ops: row_offsets must be non-decreasing (row ", b, ")");
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(starts[s] <= starts[s + 1], "enact_ops: seg_starts must be non-decreasing (segment ", s, ")");
    const int64_t b = batch[s];
    TORCH_CHECK(b >= 0 && b < B && rows[b] <= s && s < rows[b + 1], "enact_ops: seg_batch[", s, "] = ", b,
                " does not match row_offsets");
    for (int64_t t = starts[s]; t < starts[s + 1]; ++t)
      TORCH_CHECK(tok[t] >= b * N && tok[t] < (b + 1) * N, "enact_ops: tokens[", t, "] = ", tok[t],
                  " is not a token of row ", b, " (", b * N, " .. ", (b + 1) * N - 1, ")");
  }
}

void check_grad_slots(const at::Tensor& grad, const at::Tensor& row_offsets, const char* name) {
  if (!grad.device().is_cpu()) return;  // CUDA: a device-side assertion in the kernel
  const int64_t* rows = row_offsets.data_ptr<int64_t>();
  int64_t widest = 0;
  for (int64_t b = 0; b + 1 < row_offsets.numel(); ++b) widest = std::max(widest, rows[b + 1] - rows[b]);
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) >= widest, "enact_ops: ", name, " must have M >= ", widest,
              " cluster slots (the widest row of the segmentation), got ", grad.sizes());
}

std::vector<at::Tensor> checked_grad_pooled(at::TensorList grad_pooled, at::TensorList features,
                                            const at::Tensor& row_offsets, bool summed) {
  TORCH_CHECK(grad_pooled.size() == features.size() && !(summed && features.empty()),
              "enact_ops: one grad_pooled tensor per feature tensor expected");
  std::vector<at::Tensor> grads(features.size());
  for (size_t f = 0; f < features.size(); ++f) {
    const auto& x = features[f];
    TORCH_CHECK(!summed || (x.size(2) == features[0].size(2) && x.scalar_type() == features[0].scalar_type()),
                "enact_ops: the summed features must share their width and dtype");
    const auto g = grad_pooled[f].contiguous();
    TORCH_CHECK(g.dim() == 3 && g.size(0) == x.size(0) && g.size(2) == x.size(2) &&
                    g.scalar_type() == x.scalar_type() && g.device() == x.device(),
                "enact_ops: grad_pooled[", f, "] must be (B, M_max, C) like the pooled output (B = ",
                x.size(0), ", C = ", x.size(2), ", ", x.scalar_type(), " on ", x.device(), "), got ",
                g.sizes(), " ", g.scalar_type(), " on ", g.device());
    check_grad_slots(g, row_offsets, "grad_pooled");
    grads[f] = g;
  }
  return grads;
}

void check_information_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& valid,
                              const at::Tensor& taps) {
  TORCH_CHECK(logits.dim() == 2, "enact_ops.smoothed_information: logits must be (B, N), got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "enact_ops.smoothed_information: logits must be float32 or float64, got ", logits.scalar_type());
  if (valid.has_value()) {
    TORCH_CHECK(valid->sizes() == logits.sizes() && valid->scalar_type() == at::kBool,
                "enact_ops.smoothed_information: valid must be a bool tensor of the logits' shape ", logits.sizes(),
                ", got ", valid->scalar_type(), " ", valid->sizes());
    TORCH_CHECK(valid->device() == logits.device(), "enact_ops.smoothed_information: valid is on ",
                valid->device(), ", logits on ", logits.device());
  }
  TORCH_CHECK(taps.dim() == 1 && taps.numel() % 2 == 1,
              "enact_ops.smoothed_information: taps must be 1-D of odd length, got ", taps.sizes());
  TORCH_CHECK(taps.scalar_type() == logits.scalar_type() && taps.device() == logits.device(),
              "enact_ops.smoothed_information: taps must be ", logits.scalar_type(), " on ", logits.device(),
              " like the logits, got ", taps.scalar_type(), " on ", taps.device());
}

InformationOutputs::InformationOutputs(const at::Tensor& logits)
    : smoothed(at::empty_like(logits)),
      sign(at::empty(logits.sizes(), logits.options().dtype(at::kBool))),
      probs(at::empty_like(logits)),
      lengths(at::empty({logits.size(0)}, logits.options().dtype(at::kLong))),
      runs(at::empty({logits.size(0)}, logits.options().dtype(at::kLong))) {}

void check_information_backward_inputs(const at::Tensor& grad_smoothed, const at::Tensor& probs,
                                       const std::optional<at::Tensor>& valid, const at::Tensor& taps) {
  check_information_inputs(probs, valid, taps);
  TORCH_CHECK(grad_smoothed.sizes() == probs.sizes() && grad_smoothed.scalar_type() == probs.scalar_type() &&
                  grad_smoothed.device() == probs.device(),
              "enact_ops.smoothed_information_backward: grad_smoothed must be ", probs.scalar_type(), " ",
              probs.sizes(), " on ", probs.device(), " like probs, got ", grad_smoothed.scalar_type(), " ",
              grad_smoothed.sizes(), " on ", grad_smoothed.device());
}

}  // namespace enact

TORCH_LIBRARY(enact_ops, m) {
  // Steps 1-4 of ENACT on each row's valid sequence (enact_ops/csrc/information_row.h):
  // (smoothed, sign, probs, lengths, runs); probs is what the backward needs.
  m.def("smoothed_information(Tensor logits, Tensor? valid, Tensor taps) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("smoothed_information_backward(Tensor grad_smoothed, Tensor probs, Tensor? valid, Tensor taps) -> Tensor");
  // num_segments / num_tokens (S, T): the output sizes when the caller knows them (no host sync
  // on CUDA; checked against the segmentation, on the device there); None: computed here.
  m.def("segment_runs(Tensor sign, Tensor valid, int? num_segments=None, int? num_tokens=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("segment_uniform(Tensor valid, int chunk, int? num_segments=None, int? num_tokens=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("segment_softmax_pool_forward(Tensor scores, Tensor[] features, Tensor tokens, "
        "Tensor seg_starts, Tensor seg_batch, Tensor row_offsets, int max_clusters) -> "
        "(Tensor[], Tensor)");
  m.def("segment_softmax_pool_backward(Tensor[] grad_pooled, Tensor[] features, Tensor weights, "
        "Tensor tokens, Tensor seg_starts, Tensor seg_batch, Tensor row_offsets) -> "
        "(Tensor, Tensor[])");
  m.def("segment_softmax_pool_backward_sum(Tensor[] grad_pooled, Tensor[] features, "
        "Tensor weights, Tensor tokens, Tensor seg_starts, Tensor seg_batch, Tensor row_offsets) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(enact_ops, CPU, m) {
  m.impl("smoothed_information", &enact::smoothed_information_cpu);
  m.impl("smoothed_information_backward", &enact::smoothed_information_backward_cpu);
  m.impl("segment_runs", &enact::segment_runs_cpu);
  m.impl("segment_uniform", &enact::segment_uniform_cpu);
  m.impl("segment_softmax_pool_forward", &enact::segment_softmax_pool_forward_cpu);
  m.impl("segment_softmax_pool_backward", &enact::segment_softmax_pool_backward_cpu);
  m.impl("segment_softmax_pool_backward_sum", &enact::segment_softmax_pool_backward_sum_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(enact_ops, CUDA, m) {
  m.impl("smoothed_information", &enact::smoothed_information_cuda);
  m.impl("smoothed_information_backward", &enact::smoothed_information_backward_cuda);
  m.impl("segment_runs", &enact::segment_runs_cuda);
  m.impl("segment_uniform", &enact::segment_uniform_cuda);
  m.impl("segment_softmax_pool_forward", &enact::segment_softmax_pool_forward_cuda);
  m.impl("segment_softmax_pool_backward", &enact::segment_softmax_pool_backward_cuda);
  m.impl("segment_softmax_pool_backward_sum", &enact::segment_softmax_pool_backward_sum_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ENACT clustering operators; use them through torch.ops.enact_ops or enact_ops.*";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
