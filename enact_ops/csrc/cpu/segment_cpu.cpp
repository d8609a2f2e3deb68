// CPU segmentation kernels: runs of equal curvature sign, and uniform crop-and-chunk.  The twin
// of segment_cuda.cu with the same per-chunk steps (segment_rows.h): each row is cut into chunks
// of kCpuChunk tokens, taken in order.  Pass 1 summarises the chunks and gives every row's sizes;
// a cumsum over rows places the rows in the CSR; pass 2 labels each chunk and writes its CSR
// entries from the combined summaries of the chunks before it.  Parallel over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../enact.h"
#include "../segment_rows.h"

namespace enact {
namespace {

constexpr int64_t kCpuChunk = 64;

int64_t num_chunks(int64_t N) { return (N + kCpuChunk - 1) / kCpuChunk; }

// The CSR layout of a segmentation whose row b has num_clusters[b] clusters of kept[b] tokens:
// row and token offsets (cumsum over rows) and the outputs.  Sizes the caller gave (S, T) must
// be the segmentation's.
struct Csr {
  at::Tensor row_offsets, tok_offsets, tokens, token_segment, seg_starts, seg_batch;

  Csr(const at::Tensor& num_clusters, const at::Tensor& kept, std::optional<int64_t> num_segments,
      std::optional<int64_t> num_tokens) {
    const int64_t B = num_clusters.size(0);
    auto opts = num_clusters.options();
    row_offsets = at::zeros({B + 1}, opts);
    tok_offsets = at::zeros({B + 1}, opts);
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
    tokens = at::empty({T}, opts);
    token_segment = at::empty({T}, opts);
    seg_starts = at::empty({S + 1}, opts);
    seg_batch = at::empty({S}, opts);
    seg_starts.data_ptr<int64_t>()[S] = T;
  }

  RowStart row(int64_t b) const {
    return {row_offsets.data_ptr<int64_t>()[b], tok_offsets.data_ptr<int64_t>()[b]};
  }

  SegmentOut out(const at::Tensor& cluster_ids) const {
    return {cluster_ids.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), token_segment.data_ptr<int64_t>(),
            seg_starts.data_ptr<int64_t>(), seg_batch.data_ptr<int64_t>()};
  }

  SegmentationTuple tuple(const at::Tensor& cluster_ids, const at::Tensor& num_clusters) const {
    return {cluster_ids, num_clusters, tokens, token_segment, seg_starts, seg_batch, row_offsets};
  }
};

}  // namespace

SegmentationTuple segment_runs_cpu(const at::Tensor& sign_in, const at::Tensor& valid_in,
                                   std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(sign_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  const auto sign = sign_in.contiguous();
  const auto valid = valid_in.contiguous();
  const int64_t B = sign.size(0), N = sign.size(1), C = num_chunks(N);
  auto opts = sign.options().dtype(at::kLong);
  auto cluster_ids = at::empty({B, N}, opts);
  auto num_clusters = at::empty({B}, opts);
  auto kept = at::empty({B}, opts);
  const bool* sg = sign.data_ptr<bool>();
  const bool* vd = valid.data_ptr<bool>();
  int64_t* nc = num_clusters.data_ptr<int64_t>();
  int64_t* nk = kept.data_ptr<int64_t>();
  std::vector<RunsSummary> summaries(B * C);
  // pass 1: the chunks' summaries and the rows' sizes
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      RunsCarry carry{0, 0, -1};
      for (int64_t k = 0; k < C; ++k) {
        const int64_t n0 = k * kCpuChunk, n1 = std::min(N, n0 + kCpuChunk);
        summaries[b * C + k] = summarise_runs_chunk(sg, vd, b, N, n0, n1);
        carry = runs_combine(carry, summaries[b * C + k]);
      }
      nc[b] = carry.runs;
      nk[b] = carry.kept;
    }
  });
  const Csr csr(num_clusters, kept, num_segments, num_tokens);
  const SegmentOut out = csr.out(cluster_ids);
  // pass 2: labels and CSR, each chunk from the combined summaries before it
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowStart row = csr.row(b);
      RunsCarry carry{0, 0, -1};
      for (int64_t k = 0; k < C; ++k) {
        const int64_t n0 = k * kCpuChunk, n1 = std::min(N, n0 + kCpuChunk);
        fill_runs_chunk(sg, vd, b, N, n0, n1, carry, row, out);
        carry = runs_combine(carry, summaries[b * C + k]);
      }
    }
  });
  return csr.tuple(cluster_ids, num_clusters);
}

SegmentationTuple segment_uniform_cpu(const at::Tensor& valid_in, int64_t chunk,
                                      std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(valid_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  TORCH_CHECK(chunk >= 1, "enact_ops.segment_uniform: chunk must be >= 1, got ", chunk);
  const auto valid = valid_in.contiguous();
  const int64_t B = valid.size(0), N = valid.size(1), C = num_chunks(N);
  auto opts = valid.options().dtype(at::kLong);
  auto cluster_ids = at::empty({B, N}, opts);
  auto num_clusters = at::empty({B}, opts);
  auto kept = at::empty({B}, opts);
  const bool* vd = valid.data_ptr<bool>();
  int64_t* nc = num_clusters.data_ptr<int64_t>();
  int64_t* nk = kept.data_ptr<int64_t>();
  std::vector<int64_t> counts(B * C), row_valid(B);
  // pass 1: valid tokens per chunk and per row, the rows' sizes
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t total = 0;
      for (int64_t k = 0; k < C; ++k) {
        const int64_t n0 = k * kCpuChunk, n1 = std::min(N, n0 + kCpuChunk);
        counts[b * C + k] = count_valid(vd, b, N, n0, n1);
        total += counts[b * C + k];
      }
      const UniformRow shape = uniform_row(total, chunk);
      row_valid[b] = total;
      nc[b] = shape.clusters;
      nk[b] = shape.kept;
    }
  });
  const Csr csr(num_clusters, kept, num_segments, num_tokens);
  const SegmentOut out = csr.out(cluster_ids);
  // pass 2: labels and CSR, each chunk from the valid tokens before it
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const RowStart row = csr.row(b);
      const UniformRow shape = uniform_row(row_valid[b], chunk);
      int64_t before = 0;
      for (int64_t k = 0; k < C; ++k) {
        const int64_t n0 = k * kCpuChunk, n1 = std::min(N, n0 + kCpuChunk);
        fill_uniform_chunk(vd, b, N, n0, n1, before, shape, chunk, row, out);
        before += counts[b * C + k];
      }
    }
  });
  return csr.tuple(cluster_ids, num_clusters);
}

}  // namespace enact
