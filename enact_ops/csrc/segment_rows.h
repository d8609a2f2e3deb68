// Per-row segmentation steps shared by the CPU (one loop iteration per row) and CUDA (one
// thread per row) kernels.  Each labels row b's tokens with their cluster slot (-1 = none).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ENACT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ENACT_HOST_DEVICE inline
#endif

namespace enact {

// Runs of equal sign over the row's valid tokens; pads do not break a run.
ENACT_HOST_DEVICE void label_runs_row(const bool* sign, const bool* valid, int64_t b, int64_t N,
                                      int64_t* cid, int64_t* num_clusters, int64_t* kept) {
  int64_t slot = -1, count = 0;
  bool last = false;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = b * N + n;
    if (!valid[i]) {
      cid[i] = -1;
      continue;
    }
    if (slot < 0 || sign[i] != last) ++slot;  // a run starts at the first valid token
    last = sign[i];
    cid[i] = slot;
    ++count;
  }
  num_clusters[b] = slot + 1;
  kept[b] = count;
}

// Uniform chunks of length `chunk` over the row's valid tokens, cropped symmetrically
// ((n mod L) // 2 dropped at the start); a row shorter than the chunk is one cluster.
ENACT_HOST_DEVICE void label_uniform_row(const bool* valid, int64_t b, int64_t N, int64_t chunk,
                                         int64_t* cid, int64_t* num_clusters, int64_t* kept) {
  int64_t n_valid = 0;
  for (int64_t n = 0; n < N; ++n) n_valid += valid[b * N + n];
  const bool is_short = n_valid < chunk;
  const int64_t m = is_short ? (n_valid > 0) : n_valid / chunk;
  const int64_t start = is_short ? 0 : (n_valid % chunk) / 2;
  const int64_t keep = is_short ? n_valid : m * chunk;
  int64_t p = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = b * N + n;
    if (!valid[i]) {
      cid[i] = -1;
      continue;
    }
    const int64_t local = p++ - start;
    cid[i] = (local < 0 || local >= keep) ? -1 : (is_short ? 0 : local / chunk);
  }
  num_clusters[b] = m;
  kept[b] = keep;
}

// The CSR entries of row b: its kept tokens from tok_offsets[b], its segments from row_offsets[b].
ENACT_HOST_DEVICE void fill_csr_row(const int64_t* cid, int64_t b, int64_t N, const int64_t* row_offsets,
                                    const int64_t* tok_offsets, int64_t* tokens, int64_t* token_segment,
                                    int64_t* seg_starts, int64_t* seg_batch) {
  int64_t t = tok_offsets[b], prev = -1;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t c = cid[b * N + n];
    if (c < 0) continue;
    const int64_t s = row_offsets[b] + c;
    if (c != prev) {
      seg_starts[s] = t;
      seg_batch[s] = b;
      prev = c;
    }
    tokens[t] = b * N + n;
    token_segment[t] = s;
    ++t;
  }
}

}  // namespace enact
