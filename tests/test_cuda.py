"""Checks that exist on a GPU only (all marked ``cuda``; `pytest -m cuda` on the GPU machine, which
tools/gpu_check.py runs): a bad token index stops the CUDA kernel with a device-side assertion,
and EnactAttention on CUDA equals it on the CPU.  The device-parametrised tests of test_ops.py,
test_information.py, test_mixed_precision.py and test_enact.py (the fused path taken, TF32) carry
the same marker; without a GPU all of them skip."""
import subprocess
import sys

import pytest
import torch

import enact_ops
from projects.enact import EnactAttention

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and enact_ops.compiled_available("cuda")), reason="no GPU with enact_ops CUDA kernels")]

PROBE = """\
import torch, enact_ops
g = torch.Generator().manual_seed(0)
sign, scores, k = torch.rand(2, 9, generator=g) > 0.5, torch.randn(2, 9), torch.randn(2, 9, 4)
sign, scores, k = sign.cuda(), scores.cuda(), k.cuda()
seg = enact_ops.segment_runs(sign)
bad = seg.tokens.clone()
bad[-1] = 10**6
torch.ops.enact_ops.segment_softmax_pool_forward(scores, [k], bad, seg.seg_starts, seg.seg_batch, seg.row_offsets,
                                                 seg.max_clusters)
torch.cuda.synchronize()
print("PROBE-NOT-REACHED")
"""


def test_out_of_range_token_stops_the_kernel():
    """The CUDA kernels check index values on the device (the CPU checks them on the host,
    test_ops.test_public_ops_check_index_values): a child process given a token index out of range
    dies of a device-side assertion before it prints PROBE-NOT-REACHED."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "PROBE-NOT-REACHED" not in text, text[-2000:]
    assert any(s in text for s in ("device-side assert", "Assertion", "CUDA error")), text[-2000:]


def test_enact_attention_on_cuda_equals_cpu():
    """A training step at a detector's width and length: the same clusters, and outputs and
    gradients equal to float32 rounding."""
    C, heads, N = 256, 8, 850
    torch.manual_seed(0)
    x, pos = torch.randn(N, 2, C), torch.randn(N, 2, C)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[1, int(N * 0.9):] = True
    cpu = EnactAttention(C, heads).train()
    got = {}
    for device in ("cpu", "cuda"):
        m = EnactAttention(C, heads).to(device).train()
        m.load_state_dict(cpu.state_dict())
        xi = x.to(device).requires_grad_()
        out = m(xi, query_pos=pos.to(device), key_padding_mask=mask.to(device))
        out.pow(2).mean().backward()
        with torch.no_grad():
            key, value = ((x + pos).transpose(0, 1).to(device), x.transpose(0, 1).to(device))
            ids = m.clustering(key, value, mask.to(device)).cluster_ids
        got[device] = dict(ids=ids, out=out, grad_x=xi.grad, grad_w_prob=m.clustering.w_prob.weight.grad)
    a, b = ({k: v.detach().cpu() for k, v in got[d].items()} for d in ("cuda", "cpu"))
    assert torch.equal(a["ids"], b["ids"])
    assert int(b["ids"].max()) + 1 < N * 0.9  # tokens were clustered, not left alone
    for key, tol in (("out", 1e-4), ("grad_x", 1e-4), ("grad_w_prob", 1e-3)):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tol * max(1.0, float(b[key].abs().max())))
