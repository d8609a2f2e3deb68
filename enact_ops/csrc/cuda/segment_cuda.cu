// CUDA segmentation kernels: runs of equal curvature sign, and uniform crop-and-chunk.
//
// One block per row, each thread owning a contiguous chunk of the row's tokens; the per-chunk
// steps are those of the CPU kernels (segment_rows.h).  Each op launches its kernel twice: first
// for the sizes of every row (clusters, clustered tokens), then -- after a cumsum over rows has
// placed each row in the CSR -- to label the tokens and write the CSR.  In both, every thread
// summarises its chunk and block-wide exclusive scans (block_reduce.cuh) give it what the
// chunks before it hold; the totals are the row's sizes, the carry is where its labels start.
// Index values are checked with device-side assertions (no host sync), sizes on the host.  Host
// syncs: none when the caller gives the segmentation's sizes; else one copy of (S, T).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "../enact.h"
#include "../segment_rows.h"
#include "block_reduce.cuh"

namespace enact {
namespace {

// Threads of a row's block: about 8 tokens each, one to 16 warps.
int segment_threads(int64_t N) {
  const int64_t warps = std::min<int64_t>(16, std::max<int64_t>(1, blocks_for(N, 8 * kWarp)));
  return static_cast<int>(warps * kWarp);
}

// Thread threadIdx.x's chunk [n0, n1) of a row of N tokens.
__device__ __forceinline__ void thread_chunk(int64_t N, int64_t* n0, int64_t* n1) {
  const int64_t len = (N + blockDim.x - 1) / blockDim.x;
  const int64_t start = threadIdx.x * len;
  *n0 = start < N ? start : N;
  *n1 = *n0 + len < N ? *n0 + len : N;
}

// The fill launches were sized (S, T) on the host (by the caller, without a sync): row b must fit,
// and the last row ends exactly there; the last row's block writes seg_starts[S] = T.
__device__ __forceinline__ void check_row_fits(int64_t b, int64_t B, const int64_t* row_offsets,
                                               const int64_t* tok_offsets, int64_t S, int64_t T,
                                               const SegmentOut& out) {
  CUDA_KERNEL_ASSERT(row_offsets[b + 1] <= S && tok_offsets[b + 1] <= T);
  if (b == B - 1) {
    CUDA_KERNEL_ASSERT(row_offsets[B] == S && tok_offsets[B] == T);
    if (threadIdx.x == 0) out.seg_starts[S] = T;
  }
}

// What a pass of a segmentation kernel reads and writes besides its input: sizes pass (kFill
// false) the rows' num_clusters and kept; fill pass the CSR layout (offsets, sizes S, T) and out.
struct SegmentPass {
  int64_t B, N;
  int64_t* num_clusters;
  int64_t* kept;
  const int64_t* row_offsets;
  const int64_t* tok_offsets;
  int64_t S, T;
  SegmentOut out;
};

// Runs of equal sign, block b = row b.  kFill false: num_clusters[b] and kept[b] (runs and
// valid tokens).  kFill true: cluster_ids and the CSR entries of the row.  Each thread
// summarises its chunk; exclusive scans give its carry: the valid tokens (sum) and the last
// valid token (max of 2 n + sign) before it, then the runs started before it (sum).
template <bool kFill>
__global__ void segment_runs_kernel(const bool* __restrict__ sign, const bool* __restrict__ valid, SegmentPass p) {
  __shared__ int64_t shared[kWarp + 1];
  const int64_t b = blockIdx.x, N = p.N;
  int64_t n0, n1;
  thread_chunk(N, &n0, &n1);
  const RunsSummary s = summarise_runs_chunk(sign, valid, b, N, n0, n1);
  RunsCarry carry;
  int64_t total_kept, total_runs;
  carry.last = block_exclusive_max<int64_t>(s.last, -1, shared);
  carry.kept = block_exclusive_sum<int64_t>(s.valid, shared, &total_kept);
  carry.runs = block_exclusive_sum<int64_t>(runs_started(s, carry.last), shared, &total_runs);
  if (!kFill) {
    if (threadIdx.x == 0) {
      p.num_clusters[b] = total_runs;
      p.kept[b] = total_kept;
    }
    return;
  }
  check_row_fits(b, p.B, p.row_offsets, p.tok_offsets, p.S, p.T, p.out);
  fill_runs_chunk(sign, valid, b, N, n0, n1, carry, {p.row_offsets[b], p.tok_offsets[b]}, p.out);
}

// Uniform chunks of length L, block b = row b.  kFill false: num_clusters[b] and kept[b] from
// the row's valid tokens (a block-wide sum).  kFill true: cluster_ids and the CSR entries of the
// row, each thread's position among the valid tokens from an exclusive sum.
template <bool kFill>
__global__ void segment_uniform_kernel(const bool* __restrict__ valid, int64_t L, SegmentPass p) {
  __shared__ int64_t shared[kWarp + 1];
  const int64_t b = blockIdx.x, N = p.N;
  int64_t n0, n1;
  thread_chunk(N, &n0, &n1);
  int64_t n_valid;
  const int64_t before = block_exclusive_sum<int64_t>(count_valid(valid, b, N, n0, n1), shared, &n_valid);
  const UniformRow shape = uniform_row(n_valid, L);
  if (!kFill) {
    if (threadIdx.x == 0) {
      p.num_clusters[b] = shape.clusters;
      p.kept[b] = shape.kept;
    }
    return;
  }
  check_row_fits(b, p.B, p.row_offsets, p.tok_offsets, p.S, p.T, p.out);
  fill_uniform_chunk(valid, b, N, n0, n1, before, shape, L, {p.row_offsets[b], p.tok_offsets[b]}, p.out);
}

// The CSR layout of a segmentation whose row b has num_clusters[b] clusters of kept[b] tokens:
// row and token offsets (cumsum over rows) and the outputs.  Its sizes (S segments, T tokens)
// are the caller's when given (no host sync: the fill kernels assert them on the device), else
// read from the device in one copy (the only host sync of the op).
struct Csr {
  at::Tensor row_offsets, tok_offsets, tokens, token_segment, seg_starts, seg_batch;
  int64_t S = 0, T = 0;
};

// Row and token offsets, the exclusive cumsums of num_clusters and kept over the rows (B + 1
// entries each), in one launch: one block scanning the rows blockDim.x at a time.
__global__ void csr_offsets_kernel(const int64_t* __restrict__ num_clusters, const int64_t* __restrict__ kept,
                                   int64_t B, int64_t* __restrict__ row_offsets,
                                   int64_t* __restrict__ tok_offsets) {
  __shared__ int64_t shared[kWarp + 1];
  int64_t rows = 0, tokens = 0;  // the rows' totals before this chunk of rows
  for (int64_t b0 = 0; b0 < B; b0 += blockDim.x) {
    const int64_t b = b0 + threadIdx.x;
    int64_t chunk_rows, chunk_tokens;
    const int64_t row_before = block_exclusive_sum<int64_t>(b < B ? num_clusters[b] : 0, shared, &chunk_rows);
    const int64_t tok_before = block_exclusive_sum<int64_t>(b < B ? kept[b] : 0, shared, &chunk_tokens);
    if (b < B) {
      row_offsets[b] = rows + row_before;
      tok_offsets[b] = tokens + tok_before;
    }
    rows += chunk_rows;
    tokens += chunk_tokens;
  }
  if (threadIdx.x == 0) {
    row_offsets[B] = rows;
    tok_offsets[B] = tokens;
  }
}

Csr csr_layout(const at::Tensor& num_clusters, const at::Tensor& kept, std::optional<int64_t> num_segments,
               std::optional<int64_t> num_tokens) {
  const int64_t B = num_clusters.size(0);
  auto opts = num_clusters.options();
  Csr csr;
  csr.row_offsets = at::empty({B + 1}, opts);
  csr.tok_offsets = at::empty({B + 1}, opts);
  csr_offsets_kernel<<<1, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      num_clusters.data_ptr<int64_t>(), kept.data_ptr<int64_t>(), B, csr.row_offsets.data_ptr<int64_t>(),
      csr.tok_offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_segments.has_value()) {
    csr.S = *num_segments;
    csr.T = *num_tokens;
  } else {
    const auto totals = at::cat({csr.row_offsets.narrow(0, B, 1), csr.tok_offsets.narrow(0, B, 1)}).cpu();
    csr.S = totals.data_ptr<int64_t>()[0];
    csr.T = totals.data_ptr<int64_t>()[1];
  }
  csr.tokens = at::empty({csr.T}, opts);
  csr.token_segment = at::empty({csr.T}, opts);
  csr.seg_starts = at::empty({csr.S + 1}, opts);
  csr.seg_batch = at::empty({csr.S}, opts);
  if (B == 0) {
    TORCH_CHECK(csr.S == 0 && csr.T == 0, "enact_ops: the given sizes (", csr.S, ", ", csr.T,
                ") are not the segmentation's (0, 0)");
    csr.seg_starts.zero_();
  }
  return csr;
}

SegmentOut outputs(const at::Tensor& cluster_ids, const Csr& csr) {
  return {cluster_ids.data_ptr<int64_t>(), csr.tokens.data_ptr<int64_t>(), csr.token_segment.data_ptr<int64_t>(),
          csr.seg_starts.data_ptr<int64_t>(), csr.seg_batch.data_ptr<int64_t>()};
}

// The two passes of a segmentation: launch(false, pass) writes every row's num_clusters and kept,
// the CSR layout follows (csr_layout), launch(true, pass) labels the tokens and fills it.
template <typename Launch>
SegmentationTuple two_pass_segmentation(const at::Tensor& like, std::optional<int64_t> num_segments,
                                        std::optional<int64_t> num_tokens, Launch launch) {
  const int64_t B = like.size(0), N = like.size(1);
  auto opts = like.options().dtype(at::kLong);
  auto cluster_ids = at::empty({B, N}, opts);
  auto num_clusters = at::empty({B}, opts);
  auto kept = at::empty({B}, opts);
  if (B > 0) launch(false, SegmentPass{B, N, num_clusters.data_ptr<int64_t>(), kept.data_ptr<int64_t>()});
  const Csr csr = csr_layout(num_clusters, kept, num_segments, num_tokens);
  if (B > 0)
    launch(true, SegmentPass{B, N, nullptr, nullptr, csr.row_offsets.data_ptr<int64_t>(),
                             csr.tok_offsets.data_ptr<int64_t>(), csr.S, csr.T, outputs(cluster_ids, csr)});
  return {cluster_ids, num_clusters, csr.tokens, csr.token_segment, csr.seg_starts, csr.seg_batch, csr.row_offsets};
}

}  // namespace

SegmentationTuple segment_runs_cuda(const at::Tensor& sign_in, const at::Tensor& valid_in,
                                    std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(sign_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  TORCH_CHECK(sign_in.is_cuda(), "enact_ops: segment_runs_cuda expects CUDA tensors");
  c10::cuda::CUDAGuard guard(sign_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto sign = sign_in.contiguous();
  const auto valid = valid_in.contiguous();
  const unsigned int blocks = grid_x(sign.size(0), "segment_runs");
  const int threads = segment_threads(sign.size(1));
  return two_pass_segmentation(sign, num_segments, num_tokens, [&](bool fill, const SegmentPass& pass) {
    auto kernel = fill ? segment_runs_kernel<true> : segment_runs_kernel<false>;
    kernel<<<blocks, threads, 0, stream>>>(sign.data_ptr<bool>(), valid.data_ptr<bool>(), pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

SegmentationTuple segment_uniform_cuda(const at::Tensor& valid_in, int64_t chunk,
                                       std::optional<int64_t> num_segments, std::optional<int64_t> num_tokens) {
  check_segmentation_inputs(valid_in, valid_in);
  check_segmentation_sizes(num_segments, num_tokens);
  TORCH_CHECK(valid_in.is_cuda(), "enact_ops: segment_uniform_cuda expects CUDA tensors");
  TORCH_CHECK(chunk >= 1, "enact_ops.segment_uniform: chunk must be >= 1, got ", chunk);
  c10::cuda::CUDAGuard guard(valid_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto valid = valid_in.contiguous();
  const unsigned int blocks = grid_x(valid.size(0), "segment_uniform");
  const int threads = segment_threads(valid.size(1));
  return two_pass_segmentation(valid, num_segments, num_tokens, [&](bool fill, const SegmentPass& pass) {
    auto kernel = fill ? segment_uniform_kernel<true> : segment_uniform_kernel<false>;
    kernel<<<blocks, threads, 0, stream>>>(valid.data_ptr<bool>(), chunk, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace enact
