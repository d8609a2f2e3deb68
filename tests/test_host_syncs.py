"""Host syncs of ENACT's forward and backward, counted on CPU: at most one per encoder layer (the
read of every image's valid length and number of runs, which sizes M_max and checks that every
image has a valid token), none in backward.

On a GPU a sync is any read of device data by the host.  On CPU the same code paths are counted
with a TorchDispatchMode, which sees every ATen op the Python side dispatches:

* ``aten._local_scalar_dense`` -- what ``Tensor.item()``, ``bool(t)``, ``int(t)``, ``float(t)``
  dispatch to (checked below to fire on CPU);
* ops whose output size is data: ``nonzero``, ``unique``, ``masked_select``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, indexing with a bool mask;
* ``aten.lift_fresh`` -- ``torch.tensor(data, device=...)``: a blocking host-to-device copy that
  waits for the stream on CUDA;
* ``Tensor.tolist`` (patched: on CPU it dispatches nothing).

The mode does not see inside a compiled op's kernel (its nested calls run with the mode off), so
the syncs of the ``enact_ops`` CUDA implementations are counted from their schema arguments, by
``CUDA_OP_SYNCS`` below, and ``test_cuda_sources_read_nothing_but_the_fallback_sizes`` pins the
model to the CUDA sources (``csrc/cuda/*.cu``): without the sizes, a segmentation reads (S, T) in
one copy (``segment_cuda.cu``); with them, and in every other op, nothing.
"""
import collections
import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import enact_ops
from projects.enact import EnactAttention
from projects.enact.modeling.transformer import TransformerEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE_FROM_DATA = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "masked_select", "bincount"}
SEGMENTATION_OPS = {"segment_runs": 2, "segment_uniform": 2}  # op: number of arguments before the sizes


def cuda_op_syncs(name, args, kwargs) -> int:
    """Host syncs inside the CUDA implementation of ``torch.ops.enact_ops.<name>`` for these
    arguments (see segment_cuda.cu): a segmentation without its sizes reads (S, T) in one copy."""
    if name in SEGMENTATION_OPS:
        given = args[SEGMENTATION_OPS[name]] if len(args) > SEGMENTATION_OPS[name] else kwargs.get("num_segments")
        return 0 if given is not None else 1
    return 0


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs (by kind) of what runs under it; ``ops`` counts every op's calls."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()
        self.ops = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops[f"{func.namespace}.{name}"] += 1
        if func.namespace == "aten":
            if name in SIZE_FROM_DATA or name in ("_local_scalar_dense", "lift_fresh"):
                self.syncs[name] += 1
            elif name == "repeat_interleave" and func._overloadname.startswith("Tensor"):
                if kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None):
                    self.syncs[name] += 1
            elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            ):
                self.syncs["bool_index"] += 1
            elif name in ("_to_copy", "copy_") and _leaves_device(func, args, kwargs):
                self.syncs["device_to_host"] += 1
        elif func.namespace == "enact_ops":
            n = cuda_op_syncs(name, args, kwargs)
            if n:
                self.syncs[f"enact_ops.{name} (CUDA)"] += n
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs["tolist"] += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _leaves_device(func, args, kwargs) -> bool:
    """A copy from a non-CPU device to the host."""
    src = args[0] if func._schema.name.endswith("_to_copy") else args[1]
    dst_device = kwargs.get("device") if func._schema.name.endswith("_to_copy") else args[0].device
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None and (
        torch.device(dst_device).type == "cpu")


def count(fn):
    with SyncCounter() as counter:
        result = fn()
    return counter, result


def test_the_counter_sees_what_syncs():
    """Every way to read device data that ENACT's code could use is counted on CPU, forward and
    backward (the autograd engine runs backward under the mode)."""
    x = torch.randn(5, requires_grad=True)
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "int": lambda: int(x.argmax()),
        "float": lambda: float(x.detach().max()),
        "tolist": lambda: x.detach().tolist(),
        "nonzero": lambda: (x > 0).nonzero(),
        "bool index": lambda: x[x > 0],
        "unique": lambda: torch.unique(x.detach()),
        "bincount": lambda: torch.bincount(torch.tensor([0, 2])),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2])),
        "host to device": lambda: torch.tensor((1.0, 2.0)),
    }
    for what, fn in cases.items():
        assert count(fn)[0].total >= 1, what
    out = torch.where(x > 0, x, 2 * x).sum()
    assert count(out.backward)[0].total == 0  # a backward without syncs counts none ...
    masked = x[x.detach() > 0].sum()  # bool indexing: its backward (index_put with the mask) syncs too
    assert count(masked.backward)[0].syncs["bool_index"] == 1
    z = torch.randn(3, requires_grad=True)
    backward = _Item.apply(z).sum()
    assert count(backward.backward)[0].syncs["_local_scalar_dense"] == 1  # ... and sees one in backward
    assert count(lambda: torch.repeat_interleave(torch.arange(2), torch.arange(1, 3), output_size=3))[0].total == 0


class _Item(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g.sum().item()
        return g


def _inputs(N=40, B=3, C=16, seed=0, mask="padded", batch_first=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, B, C, generator=g)
    pos = torch.randn(N, B, C, generator=g)
    if batch_first:
        x, pos = x.transpose(0, 1).contiguous(), pos.transpose(0, 1).contiguous()
    if mask is None:
        return x, pos, None
    key_padding_mask = torch.zeros(B, N, dtype=torch.bool)
    if mask == "padded":
        key_padding_mask[1, 30:] = True
        key_padding_mask[2, ::7] = True
    return x, pos, key_padding_mask


BACKENDS = ["reference"] + (["compiled"] if enact_ops.compiled_available("cpu") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["segments", "uniform", "identity"])
@pytest.mark.parametrize("mask", ["padded", "nothing padded", None])
def test_one_sync_per_layer_forward_none_backward(backend, mode, mask):
    """EnactAttention in encoder self-attention (training: the fused path on the compiled
    backend), in cross-attention (value != key: the plain path with autograd) and in evaluation:
    at most one host sync in forward, none in backward."""
    torch.manual_seed(0)
    m = EnactAttention(16, 4, backend=backend, mode=mode)
    x, pos, key_padding_mask = _inputs(mask=mask)
    xg = x.clone().requires_grad_()
    fwd, out = count(lambda: m(xg, query_pos=pos, key_padding_mask=key_padding_mask))
    bwd, _ = count(lambda: out.square().sum().backward())
    assert fwd.total <= 1 and bwd.total == 0, (dict(fwd.syncs), dict(bwd.syncs))
    if backend == "compiled":  # the fused path was the one counted
        assert bwd.ops["enact_ops.segment_softmax_pool_backward_sum"] == 1, dict(bwd.ops)
    assert xg.grad is not None and m.clustering.w_prob.weight.grad is not None

    value = torch.randn_like(x, requires_grad=True)  # cross-attention: the plain (non-fused) path
    fwd, out = count(lambda: m(x, key=x, value=value, key_pos=pos, key_padding_mask=key_padding_mask))
    bwd, _ = count(lambda: out.square().sum().backward())
    assert fwd.total <= 1 and bwd.total == 0, (dict(fwd.syncs), dict(bwd.syncs))
    assert value.grad is not None

    m.eval()
    with torch.no_grad():
        fwd, _ = count(lambda: m(x, query_pos=pos, key_padding_mask=key_padding_mask))
    assert fwd.total <= 1, dict(fwd.syncs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_layer_encoder_syncs_three_times(backend):
    """A 3-layer TransformerEncoder of EnactAttention: one host sync per layer in forward (the
    layers' sizes differ: each reads its own), none in backward; training and evaluation."""
    torch.manual_seed(0)
    enc = TransformerEncoder(EnactAttention(16, 4, backend=backend), num_layers=3, embed_dim=16, ffn_dim=32,
                             dropout=0.1, num_heads=4)
    x, pos, key_padding_mask = _inputs()
    xg = x.clone().requires_grad_()
    fwd, out = count(lambda: enc(xg, pos=pos, mask=key_padding_mask))
    bwd, _ = count(lambda: out.square().sum().backward())
    assert fwd.total <= 3 and bwd.total == 0, (dict(fwd.syncs), dict(bwd.syncs))
    enc.eval()
    with torch.no_grad():
        fwd, _ = count(lambda: enc(x, pos=pos, mask=key_padding_mask))
    assert fwd.total <= 3, dict(fwd.syncs)


def test_the_one_sync_still_refuses_an_image_without_tokens():
    """The all-pad check folded into the one read: still an error, before any output exists."""
    m = EnactAttention(16, 4)
    x, pos, key_padding_mask = _inputs()
    key_padding_mask[0] = True
    with pytest.raises(ValueError, match="image 0 of the batch has no valid token"):
        m(x, query_pos=pos, key_padding_mask=key_padding_mask)


def test_cuda_sources_read_nothing_but_the_fallback_sizes():
    """The C++ side of the model above: no ``.item()`` in any enact_ops source, and on CUDA one
    device-to-host copy only, the (S, T) read of a segmentation called without its sizes."""
    csrc = ROOT / "enact_ops" / "csrc"
    for path in csrc.rglob("*"):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            text = path.read_text()
            assert not re.search(r"\.item\s*<|\.item\s*\(", text), path
            assert "_local_scalar_dense" not in text, path
    sources = {path.name: path.read_text() for path in sorted((csrc / "cuda").glob("*.cu"))}
    assert {"enact_cuda.cu", "segment_cuda.cu"} <= set(sources), sorted(sources)
    reads = {name: re.findall(r"\.cpu\(\)|\.to\(\s*(?:at::)?kCPU|cudaMemcpy(?!Async\b)|cudaStreamSynchronize|"
                              r"cudaDeviceSynchronize", text) for name, text in sources.items()}
    assert {name: r for name, r in reads.items() if r} == {"segment_cuda.cu": [".cpu()"]}, reads
    cuda = sources["segment_cuda.cu"]
    fallback = cuda[cuda.index("Csr csr_layout("):]
    fallback = fallback[: fallback.index("\n}\n")]
    assert ".cpu()" in fallback and "if (num_segments.has_value())" in fallback
