// ENACT clustering operators: declarations shared by vision.cpp, the CPU and the CUDA sources.
//
// A segmentation is returned as the tuple
//   (cluster_ids (B,N), num_clusters (B,), tokens (T,), token_segment (T,),
//    seg_starts (S+1,), seg_batch (S,), row_offsets (B+1,))           all int64
// see enact_ops/segmentation.py for the meaning of each field.
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <vector>

namespace enact {

using SegmentationTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor>;
// Steps 1-4 of one batch: (smoothed (B,N), sign (B,N) bool, probs (B,N), lengths (B,), runs (B,))
using InformationTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Those outputs allocated (uninitialised) for logits (B, N), on their device.
struct InformationOutputs {
  at::Tensor smoothed, sign, probs, lengths, runs;
  explicit InformationOutputs(const at::Tensor& logits);
  InformationTuple tuple() const { return {smoothed, sign, probs, lengths, runs}; }
};

// ---- host-side checks, shared by both devices ------------------------------------------------
// The sizes a caller may pass to the segmentation ops (S segments, T clustered tokens), so that
// the CUDA implementation allocates its outputs without reading the device: both or neither, >= 0.
void check_segmentation_sizes(std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens);
void check_segmentation_inputs(const at::Tensor& sign, const at::Tensor& valid);
void check_pool_inputs(const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
                       const at::Tensor& seg_starts, const at::Tensor& seg_batch,
                       const at::Tensor& row_offsets);
// Index values of a segmentation on the CPU (CUDA kernels assert them on the device).
void check_segmentation_values_cpu(int64_t B, int64_t N, const at::Tensor& tokens,
                                   const at::Tensor& seg_starts, const at::Tensor& seg_batch,
                                   const at::Tensor& row_offsets);
// A CPU gradient of the pooled output must have a slot for every cluster of its row.
void check_grad_slots(const at::Tensor& grad, const at::Tensor& row_offsets, const char* name);
// The gradients of the pooled outputs, one per feature, made contiguous and checked on the host:
// (B, M, C_f) in the feature's dtype and device, M covering every row's clusters (on CPU; CUDA
// kernels assert it on the device); summed (the _sum backward): features of one width and dtype.
std::vector<at::Tensor> checked_grad_pooled(at::TensorList grad_pooled, at::TensorList features,
                                            const at::Tensor& row_offsets, bool summed);
// logits (B, N) float32 / float64, valid (B, N) bool or none, taps (K,) of odd K in the logits' dtype,
// all on one device.
void check_information_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& valid,
                              const at::Tensor& taps);
// The same for the backward, whose grad_smoothed must be shaped and typed like probs.
void check_information_backward_inputs(const at::Tensor& grad_smoothed, const at::Tensor& probs,
                                       const std::optional<at::Tensor>& valid, const at::Tensor& taps);

// ---- CPU --------------------------------------------------------------------------------------
InformationTuple smoothed_information_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& valid,
                                          const at::Tensor& taps);
at::Tensor smoothed_information_backward_cpu(const at::Tensor& grad_smoothed, const at::Tensor& probs,
                                             const std::optional<at::Tensor>& valid, const at::Tensor& taps);
SegmentationTuple segment_runs_cpu(const at::Tensor& sign, const at::Tensor& valid,
                                   std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens);
SegmentationTuple segment_uniform_cpu(const at::Tensor& valid, int64_t chunk,
                                      std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens);
std::tuple<std::vector<at::Tensor>, at::Tensor> segment_softmax_pool_forward_cpu(
    const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
    const at::Tensor& seg_starts, const at::Tensor& seg_batch, const at::Tensor& row_offsets,
    int64_t max_clusters);
std::tuple<at::Tensor, std::vector<at::Tensor>> segment_softmax_pool_backward_cpu(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets);
std::tuple<at::Tensor, at::Tensor> segment_softmax_pool_backward_sum_cpu(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets);

#ifdef WITH_CUDA
// ---- CUDA -------------------------------------------------------------------------------------
InformationTuple smoothed_information_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& valid,
                                          const at::Tensor& taps);
at::Tensor smoothed_information_backward_cuda(const at::Tensor& grad_smoothed, const at::Tensor& probs,
                                             const std::optional<at::Tensor>& valid, const at::Tensor& taps);
SegmentationTuple segment_runs_cuda(const at::Tensor& sign, const at::Tensor& valid,
                                    std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens);
SegmentationTuple segment_uniform_cuda(const at::Tensor& valid, int64_t chunk,
                                       std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens);
std::tuple<std::vector<at::Tensor>, at::Tensor> segment_softmax_pool_forward_cuda(
    const at::Tensor& scores, at::TensorList features, const at::Tensor& tokens,
    const at::Tensor& seg_starts, const at::Tensor& seg_batch, const at::Tensor& row_offsets,
    int64_t max_clusters);
std::tuple<at::Tensor, std::vector<at::Tensor>> segment_softmax_pool_backward_cuda(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets);
std::tuple<at::Tensor, at::Tensor> segment_softmax_pool_backward_sum_cuda(
    at::TensorList grad_pooled, at::TensorList features, const at::Tensor& weights,
    const at::Tensor& tokens, const at::Tensor& seg_starts, const at::Tensor& seg_batch,
    const at::Tensor& row_offsets);
#endif

}  // namespace enact
