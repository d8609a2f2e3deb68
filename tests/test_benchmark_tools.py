"""tools/benchmark.py and tools/analyze_model.py end to end, as subprocesses, on the shapes demo
configs shrunk with --opts (R18 at 64 x 96, 2 encoder / 1 decoder layers); the pieces of
projects.enact.benchmark (batches, bool dropout masks, imports) directly."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import enact_ops
from projects.enact.benchmark import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/shapes/detr_r18_shapes.py", "configs/shapes/detr_r18_shapes_enact.py"]
TINY = ["model.transformer.encoder.num_layers=2", "model.transformer.decoder.num_layers=1", "model.num_queries=10",
        "model.select_box_nums_for_evaluation=10"]


def run_tool(script, *argv, tmp_path, configs=CONFIGS):
    md, js = tmp_path / f"{script}.md", tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", f"{script}.py"), "--configs", *configs, "--threads", "1",
           "--out-md", str(md), "--out-json", str(js), *argv, "--opts", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.is_file() and "| model |" in md.read_text()
    return json.loads(js.read_text()), proc.stdout


def test_benchmark(tmp_path):
    result, stdout = run_tool("benchmark", "--batch", "1", "--size", "64", "96", "--repeats", "1",
                              "--attention", "eager", "--jobs", "2", "--quiet", "--profile", str(tmp_path / "prof"),
                              tmp_path=tmp_path)
    assert "padded 64x96" in stdout and "batch 1" in stdout and "| detr_r18_shapes_enact | eager |" in stdout
    assert result["complete"] and result["device"] == "cpu" and result["attention_backends"] == ["eager"]
    assert result["sizes"] == {"detr_r18_shapes": {"batch": 1, "size": [64, 96], "padded": [64, 96],
                                                   "orientation": "same"}}
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["detr_r18_shapes", "detr_r18_shapes_enact"]
    for row in rows.values():
        assert row["attention"] == "eager" and row["attention_modules_set"] == 2  # one per encoder layer (--opts)
        for key in ("train_s_per_img", "infer_s_per_img", "encoder_ms_per_img", "train_memory_bytes",
                    "encoder_memory_bytes"):
            assert row[key] > 0, key
        assert row["infer_memory_bytes"] >= 0
        assert row["train_memory"]["peak_bytes"] > row["train_memory"]["increase_bytes"]
    base, enact = rows["detr_r18_shapes"], rows["detr_r18_shapes_enact"]
    assert "clusters_per_layer" not in base and "train_memory_gain" not in base
    assert len(enact["clusters_per_layer"]) == 2 and all(m >= 1 for m in enact["clusters_per_layer"])
    assert enact["compression_mean"] > 1  # tokens clustered
    for key in ("train_memory_gain", "infer_memory_gain", "encoder_memory_gain", "train_time_ratio",
                "infer_time_ratio", "encoder_time_ratio"):
        assert key in enact, key
    assert enact["train_time_ratio"] == pytest.approx(enact["train_s_per_img"] / base["train_s_per_img"])
    # --profile: one profiled step per (variant, mode), op tables on disk, labelled ranges in the JSON
    for row in rows.values():
        assert set(row["profile"]) == {"train", "infer", "encoder"}
        for prof in row["profile"].values():
            assert prof["step_ms"] > 0 and os.path.isfile(os.path.join(ROOT, prof["table"]))
    assert base["profile"]["encoder"]["ranges_ms"]["mhsa::attend_heads"] > 0
    assert "enact::cluster_keys_values" not in base["profile"]["encoder"]["ranges_ms"]
    enact_ranges = enact["profile"]["encoder"]["ranges_ms"]
    assert enact_ranges["enact::cluster_keys_values"] > 0 and enact_ranges["enact::attend_clusters"] > 0
    assert "mhsa::attend_heads" not in enact_ranges  # the encoder has no plain MHSA left
    assert any("Backward" in k for k in enact["profile"]["train"]["backward_ms"])
    with open(os.path.join(ROOT, enact["profile"]["encoder"]["table"])) as f:
        assert "enact::cluster_keys_values" in f.read()
    assert "torch.profiler" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_batch_orientation():
    same = runner.make_batch(4, (64, 96), 3, seed=0, device="cpu", min_scale=0.5)
    mixed = runner.make_batch(4, (64, 96), 3, seed=0, device="cpu", min_scale=0.5, orientation="mixed")
    sides = lambda batch: [tuple(x["image"].shape[1:]) for x in batch]  # noqa: E731
    assert sides(same)[0] == (64, 96) and all(h <= 64 and w <= 96 for h, w in sides(same))
    assert sides(mixed)[:2] == [(64, 96), (96, 64)]  # landscape and portrait at full size: padded to 96 x 96
    assert all(h <= 64 and w <= 96 for h, w in sides(mixed)[0::2])
    assert all(h <= 96 and w <= 64 and h >= 48 for h, w in sides(mixed)[1::2])
    for x in mixed:
        assert (x["height"], x["width"]) == tuple(x["image"].shape[1:]) == x["instances"].image_size
        boxes = x["instances"].gt_boxes.tensor
        assert (boxes[:, 2] <= x["width"]).all() and (boxes[:, 3] <= x["height"]).all()
    with pytest.raises(ValueError, match="orientation must be one of"):
        runner.make_batch(1, (64, 96), 3, seed=0, device="cpu", orientation="portrait")


def _saved_dtypes(fn, x):
    """The dtypes autograd saves for backward while ``fn(x)`` runs, and its output."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = fn(x)
    return saved, y


def test_bool_dropout_masks():
    x = torch.rand(20000, dtype=torch.float64) + 0.5
    x.requires_grad_()
    plain = F.dropout
    with runner.bool_dropout_masks():
        saved, y = _saved_dtypes(lambda t: torch.nn.Dropout(0.25)(t), x)
        assert saved == [torch.bool]  # what CUDA keeps; CPU's F.dropout keeps a float mask
        kept = y != 0
        assert abs(float(kept.double().mean()) - 0.75) < 0.02
        assert torch.allclose(y[kept], x[kept] / 0.75)
        y.sum().backward()
        assert torch.allclose(x.grad, kept.double() / 0.75)
        assert torch.equal(F.dropout(x, 0.25, training=False), x)  # eval: identity, as before
    assert F.dropout is plain
    assert _saved_dtypes(lambda t: F.dropout(t, 0.25), x)[0] == [torch.float64]  # restored


def test_bool_dropout_masks_restored_after_an_exception():
    plain = F.dropout
    with pytest.raises(RuntimeError, match="inside the block"):
        with runner.bool_dropout_masks():
            assert F.dropout is not plain
            raise RuntimeError("inside the block")
    assert F.dropout is plain
    with runner.dropout_masks("native"):  # the default leaves F.dropout alone
        assert F.dropout is plain


def test_benchmark_package_needs_torch_only():
    """The operator and attention benchmarks run on machines without detectron2."""
    code = ("import sys, projects.enact.benchmark, projects.enact.benchmark.utils, projects.enact.benchmark.report; "
            "assert not {'detectron2', 'fvcore'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_variants_and_groups():
    """X.py, X_enact.py and X_act.py: one detector, three variant labels, the baseline first."""
    from projects.enact.benchmark.detector import group_configs

    paths = ["configs/detr_r50_300ep_act.py", "configs/detr_r50_300ep_enact.py", "configs/detr_r50_300ep.py"]
    assert [runner.variant(p) for p in paths] == ["act", "enact", "baseline"]
    assert {runner.detector_key(p) for p in paths} == {"detr_r50_300ep"}
    assert group_configs(paths) == {"detr_r50_300ep": [paths[2], paths[0], paths[1]]}
    sparse = ["configs/shapes/conditional_detr_r18_shapes_sparse_enact.py", "configs/shapes/conditional_detr_r18_shapes.py",
              "configs/shapes/conditional_detr_r18_shapes_sparse.py"]  # Sparse DETR (issue 23): the same group
    assert [runner.variant(p) for p in sparse] == ["sparse+enact", "baseline", "sparse"]
    assert group_configs(sparse) == {"conditional_detr_r18_shapes": [sparse[1], sparse[0], sparse[2]]}


def test_query_ratio_rows():
    """--query-ratios: every Sparse DETR config once per rho (PATH@RHO), labelled and loaded at that
    rho; other configs unchanged; a rho on a dense config or a bad rho is a clear error."""
    from projects.enact.benchmark.detector import expand_query_ratios

    base, sparse = "configs/shapes/conditional_detr_r18_shapes.py", "configs/shapes/conditional_detr_r18_shapes_sparse_enact.py"
    paths = expand_query_ratios([base, sparse], [0.1, 0.3])
    assert paths == [base, sparse + "@0.1", sparse + "@0.3"]
    assert expand_query_ratios([base, sparse], None) == [base, sparse]
    assert [runner.variant(p) for p in paths] == ["baseline", "sparse+enact rho=0.1", "sparse+enact rho=0.3"]
    assert {runner.detector_key(p) for p in paths} == {"conditional_detr_r18_shapes"}
    assert runner.config_name(paths[1]) == "conditional_detr_r18_shapes_sparse_enact_rho0.1"
    assert runner.resolve_config(paths[1]) == os.path.join(ROOT, sparse) + "@0.1"
    assert runner.load_config(paths[1], [], "cpu").model.transformer.encoder.query_ratio == 0.1
    with pytest.raises(ValueError, match="has none"):
        runner.load_config(base + "@0.1", [], "cpu")
    with pytest.raises(ValueError, match="a query ratio"):
        runner.split_spec(sparse + "@x")
    with pytest.raises(ValueError, match=r"--query-ratios: 1.5 is not in \(0, 1\]"):
        expand_query_ratios([sparse], [1.5])


def test_analyze_model(tmp_path):
    result, stdout = run_tool("analyze_model", "--size", "64", "96", tmp_path=tmp_path,
                              configs=CONFIGS + ["configs/shapes/detr_r18_shapes_act.py"])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["detr_r18_shapes", "detr_r18_shapes_enact", "detr_r18_shapes_act"]
    act = rows.pop("detr_r18_shapes_act")
    assert act["params"] == rows["detr_r18_shapes"]["params"]  # ACT adds no parameters
    assert len(act["clusters_per_layer"]) == 2 and all(c >= 1 for c in act["clusters_per_layer"])
    act_line = next(l for l in (tmp_path / "analyze_model.md").read_text().splitlines() if "| detr_r18_shapes_act |" in l)
    assert "(+0)" in act_line and "x)" in act_line  # paired with its baseline: +0 parameters, encoder FLOPs ratio
    for row in rows.values():
        assert 0 < row["trainable_params"] <= row["params"] and 0 < row["encoder_params"] < row["params"]
        assert 0 < row["encoder_flops"] < row["flops"] and 0 < row["encoder_share"] < 1
        assert row["custom_op_flops"]["aten::scaled_dot_product_attention"] > 0  # the SDPA handle counts
        assert "aten::scaled_dot_product_attention" not in row["unsupported_ops"]
        assert isinstance(row["unsupported_ops"], dict)
    base, enact = rows["detr_r18_shapes"], rows["detr_r18_shapes_enact"]
    assert enact["params"] - base["params"] == 2 * (128 + 1)  # W_prob: Linear(128, 1) per encoder layer
    if enact_ops.compiled_available():  # the fused pooling is traced as one op with its own handle
        # encoder self-attention's key/value pooling: one registered operator with its own handle
        assert enact["custom_op_flops"]["enact_ops::pool_shared_key_value"] > 0
        assert enact["custom_op_flops"]["enact_ops::smoothed_information"] > 0  # steps 1-4, one op
    assert not any(op.startswith(("enact_ops::", "prim::PythonOp")) for op in enact["unsupported_ops"])
    assert len(enact["clusters_per_layer"]) == 2 and "clusters_per_layer" not in base
    assert "unsupported (counted as 0)" in stdout


@pytest.mark.parametrize("script,argv", [
    ("benchmark_ops", ["--seq-lens", "40", "--batch", "2", "--channels", "8"]),
    ("benchmark_attention", ["--seq-lens", "40", "--batch", "2", "--channels", "16", "--heads", "2"]),
])
def test_kernel_and_attention_benchmarks(script, argv, tmp_path):
    if script == "benchmark_ops" and not enact_ops.compiled_available("cpu"):
        pytest.skip("enact_ops._C is not built")
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", f"{script}.py"), "--repeats", "1", "--out", str(out), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tool"] == script and result["rows"] and result["memory_measure"]
    for row in result["rows"]:
        times = row["times_s"].values() if "times_s" in row else [row["time_s"]]
        assert all(t > 0 for t in times)


@pytest.mark.skipif(not enact_ops.compiled_available("cpu"), reason="enact_ops._C is not built")
def test_analyze_model_counts_the_plain_pooling():
    """enact_ops.segment_softmax_pool (the plain path: a key that is not value + pos, RCDA's
    clusterings) traces as the registered operator enact_ops::segment_softmax_pool_forward, and
    analyze_model's handle counts B*N*C per pooled tensor (keys and values)."""
    from fvcore.nn import FlopCountAnalysis

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import analyze_model
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    from projects.enact import EnactClustering

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clustering = EnactClustering(8, sigma=1)

        def forward(self, key, value):
            return self.clustering(key, value).key

    key, value = torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    flops = FlopCountAnalysis(Plain().eval(), (key, value)).set_op_handle(
        analyze_model.POOL_OP, analyze_model.pool_flop_jit, analyze_model.INFORMATION_OP, None,
        *[x for op in analyze_model.ZERO_OPS for x in (op, None)])
    flops.unsupported_ops_warnings(False).tracer_warnings("none")
    with torch.no_grad():
        assert flops.by_operator()["segment_softmax_pool_forward"] == 2 * 2 * 30 * 8
    assert not any(op.startswith(("enact_ops::", "prim::PythonOp")) for op in flops.unsupported_ops())
