"""The chunked (parallel-within-row) segmentations: the compiled kernels against the pure-PyTorch
reference on rows that stress the chunk logic.

The CPU kernels cut each row into chunks of 64 tokens (``kCpuChunk`` in segment_cpu.cpp) and run
the per-chunk steps the CUDA kernels run with one chunk per thread (segment_rows.h): runs and
pads crossing chunk boundaries, chunks that are all padding, rows of fewer, exactly as many and
many more tokens than a chunk.  The CUDA test compares the GPU with the CPU on long rows.
"""
import pytest
import torch

import enact_ops
from enact_ops import read_row_sizes, runs_sizes, segment_runs, segment_uniform, uniform_sizes

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built"),
]

CHUNK = 64  # kCpuChunk
LENGTHS = [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7, 9 * CHUNK + 5]


def _assert_same(ours, ref):
    for name, x, y in zip(ours._fields, ours, ref):
        assert x.dtype == torch.int64, name
        assert x.device == y.device and torch.equal(x, y), name


def _check_runs(sign, mask, device="cpu"):
    """Compiled (with and without the sizes) == reference on every field."""
    sign, mask = sign.to(device), mask.to(device)
    ref = segment_runs(sign.cpu(), mask.cpu(), backend="reference")
    sizes = runs_sizes(*read_row_sizes(sign.shape, ~mask, sign))
    for given in (None, sizes):
        ours = segment_runs(sign, mask, backend="compiled", sizes=given)
        assert ours.cluster_ids.device.type == torch.device(device).type
        _assert_same(type(ours)(*(t.cpu() for t in ours)), ref)
    return ref


def _check_uniform(mask, L, device="cpu"):
    mask = mask.to(device)
    ref = segment_uniform(mask.cpu(), L, backend="reference")
    sizes = uniform_sizes(read_row_sizes(mask.shape, ~mask)[0], L)
    for given in (None, sizes):
        ours = segment_uniform(mask, L, backend="compiled", sizes=given)
        assert ours.cluster_ids.device.type == torch.device(device).type
        _assert_same(type(ours)(*(t.cpu() for t in ours)), ref)
    return ref


def _random_sign(B, N, mean_run, g):
    """Signs whose runs have geometric lengths of mean ``mean_run`` (1: independent tokens)."""
    if mean_run <= 1:
        return torch.rand(B, N, generator=g) < 0.5
    flips = torch.rand(B, N, generator=g) < 1.0 / mean_run
    return (torch.cumsum(flips.long(), 1) % 2).bool() ^ (torch.rand(B, 1, generator=g) < 0.5)


def _detr_mask(B, H, W, g):
    """DETR's padding: image b is h x w of the batch's H x W canvas, pads right and bottom,
    flattened row-major (each image row: w valid tokens, W - w pads)."""
    mask = torch.ones(B, H, W, dtype=torch.bool)
    for b in range(B):
        h = int(torch.randint(1, H + 1, (1,), generator=g))
        w = int(torch.randint(1, W + 1, (1,), generator=g))
        mask[b, :h, :w] = False
    mask[0] = False  # the largest image fills the canvas
    return mask.reshape(B, H * W)


# ---------------------------------------------------------------------------- runs
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("mean_run", [1, 3, 40, 200])
def test_runs_random_rows_around_the_chunk_size(N, mean_run):
    g = torch.Generator().manual_seed(N * 1000 + mean_run)
    B = 6
    sign = _random_sign(B, N, mean_run, g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1] = torch.rand(N, generator=g) < 0.3  # scattered pads
    mask[2, N // 2:] = True  # right padding
    mask[3] = True  # no valid token
    mask[4, : N // 3] = True  # pads first
    _check_runs(sign, mask)


def test_runs_cross_chunk_boundaries():
    """Runs that start before a boundary and end after it, or end exactly on one."""
    N = 5 * CHUNK
    sign = torch.zeros(4, N, dtype=torch.bool)
    sign[0, 50:80] = True  # across the first boundary
    sign[0, 100:300] = True  # across three
    sign[1, CHUNK:2 * CHUNK] = True  # exactly one chunk
    sign[2, CHUNK - 1] = True  # one token at each side of a boundary
    sign[2, 2 * CHUNK] = True
    sign[3, :] = True
    sign[3, CHUNK - 1:CHUNK + 1] = False  # a run of two across the boundary
    mask = torch.zeros_like(sign)
    seg = _check_runs(sign, mask)
    assert seg.num_clusters.tolist() == [5, 3, 5, 3]


def test_runs_continue_across_all_pad_chunks():
    """Whole chunks of padding -- the first, a middle one, the last -- do not break a run."""
    N = 6 * CHUNK
    sign = torch.zeros(5, N, dtype=torch.bool)
    mask = torch.zeros_like(sign)
    mask[0, :CHUNK] = True  # the first chunk: the row starts in the second
    mask[1, CHUNK:3 * CHUNK] = True  # two middle chunks; equal signs on both sides: one run
    mask[2, CHUNK:2 * CHUNK] = True
    sign[2, 2 * CHUNK:] = True  # different signs on both sides of the pad chunk: two runs
    mask[3, 5 * CHUNK:] = True  # the last chunk
    sign[3, 5 * CHUNK - 1] = True
    mask[4] = True  # every chunk is padding but one token in the middle of one
    mask[4, 3 * CHUNK + 10] = False
    seg = _check_runs(sign, mask)
    assert seg.num_clusters.tolist() == [1, 1, 2, 2, 1]
    assert seg.cluster_ids[1, 3 * CHUNK].item() == 0 and seg.cluster_ids[1, CHUNK].item() == -1


def test_runs_pads_between_chunks_with_sign_changes_inside():
    """Only the last valid token before a chunk decides whether its first valid token starts a
    run: pads at the end of one chunk and the start of the next, signs flipping around them."""
    g = torch.Generator().manual_seed(1)
    N = 8 * CHUNK
    B = 16
    sign = _random_sign(B, N, 5, g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        for k in range(1, 8):  # pads around every boundary, of random widths
            left, right = (int(v) for v in torch.randint(0, CHUNK + 10, (2,), generator=g))
            mask[b, max(0, k * CHUNK - left):k * CHUNK + right] = True
    _check_runs(sign, mask)


@pytest.mark.parametrize("N", [1, CHUNK, 4 * CHUNK + 3])
@pytest.mark.parametrize("value", [False, True])
def test_runs_one_sign_rows(N, value):
    sign = torch.full((3, N), value)
    mask = torch.zeros(3, N, dtype=torch.bool)
    mask[1, ::3] = True
    mask[2, : N // 2] = True
    seg = _check_runs(sign, mask)
    assert seg.num_clusters.tolist() == [1, 1 if N > 1 else 0, 1]


@pytest.mark.parametrize("N", [2, CHUNK, CHUNK + 1, 7 * CHUNK + 1])
def test_runs_alternating_signs(N):
    """Every valid token its own run; with every other token a pad, one run per row."""
    sign = (torch.arange(N) % 2).bool().expand(3, N).clone()
    mask = torch.zeros(3, N, dtype=torch.bool)
    mask[1, 1::2] = True  # the remaining tokens all have sign 0
    mask[2, : CHUNK // 2] = True
    seg = _check_runs(sign, mask)
    assert seg.num_clusters[0].item() == N and seg.num_clusters[1].item() == 1
    assert torch.equal(seg.seg_starts[1:seg.num_clusters[0] + 1], torch.arange(1, N + 1))


@pytest.mark.parametrize("seed", range(4))
def test_runs_detr_padding(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = 23, 31  # N = 713: 12 chunks, boundaries inside the image rows
    mask = _detr_mask(5, H, W, g)
    for mean_run in (1, 4, 50):
        _check_runs(_random_sign(5, H * W, mean_run, g), mask)


@pytest.mark.parametrize("density", [0.02, 0.5, 0.97])
def test_runs_arbitrary_masks(density):
    g = torch.Generator().manual_seed(int(density * 100))
    B, N = 7, 11 * CHUNK - 13
    mask = torch.rand(B, N, generator=g) < density
    _check_runs(_random_sign(B, N, 6, g), mask)


def test_runs_given_sizes_must_be_right():
    sign = torch.zeros(2, 3 * CHUNK, dtype=torch.bool)
    sign[:, CHUNK:] = True
    mask = torch.zeros_like(sign)
    with pytest.raises(RuntimeError, match="are not the segmentation's"):
        segment_runs(sign, mask, backend="compiled", sizes=enact_ops.SegmentationSizes(3, 6 * CHUNK, 2))


# ---------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("L", [1, 3, 7, CHUNK, CHUNK + 1, 1000])
def test_uniform_around_the_chunk_size(N, L):
    """Chunk lengths below, at and above the scan's chunk, and one longer than every row."""
    g = torch.Generator().manual_seed(N * 10 + L)
    B = 5
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1] = torch.rand(N, generator=g) < 0.4
    mask[2, : N // 2] = True  # pads first
    mask[3] = True  # empty
    mask[4, N - N // 3:] = True
    _check_uniform(mask, L)


@pytest.mark.parametrize("L", [2, 5, 64, 300, 900])
def test_uniform_detr_and_all_pad_chunks(L):
    g = torch.Generator().manual_seed(L)
    H, W = 23, 31
    mask = _detr_mask(4, H, W, g)
    mask[3] = True
    mask[3, 2 * CHUNK:4 * CHUNK - 5] = False  # pads in the first, in the last chunks
    _check_uniform(mask, L)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("L", [3, 17, 130])
def test_uniform_arbitrary_masks(density, L):
    g = torch.Generator().manual_seed(int(density * 100) + L)
    mask = torch.rand(6, 9 * CHUNK + 1, generator=g) < density
    _check_uniform(mask, L)


def test_uniform_crop_crosses_chunks():
    """n = 300 valid tokens, L = 128: 44 // 2 = 22 cropped at the start, 22 at the end; the
    second cluster starts inside the third chunk, the crop at the end is in the fifth."""
    N = 5 * CHUNK
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, N - 20:] = True
    seg = _check_uniform(mask, 128)
    assert seg.num_clusters.tolist() == [2]
    assert seg.tokens[0].item() == 22 and seg.seg_starts.tolist() == [0, 128, 256]
    assert (seg.cluster_ids[0, :22] == -1).all() and (seg.cluster_ids[0, 278:] == -1).all()


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")),
                    reason="no GPU with enact_ops CUDA kernels")
@pytest.mark.parametrize("N", [1, 37, 3400, 20000])
def test_cuda_matches_cpu_on_long_rows(N):
    """One block per row on the GPU == the CPU's 64-token chunks == the reference."""
    g = torch.Generator().manual_seed(N)
    B = 8
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, int(N * 0.9):] = True
    mask[2] = torch.rand(N, generator=g) < 0.5
    mask[3, : N // 4] = True
    mask[4] = True
    mask[5, : N // 2] = torch.rand(N // 2, generator=g) < 0.99
    for mean_run in (1, 8, 500):
        sign = _random_sign(B, N, mean_run, g)
        _check_runs(sign, mask, device="cuda")
    for L in (1, 7, 64, 513, N + 1):
        _check_uniform(mask, L, device="cuda")
