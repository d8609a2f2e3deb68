// Per-chunk segmentation steps shared by the CPU (segment_cpu.cpp) and CUDA (segment_cuda.cu)
// kernels.  A row of N tokens is cut into contiguous chunks: on CUDA one per thread of the row's
// block, on the CPU chunks of 64 tokens (kCpuChunk) taken in order.  A chunk is summarised on its
// own; the summaries of the chunks before it in its row, combined (block-wide scans on CUDA, a
// running combine on the CPU), give the state it carries in; from that state the chunk labels
// its tokens with their cluster slot (-1 = none) and writes its entries of the CSR layout (see
// enact_ops/segmentation.py).
//
// Both segmentations run in two passes: first the sizes of every row (clusters, clustered
// tokens), whose cumsum over rows places each row in the CSR arrays; then labels and CSR.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ENACT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ENACT_HOST_DEVICE inline
#endif

namespace enact {

// The outputs a chunk writes: cluster_ids (B, N); tokens, token_segment (T,); seg_starts (S + 1,)
// and seg_batch (S,) at the segments that start in the chunk.
struct SegmentOut {
  int64_t* cluster_ids;
  int64_t* tokens;
  int64_t* token_segment;
  int64_t* seg_starts;
  int64_t* seg_batch;
};

// Where row b's entries go: its first segment (row_offsets[b]) and first clustered token.
struct RowStart {
  int64_t segment;
  int64_t token;
};

// Writes clustered token i (flat b * N + n) of row b at token t, in global segment s, which
// starts there when `starts`.
ENACT_HOST_DEVICE void write_token(const SegmentOut& out, int64_t b, int64_t i, int64_t slot, int64_t s,
                                   int64_t t, bool starts) {
  if (starts) {
    out.seg_starts[s] = t;
    out.seg_batch[s] = b;
  }
  out.cluster_ids[i] = slot;
  out.tokens[t] = i;
  out.token_segment[t] = s;
}

// ---- runs of equal sign over the row's valid tokens; pads do not break a run ------------------
// A token starts a run when it is valid and it is the row's first valid token or its sign
// differs from the previous valid token's.

// Tokens [n0, n1) of row b on their own.  `last` encodes the chunk's last valid token n with its
// sign as 2 n + sign (-1 when the chunk has none), so the max over chunks is the latest one.
struct RunsSummary {
  int64_t valid;    // valid tokens
  int64_t changes;  // sign changes between consecutive valid tokens of the chunk
  int64_t last;     // 2 n + sign of the last valid token, -1 if none
  bool first;       // sign of the first valid token
};

ENACT_HOST_DEVICE RunsSummary summarise_runs_chunk(const bool* sign, const bool* valid, int64_t b, int64_t N,
                                                   int64_t n0, int64_t n1) {
  RunsSummary s{0, 0, -1, false};
  bool prev = false;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t i = b * N + n;
    if (!valid[i]) continue;
    if (s.valid == 0) s.first = sign[i];
    else s.changes += sign[i] != prev;
    prev = sign[i];
    s.last = 2 * n + sign[i];
    ++s.valid;
  }
  return s;
}

// Runs that start in a chunk whose previous valid token is `last_before` (2 n + sign, -1 = none).
ENACT_HOST_DEVICE int64_t runs_started(const RunsSummary& s, int64_t last_before) {
  if (s.valid == 0) return 0;
  return s.changes + (last_before < 0 || ((last_before & 1) != 0) != s.first);
}

// What a chunk carries in from the chunks before it in its row.
struct RunsCarry {
  int64_t kept;  // valid tokens before it
  int64_t runs;  // runs started before it (the slot of the next run)
  int64_t last;  // the last valid token before it, 2 n + sign (-1 = none)
};

// The carry past chunk s.  CUDA computes the same with block-wide exclusive scans: sums of
// `valid`, max of `last`, then sums of runs_started(s, last before).
ENACT_HOST_DEVICE RunsCarry runs_combine(const RunsCarry& c, const RunsSummary& s) {
  return {c.kept + s.valid, c.runs + runs_started(s, c.last), c.last > s.last ? c.last : s.last};
}

// Labels tokens [n0, n1) of row b and writes their CSR entries, given the carry into the chunk.
ENACT_HOST_DEVICE void fill_runs_chunk(const bool* sign, const bool* valid, int64_t b, int64_t N,
                                       int64_t n0, int64_t n1, const RunsCarry& c, RowStart row,
                                       const SegmentOut& out) {
  int64_t slot = c.runs - 1, t = row.token + c.kept;
  bool any = c.last >= 0, last = (c.last & 1) != 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t i = b * N + n;
    if (!valid[i]) {
      out.cluster_ids[i] = -1;
      continue;
    }
    const bool starts = !any || sign[i] != last;
    slot += starts;
    write_token(out, b, i, slot, row.segment + slot, t++, starts);
    any = true;
    last = sign[i];
  }
}

// ---- uniform chunks of length L over the row's valid tokens -----------------------------------
// The row's n valid tokens are cropped symmetrically ((n mod L) // 2 dropped at the start, the
// rest at the end) and cut into n // L clusters of L; a row with 0 < n < L is one cluster.

ENACT_HOST_DEVICE int64_t count_valid(const bool* valid, int64_t b, int64_t N, int64_t n0, int64_t n1) {
  int64_t count = 0;
  for (int64_t n = n0; n < n1; ++n) count += valid[b * N + n];
  return count;
}

struct UniformRow {
  int64_t clusters;  // n // L, or 1 for 0 < n < L, or 0
  int64_t kept;      // clustered tokens
  int64_t start;     // valid tokens cropped at the start
};

ENACT_HOST_DEVICE UniformRow uniform_row(int64_t n_valid, int64_t L) {
  if (n_valid < L) return {n_valid > 0 ? 1 : 0, n_valid, 0};
  const int64_t m = n_valid / L;
  return {m, m * L, (n_valid % L) / 2};
}

// Labels tokens [n0, n1) of row b and writes their CSR entries; `valid_before`: the row's valid
// tokens before the chunk.
ENACT_HOST_DEVICE void fill_uniform_chunk(const bool* valid, int64_t b, int64_t N, int64_t n0, int64_t n1,
                                          int64_t valid_before, const UniformRow& shape, int64_t L,
                                          RowStart row, const SegmentOut& out) {
  int64_t p = valid_before;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t i = b * N + n;
    if (!valid[i]) {
      out.cluster_ids[i] = -1;
      continue;
    }
    const int64_t local = p++ - shape.start;  // position among the kept tokens
    if (local < 0 || local >= shape.kept) {
      out.cluster_ids[i] = -1;
      continue;
    }
    const int64_t slot = local / L;  // 0 in a row shorter than L
    write_token(out, b, i, slot, row.segment + slot, row.token + local, local == slot * L);
  }
}

}  // namespace enact
