// CPU segmentation kernels: runs of equal curvature sign, and uniform crop-and-chunk.
// Both first label every token with its cluster slot in its row (-1 = no cluster), then build
// the batch-wide CSR layout with one shared routine.  Parallel over rows.
#include <ATen/Parallel.h>

#include "../enact.h"
#include "../segment_rows.h"

namespace enact {
namespace {

// cluster_ids (B,N) with slots 0..num_clusters[b]-1 in token order, kept[b] = #tokens with a slot.
// Sizes the caller gave (S, T) must be the segmentation's.
SegmentationTuple csr_from_cluster_ids(const at::Tensor& cluster_ids, const at::Tensor& num_clusters,
                                       const at::Tensor& kept, std::optional<int64_t> num_segments,
                                       std::optional<int64_t> num_tokens) {
  const int64_t B = cluster_ids.size(0), N = cluster_ids.size(1);
  auto opts = cluster_ids.options();
  auto row_offsets = at::zeros({B + 1}, opts);
  auto tok_offsets = at::zeros({B + 1}, opts);
  const int64_t* nc = num_clusters.data_ptr<int64_t>();
  const int64_t* nk = kept.data_ptr<int64_t>();
  int64_t* ro = row_offsets.data_ptr<int64_t>();
  int64_t* to = tok_offsets.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    ro[b + 1] = ro[b] + nc[b];
    to[b + 1] = to[b] + nk[b];
  }
  const int64_t S = ro[B], T = to[B];
  TORCH_CHECK(!num_segments.has_value() || (*num_segments == S && *num_tokens == T),
              "enact_ops: the given sizes (num_segments ", num_segments.value_or(-1), ", num_tokens ",
              num_tokens.value_or(-1), ") are not the segmentation's (", S, ", ", T, ")");
  auto tokens = at::empty({T}, opts);
  auto token_segment = at::empty({T}, opts);
  auto seg_starts = at::empty({S + 1}, opts);
  auto seg_batch = at::empty({S}, opts);
  const int64_t* cid = cluster_ids.data_ptr<int64_t>();
  int64_t* tk = tokens.data_ptr<int64_t>();
  int64_t* ts = token_segment.data_ptr<int64_t>();
  int64_t* ss = seg_starts.data_ptr<int64_t>();
  int64_t* sb = seg_batch.data_ptr<int64_t>();
  ss[S] = T;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fill_csr_row(cid, b, N, ro, to, tk, ts, ss, sb);
  });
  return {cluster_ids, num_clusters, tokens, token_segment, seg_starts, seg_batch, row_offsets};
}

}  // namespace

SegmentationTuple segment_runs_cpu(const at::Tensor& sign_in, const at::Tensor& valid_in,
                                   std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(sign_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  const auto sign = sign_in.contiguous();
  const auto valid = valid_in.contiguous();
  const int64_t B = sign.size(0), N = sign.size(1);
  auto opts = sign.options().dtype(at::kLong);
  auto cluster_ids = at::empty({B, N}, opts);
  auto num_clusters = at::empty({B}, opts);
  auto kept = at::empty({B}, opts);
  const bool* sg = sign.data_ptr<bool>();
  const bool* vd = valid.data_ptr<bool>();
  int64_t* cid = cluster_ids.data_ptr<int64_t>();
  int64_t* nc = num_clusters.data_ptr<int64_t>();
  int64_t* nk = kept.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) label_runs_row(sg, vd, b, N, cid, nc, nk);
  });
  return csr_from_cluster_ids(cluster_ids, num_clusters, kept, num_segments, num_tokens);
}

SegmentationTuple segment_uniform_cpu(const at::Tensor& valid_in, int64_t chunk,
                                      std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(valid_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  TORCH_CHECK(chunk >= 1, "enact_ops.segment_uniform: chunk must be >= 1, got ", chunk);
  const auto valid = valid_in.contiguous();
  const int64_t B = valid.size(0), N = valid.size(1);
  auto opts = valid.options().dtype(at::kLong);
  auto cluster_ids = at::empty({B, N}, opts);
  auto num_clusters = at::empty({B}, opts);
  auto kept = at::empty({B}, opts);
  const bool* vd = valid.data_ptr<bool>();
  int64_t* cid = cluster_ids.data_ptr<int64_t>();
  int64_t* nc = num_clusters.data_ptr<int64_t>();
  int64_t* nk = kept.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) label_uniform_row(vd, b, N, chunk, cid, nc, nk);
  });
  return csr_from_cluster_ids(cluster_ids, num_clusters, kept, num_segments, num_tokens);
}

}  // namespace enact
