"""Checkpoint conversion from the original DETR / Conditional DETR / Anchor DETR implementations.

The source models are not needed: tests/data/checkpoint_layouts/*.json record the key names,
shapes, dtypes (and shared storages) of each source's state dict, as built by its own repository
(facebookresearch/detr, Atten4Vis/ConditionalDETR, megvii-research/AnchorDETR).  Random tensors of
those shapes stand in for trained weights.
"""
import argparse
import importlib.util
import json
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from projects.enact.checkpoint import (
    ConversionError,
    check_shapes,
    convert_state_dict,
    detect_source,
    enact_parameter_names,
    input_format_of,
)
from projects.enact.checkpoint.checkpointer import EnactCheckpointer
from projects.enact.checkpoint.common import coco_ids_in_contiguous_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = os.path.join(ROOT, "tests", "data", "checkpoint_layouts")

# source -> (layout file, project config, ENACT twin)
CASES = {
    "detr": ("detr_r50.json", "detr_r50_300ep.py", "detr_r50_300ep_enact.py"),
    "conditional_detr": (
        "conditional_detr_r50.json", "conditional_detr_r50_50ep.py", "conditional_detr_r50_50ep_enact.py"
    ),
    "anchor_detr": (
        "anchor_detr_r50_dc5.json", "anchor_detr_r50_dc5_50ep.py", "anchor_detr_r50_dc5_50ep_enact.py"
    ),
}


def load_layout(source):
    with open(os.path.join(LAYOUTS, CASES[source][0])) as f:
        doc = json.load(f)
    assert doc["source"] == source
    return doc["keys"]


def random_state_dict(source, seed=0):
    """Random tensors with the layout of ``source``; tensors that share storage in the source
    model (Anchor DETR's per-layer copies of its shared heads) share it here too."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for entry in load_layout(source):
        key, shape, dtype = entry[:3]
        if len(entry) > 3:
            sd[key] = sd[entry[3]]
        elif dtype.startswith("float"):
            sd[key] = torch.randn(shape, generator=g, dtype=getattr(torch, dtype))
        else:
            sd[key] = torch.randint(0, 10, shape, generator=g, dtype=getattr(torch, dtype))
    return sd


_MODELS = {}


def project_model(config):
    """Each config's model built once per test session (R50 models take seconds to build)."""
    if config not in _MODELS:
        cfg = LazyConfig.load(os.path.join(ROOT, "configs", config))
        cfg.model.device = "cpu"
        _MODELS[config] = instantiate(cfg.model).eval()
    return _MODELS[config]


@pytest.fixture(scope="module")
def converted():
    """source -> (source state dict, converted state dict, report)."""
    out = {}
    for source in CASES:
        sd = random_state_dict(source)
        new, report = convert_state_dict({"model": sd}, source)
        out[source] = (sd, new, report)
    return out


# ------------------------------------------------------------------ whole layouts
@pytest.mark.parametrize("source", list(CASES))
def test_layout_converts_and_loads_strictly(source, converted):
    _, new, report = converted[source]
    assert report.unused_source_keys == []
    model = project_model(CASES[source][1])
    target = model.state_dict()
    assert sorted(set(target) - set(new)) == []  # no missing
    assert sorted(set(new) - set(target)) == []  # no unexpected
    check_shapes(new, target)
    model.load_state_dict(new, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, new[key]), key


@pytest.mark.parametrize("source", list(CASES))
def test_enact_twin_misses_exactly_the_enact_parameters(source, converted):
    _, new, _ = converted[source]
    model = project_model(CASES[source][2])
    target = model.state_dict()
    enact = enact_parameter_names(model)
    assert enact and all(".w_prob." in k for k in enact)
    assert sorted(set(target) - set(new)) == sorted(enact)
    assert sorted(set(new) - set(target)) == []
    check_shapes(new, target)
    result = model.load_state_dict(new, strict=False)
    assert sorted(result.missing_keys) == sorted(enact) and result.unexpected_keys == []


# ------------------------------------------------------------------ specific transforms
def test_class_heads_reordered_from_91_coco_ids(converted):
    ids = coco_ids_in_contiguous_order()
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and 12 not in ids
    # DETR: 92 rows (ids 0..90 + no-object) -> 81 rows, no-object last
    sd, new, _ = converted["detr"]
    w, b = sd["class_embed.weight"], sd["class_embed.bias"]
    assert new["class_embed.weight"].shape == (81, 256)
    assert torch.equal(new["class_embed.weight"][0], w[1])  # person
    assert torch.equal(new["class_embed.weight"][11], w[13])  # stop sign (id 12 unused)
    assert torch.equal(new["class_embed.weight"][79], w[90])  # toothbrush
    assert torch.equal(new["class_embed.weight"][80], w[91])  # no object
    assert torch.equal(new["class_embed.bias"][80], b[91]) and torch.equal(new["class_embed.bias"][79], b[90])
    # Conditional DETR: 91 sigmoid rows -> 80
    sd, new, _ = converted["conditional_detr"]
    assert new["class_embed.weight"].shape == (80, 256)
    assert torch.equal(new["class_embed.weight"], sd["class_embed.weight"][ids])
    assert torch.equal(new["class_embed.bias"], sd["class_embed.bias"][ids])
    # Anchor DETR: the shared head stored under transformer.class_embed.<layer> -> class_embed
    sd, new, _ = converted["anchor_detr"]
    assert torch.equal(new["class_embed.weight"], sd["transformer.class_embed.0.weight"][ids])
    assert torch.equal(new["bbox_embed.layers.2.bias"], sd["transformer.bbox_embed.0.layers.2.bias"])


def test_attention_projections(converted):
    # DETR keeps nn.MultiheadAttention's packed (q, k, v) order
    sd, new, _ = converted["detr"]
    assert torch.equal(
        new["transformer.decoder.layers.3.cross_attn.attn.in_proj_weight"],
        sd["transformer.decoder.layers.3.multihead_attn.in_proj_weight"],
    )
    assert torch.equal(
        new["transformer.encoder.layers.0.self_attn.attn.out_proj.bias"],
        sd["transformer.encoder.layers.0.self_attn.out_proj.bias"],
    )
    # Conditional DETR: separate Linear layers, ca_qpos_proj only in the first layer
    sd, new, _ = converted["conditional_detr"]
    assert torch.equal(
        new["transformer.decoder.layers.0.cross_attn.query_pos_proj.weight"],
        sd["transformer.decoder.layers.0.ca_qpos_proj.weight"],
    )
    assert "transformer.decoder.layers.1.cross_attn.query_pos_proj.weight" not in new
    assert torch.equal(
        new["transformer.decoder.layers.2.cross_attn.query_pos_sine_proj.bias"],
        sd["transformer.decoder.layers.2.ca_qpos_sine_proj.bias"],
    )
    assert torch.equal(
        new["transformer.decoder.layers.5.self_attn.key_pos_proj.weight"],
        sd["transformer.decoder.layers.5.sa_kpos_proj.weight"],
    )
    # Anchor DETR: RCDA's packed (5C, C) in_proj [q_row, q_col, k_row, k_col, v] is unpacked;
    # row = x (k_row is pooled over the rows: one key per column, queried with the x anchor)
    sd, new, _ = converted["anchor_detr"]
    for src, dst in [
        ("transformer.encoder_layers.2.self_attn", "transformer.encoder.layers.2.self_attn"),
        ("transformer.decoder_layers.4.cross_attn", "transformer.decoder_layers.4.cross_attn"),
    ]:
        w, b = sd[f"{src}.in_proj_weight"], sd[f"{src}.in_proj_bias"]
        for i, part in enumerate(["q_x_proj", "q_y_proj", "k_x_proj", "k_y_proj", "v_proj"]):
            assert torch.equal(new[f"{dst}.{part}.weight"], w[256 * i: 256 * (i + 1)])
            assert torch.equal(new[f"{dst}.{part}.bias"], b[256 * i: 256 * (i + 1)])
    # decoder self-attention packs q/k/v like nn.MultiheadAttention; norms follow the sub-layers
    assert torch.equal(
        new["transformer.decoder_layers.1.self_attn.attn.in_proj_weight"],
        sd["transformer.decoder_layers.1.self_attn.in_proj_weight"],
    )
    assert torch.equal(new["transformer.decoder_layers.1.norm1.weight"], sd["transformer.decoder_layers.1.norm2.weight"])
    assert torch.equal(new["transformer.decoder_layers.1.norm2.weight"], sd["transformer.decoder_layers.1.norm1.weight"])
    assert torch.equal(new["transformer.decoder_layers.1.norm3.bias"], sd["transformer.decoder_layers.1.ffn.norm2.bias"])
    assert torch.equal(new["transformer.anchors.weight"], sd["transformer.position.weight"])
    assert torch.equal(new["input_proj.1.weight"], sd["input_proj.0.1.weight"])  # GroupNorm


def test_batchnorm_statistics_land_in_frozen_bn_buffers(converted):
    sd, new, _ = converted["detr"]
    model = project_model(CASES["detr"][1])
    model.load_state_dict(new, strict=True)
    bb = model.backbone
    assert type(bb.stem.conv1.norm).__name__ == "FrozenBatchNorm2d"
    pairs = [
        (bb.stem.conv1.norm, "backbone.0.body.bn1"),
        (bb.res2[0].conv1.norm, "backbone.0.body.layer1.0.bn1"),
        (bb.res3[1].conv3.norm, "backbone.0.body.layer2.1.bn3"),
        (bb.res5[0].shortcut.norm, "backbone.0.body.layer4.0.downsample.1"),
    ]
    for norm, src in pairs:
        for field in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(norm, field), sd[f"{src}.{field}"]), (src, field)
    assert torch.equal(bb.res4[5].conv2.weight, sd["backbone.0.body.layer3.5.conv2.weight"])
    assert torch.equal(bb.res5[0].shortcut.weight, sd["backbone.0.body.layer4.0.downsample.0.weight"])
    _, anchor_new, _ = converted["anchor_detr"]
    anchor_sd = converted["anchor_detr"][0]
    assert torch.equal(anchor_new["backbone.res5.1.conv2.norm.running_var"], anchor_sd["backbone.body.layer4.1.bn2.running_var"])


def test_stem_channels_reversed_for_bgr_models(converted):
    """The sources read RGB images (ImageNet mean/std); this project's configs BGR images with the
    same statistics in BGR order, so the first convolution's input channels are reversed."""
    model = project_model(CASES["detr"][1])
    assert input_format_of(model) == "BGR"
    for source, prefix in [("detr", "backbone.0.body."), ("anchor_detr", "backbone.body.")]:
        sd, new, report = converted[source]
        assert torch.equal(new["backbone.stem.conv1.weight"], sd[prefix + "conv1.weight"].flip(1))
        assert any("input channels reversed" in n for n in report.notes)
        rgb, _ = convert_state_dict(sd, source, input_format="RGB")
        assert torch.equal(rgb["backbone.stem.conv1.weight"], sd[prefix + "conv1.weight"])
    with pytest.raises(ConversionError, match="input_format"):
        convert_state_dict(converted["detr"][0], "detr", input_format="YUV")


def test_num_batches_tracked_dropped_with_a_note():
    sd = random_state_dict("detr")
    sd["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    new, report = convert_state_dict(sd, "detr")
    assert report.unused_source_keys == []
    assert not any("num_batches_tracked" in k for k in new)
    assert any("num_batches_tracked" in n for n in report.notes)


# ------------------------------------------------------------------ detection and errors
def test_autodetection(converted):
    for source in CASES:
        sd = converted[source][0]
        assert detect_source(sd) == source
        assert detect_source({"model": sd, "args": None}) == source
        new, _ = convert_state_dict(sd, "auto")
        assert set(new) == set(converted[source][1])
    assert detect_source(converted["detr"][1]) == "project"  # already converted
    with pytest.raises(ConversionError, match="cannot detect"):
        detect_source({"foo.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="unknown source 'yolo'"):
        convert_state_dict(converted["detr"][0], "yolo")
    with pytest.raises(ConversionError, match="cannot be loaded into"):
        convert_state_dict(converted["detr"][0], "detr", "anchor_detr")


def test_unknown_source_key_is_reported_by_name():
    sd = random_state_dict("conditional_detr")
    sd["transformer.decoder.layers.0.extra_proj.weight"] = torch.zeros(3, 3)
    sd["backbone.0.body.fc.weight"] = torch.zeros(1000, 2048)
    new, report = convert_state_dict(sd, "auto")
    assert report.unused_source_keys == [
        "transformer.decoder.layers.0.extra_proj.weight", "backbone.0.body.fc.weight"
    ]
    assert "extra_proj" not in " ".join(new)
    assert "transformer.decoder.layers.0.extra_proj.weight" in report.format()


def test_wrong_shape_names_the_key_and_both_shapes():
    sd = random_state_dict("detr")
    sd["query_embed.weight"] = torch.zeros(300, 256)
    new, _ = convert_state_dict(sd, "detr")
    target = project_model(CASES["detr"][1]).state_dict()
    with pytest.raises(ConversionError, match=r"query_embed\.weight: checkpoint \(300, 256\) vs model \(100, 256\)"):
        check_shapes(new, target)


# ------------------------------------------------------------------ checkpointer
def _spy_incompatible(monkeypatch):
    seen = {}
    original = EnactCheckpointer._load_model

    def spy(self, checkpoint):
        seen["checkpoint"] = checkpoint
        seen["incompatible"] = original(self, checkpoint)
        return seen["incompatible"]

    monkeypatch.setattr(EnactCheckpointer, "_load_model", spy)
    return seen


@pytest.mark.parametrize("source,which", [("detr", 1), ("anchor_detr", 2)])
def test_enact_checkpointer_loads_a_raw_source_checkpoint(source, which, converted, tmp_path, monkeypatch):
    sd, new, _ = converted[source]
    path = tmp_path / "source.pth"
    # as the original main.py saves it: model, optimizer, ..., and the argparse namespace
    torch.save({"model": sd, "epoch": 49, "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}, path)
    model = project_model(CASES[source][which])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    seen = _spy_incompatible(monkeypatch)
    EnactCheckpointer(model).load(str(path))
    enact = enact_parameter_names(model)
    assert sorted(seen["incompatible"].missing_keys) == sorted(enact)
    assert seen["incompatible"].unexpected_keys == []
    assert (which == 2) == bool(enact)
    state = model.state_dict()
    for key, value in new.items():
        assert torch.equal(state[key], value), key


def test_enact_checkpointer_keeps_unused_keys_for_detectron2_report(converted, tmp_path, monkeypatch):
    sd = dict(converted["detr"][0])
    sd["transformer.encoder.norm.weight"] = torch.ones(256)  # pre-norm DETR only
    path = tmp_path / "bare.pth"
    torch.save(sd, path)  # a bare state dict
    model = project_model(CASES["detr"][1])
    seen = _spy_incompatible(monkeypatch)
    EnactCheckpointer(model).load(str(path))
    assert seen["incompatible"].unexpected_keys == ["transformer.encoder.norm.weight"]
    assert seen["incompatible"].missing_keys == []


def test_enact_checkpointer_loads_project_checkpoints_unchanged(converted, tmp_path, monkeypatch):
    new = converted["conditional_detr"][1]
    path = tmp_path / "native.pth"
    torch.save({"model": new, "iteration": 3}, path)
    model = project_model(CASES["conditional_detr"][1])
    seen = _spy_incompatible(monkeypatch)
    EnactCheckpointer(model).load(str(path))
    assert "__author__" not in seen["checkpoint"]  # not converted
    assert seen["incompatible"].missing_keys == [] and seen["incompatible"].unexpected_keys == []
    assert torch.equal(model.class_embed.bias, new["class_embed.bias"])


# ------------------------------------------------------------------ command line
def load_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def cli(monkeypatch):
    module = load_cli()
    monkeypatch.setattr(module, "build_model", lambda path: project_model(os.path.basename(path)))
    return module


def test_cli_converts_to_a_detectron2_checkpoint(cli, converted, tmp_path, capsys):
    sd = converted["detr"][0]
    src, dst = tmp_path / "detr-r50.pth", tmp_path / "out" / "converted.pth"
    torch.save({"model": sd, "args": argparse.Namespace(dataset_file="coco")}, src)
    config = os.path.join(ROOT, "configs", "detr_r50_300ep_enact.py")
    assert cli.main(["--config-file", config, str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "source format: detr (detected)" in out
    assert "new ENACT parameter(s), initialised as the spec says" in out
    assert "transformer.encoder.layers.5.self_attn.clustering.w_prob.bias" in out
    assert "missing from the checkpoint" not in out
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert saved["__author__"] == "enact convert_checkpoint" and saved["matching_heuristics"] is False
    assert set(saved["model"]) == set(converted["detr"][1])
    assert torch.equal(saved["model"]["class_embed.weight"], converted["detr"][1]["class_embed.weight"])
    # and it loads through the (converting) checkpointer as a project checkpoint
    model = project_model("detr_r50_300ep.py")
    EnactCheckpointer(model).load(str(dst))
    assert torch.equal(model.class_embed.weight, converted["detr"][1]["class_embed.weight"])


def test_cli_fails_on_unused_keys_unless_allowed(cli, tmp_path, capsys):
    sd = random_state_dict("anchor_detr")
    sd["transformer.level_embed.weight"] = torch.zeros(3, 256)
    src, dst = tmp_path / "anchor.pth", tmp_path / "anchor_out.pth"
    torch.save({"model": sd}, src)
    config = os.path.join(ROOT, "configs", "anchor_detr_r50_dc5_50ep.py")
    assert cli.main(["--config-file", config, str(src), str(dst)]) == 1
    captured = capsys.readouterr()
    assert "transformer.level_embed.weight" in captured.out and "--allow-unused" in captured.err
    assert not dst.exists()
    assert cli.main(["--config-file", config, "--allow-unused", str(src), str(dst)]) == 0
    assert dst.exists()


def test_cli_errors_name_the_argument(cli, converted, tmp_path, capsys):
    config = os.path.join(ROOT, "configs", "detr_r50_300ep.py")
    assert cli.main(["--config-file", config, str(tmp_path / "nope.pth"), str(tmp_path / "o.pth")]) == 1
    assert "INPUT: no such file" in capsys.readouterr().err
    src = tmp_path / "detr.pth"
    torch.save(converted["detr"][0], src)
    assert cli.main(["--config-file", config, "--source", "yolo", str(src), str(tmp_path / "o.pth")]) == 1
    assert "--source: unknown source 'yolo'" in capsys.readouterr().err
    bad = dict(converted["detr"][0])
    bad["input_proj.weight"] = torch.zeros(256, 1024, 1, 1)
    torch.save(bad, src)
    assert cli.main(["--config-file", config, str(src), str(tmp_path / "o.pth")]) == 1
    assert "input_proj.weight: checkpoint (256, 1024, 1, 1) vs model (256, 2048, 1, 1)" in capsys.readouterr().err
