"""Tests of the detrex checkpoint converter (projects/enact/checkpoint/detrex.py).

The state-dict layouts of detrex's DETR-R50, Conditional-DETR-R50 and Anchor-DETR-R50-DC5 (key
names, shapes, tied storages) were recorded from the models built with detrex's own code
(the detrex repository, commit in each file) and are stored as data in
tests/data/checkpoint_layouts/detrex_*.json; detrex itself is not needed here.  Random tensors of
those shapes are converted and loaded into the project's R50 models (built once per module).
"""
import json
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from projects.enact.checkpoint.common import enact_parameter_names
from projects.enact.checkpoint.detrex import convert_detrex, detect_detrex

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "data" / "checkpoint_layouts"

# kind -> (layout file, project config, its ENACT twin, source keys that map nowhere).  The
# layouts are complete state dicts of detrex's models: DETR's holds its criterion's empty_weight
# buffer (cross-entropy; the focal-loss models have none), which is dropped, not "unused".
CASES = {
    "detr": ("detrex_detr_r50.json", "detr_r50_300ep", "detr_r50_300ep_enact", []),
    "conditional_detr": ("detrex_conditional_detr_r50.json", "conditional_detr_r50_50ep",
                         "conditional_detr_r50_50ep_enact", []),
    "anchor_detr": ("detrex_anchor_detr_r50_dc5.json", "anchor_detr_r50_dc5_50ep",
                    "anchor_detr_r50_dc5_50ep_enact", []),
}
KINDS = list(CASES)


def load_layout(kind):
    with open(LAYOUTS / CASES[kind][0]) as f:
        return json.load(f)


def random_state_dict(kind, seed=0):
    """Random tensors with the recorded keys, shapes and dtypes; tied entries share storage."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for entry in load_layout(kind)["keys"]:
        key, shape, dtype = entry[0], entry[1], getattr(torch, entry[2])
        if len(entry) > 3:
            sd[key] = sd[entry[3]]
        elif dtype.is_floating_point:
            sd[key] = torch.randn(shape, generator=gen).to(dtype)
        else:
            sd[key] = torch.randint(0, 10, shape, generator=gen).to(dtype)
    return sd


def build(config):
    cfg = LazyConfig.load(str(ROOT / "configs" / f"{config}.py"))
    cfg.model.device = "cpu"
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def models():
    """Lazily built project models, one per config for the whole module."""
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = build(config).eval()
        return cache[config]

    return get


@pytest.fixture(scope="module")
def sources():
    return {kind: random_state_dict(kind) for kind in KINDS}


# ------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", KINDS)
def test_layout_loads_into_project_model(kind, models, sources):
    _, config, _, unused = CASES[kind]
    model = models(config)
    new_sd, report = convert_detrex(sources[kind], kind, target=model)
    result = model.load_state_dict(new_sd, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert report.unused_source_keys == unused
    # a bijection up to the unused keys and the tied head copies of Anchor DETR
    assert len(new_sd) == len(model.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_layout_loads_into_enact_twin(kind, models, sources):
    _, _, config, unused = CASES[kind]
    model = models(config)
    new_sd, report = convert_detrex(sources[kind], kind, target=model)
    result = model.load_state_dict(new_sd, strict=False)
    enact = enact_parameter_names(model)
    assert enact, "the ENACT twin has ENACT parameters"
    assert sorted(result.missing_keys) == sorted(enact)
    assert all(".w_prob." in k for k in result.missing_keys)
    assert result.unexpected_keys == []
    assert report.unused_source_keys == unused


# ------------------------------------------------------------------------------------ placement
def _convert(kind, sd, **kwargs):
    new_sd, report = convert_detrex(sd, kind, **kwargs)
    return new_sd, report


def test_detr_marked_tensors(sources):
    src = sources["detr"]
    out, _ = _convert("detr", src)
    pairs = {
        "transformer.encoder.layers.3.ffns.0.layers.0.0.weight": "transformer.encoder.layers.3.linear1.weight",
        "transformer.encoder.layers.5.ffns.0.layers.1.bias": "transformer.encoder.layers.5.linear2.bias",
        "transformer.encoder.layers.1.attentions.0.attn.in_proj_weight":
            "transformer.encoder.layers.1.self_attn.attn.in_proj_weight",
        "transformer.encoder.layers.2.norms.1.weight": "transformer.encoder.layers.2.norm2.weight",
        "transformer.decoder.layers.2.attentions.1.attn.in_proj_weight":
            "transformer.decoder.layers.2.cross_attn.attn.in_proj_weight",
        "transformer.decoder.layers.4.attentions.0.attn.out_proj.weight":
            "transformer.decoder.layers.4.self_attn.attn.out_proj.weight",
        "transformer.decoder.layers.0.norms.0.bias": "transformer.decoder.layers.0.norm1.bias",
        "transformer.decoder.layers.0.norms.1.bias": "transformer.decoder.layers.0.norm2.bias",
        "transformer.decoder.layers.0.norms.2.bias": "transformer.decoder.layers.0.norm3.bias",
        "transformer.decoder.post_norm_layer.weight": "transformer.decoder.norm.weight",
        "backbone.res4.5.conv2.norm.running_var": "backbone.res4.5.conv2.norm.running_var",
        "class_embed.weight": "class_embed.weight",  # same 81 rows, no-object last
        "query_embed.weight": "query_embed.weight",
    }
    for s, t in pairs.items():
        assert torch.equal(out[t], src[s]), (s, t)


def test_stem_convolution_follows_the_input_format(sources):
    src = sources["detr"]["backbone.stem.conv1.weight"]
    bgr, report = _convert("detr", sources["detr"])
    assert torch.equal(bgr["backbone.stem.conv1.weight"], src.flip(1))  # RGB -> BGR input
    assert any("input channels reversed" in n for n in report.notes)
    rgb, _ = _convert("detr", sources["detr"], input_format="RGB")
    assert torch.equal(rgb["backbone.stem.conv1.weight"], src)
    with pytest.raises(ValueError, match="input_format"):
        _convert("detr", sources["detr"], input_format="YUV")


def test_conditional_detr_marked_tensors(sources):
    src = sources["conditional_detr"]
    out, _ = _convert("conditional_detr", src)
    dec = "transformer.decoder.layers"
    pairs = {
        f"{dec}.0.attentions.1.query_pos_proj.weight": f"{dec}.0.cross_attn.query_pos_proj.weight",
        f"{dec}.3.attentions.1.query_pos_sine_proj.bias": f"{dec}.3.cross_attn.query_pos_sine_proj.bias",
        f"{dec}.4.attentions.0.key_pos_proj.weight": f"{dec}.4.self_attn.key_pos_proj.weight",
        f"{dec}.5.attentions.0.value_proj.bias": f"{dec}.5.self_attn.value_proj.bias",
        f"{dec}.1.attentions.1.out_proj.weight": f"{dec}.1.cross_attn.out_proj.weight",
        f"{dec}.2.ffns.0.layers.1.weight": f"{dec}.2.linear2.weight",
        f"{dec}.2.norms.2.weight": f"{dec}.2.norm3.weight",
        "transformer.decoder.query_scale.layers.1.weight": "transformer.decoder.query_scale.layers.1.weight",
        "transformer.decoder.ref_point_head.layers.0.bias": "transformer.decoder.ref_point_head.layers.0.bias",
        "transformer.encoder.layers.0.attentions.0.attn.in_proj_bias":
            "transformer.encoder.layers.0.self_attn.attn.in_proj_bias",
        "class_embed.bias": "class_embed.bias",
    }
    for s, t in pairs.items():
        assert torch.equal(out[t], src[s]), (s, t)
    # the cross-attention of the later layers has no query_pos_proj (detrex sets it to None)
    assert f"{dec}.1.cross_attn.query_pos_proj.weight" not in out


def test_anchor_detr_marked_tensors(sources):
    src = sources["anchor_detr"]
    out, report = _convert("anchor_detr", src)
    packed = src["transformer.encoder_layers.2.self_attn.in_proj_weight"]  # (5C, C)
    c = packed.shape[1]
    enc = "transformer.encoder.layers.2.self_attn"
    for i, part in enumerate(("q_x_proj", "q_y_proj", "k_x_proj", "k_y_proj", "v_proj")):
        assert torch.equal(out[f"{enc}.{part}.weight"], packed[i * c:(i + 1) * c]), part
    bias = src["transformer.decoder_layers.4.cross_attn.in_proj_bias"]
    assert torch.equal(out["transformer.decoder_layers.4.cross_attn.k_y_proj.bias"], bias[3 * c:4 * c])
    pairs = {
        "transformer.decoder_layers.1.norm2.weight": "transformer.decoder_layers.1.norm1.weight",
        "transformer.decoder_layers.1.norm1.weight": "transformer.decoder_layers.1.norm2.weight",
        "transformer.decoder_layers.1.ffn.norm2.bias": "transformer.decoder_layers.1.norm3.bias",
        "transformer.decoder_layers.3.self_attn.in_proj_weight":
            "transformer.decoder_layers.3.self_attn.attn.in_proj_weight",
        "transformer.encoder_layers.5.ffn.linear1.weight": "transformer.encoder.layers.5.linear1.weight",
        "transformer.encoder_layers.5.ffn.norm2.weight": "transformer.encoder.layers.5.norm2.weight",
        "transformer.position.weight": "transformer.anchors.weight",
        "transformer.adapt_pos1d.2.weight": "transformer.adapt_pos1d.2.weight",
        "transformer.class_embed.0.weight": "class_embed.weight",
        "transformer.bbox_embed.0.layers.2.bias": "bbox_embed.layers.2.bias",
        "input_proj.1.weight": "input_proj.1.weight",
        "backbone.body.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.body.bn1.running_mean": "backbone.stem.conv1.norm.running_mean",
        "backbone.body.layer4.0.downsample.1.running_var": "backbone.res5.0.shortcut.norm.running_var",
        "backbone.body.layer2.3.bn3.bias": "backbone.res3.3.conv3.norm.bias",
    }
    for s, t in pairs.items():
        expected = src[s].flip(1) if t == "backbone.stem.conv1.weight" else src[s]
        assert torch.equal(out[t], expected), (s, t)
    assert any("shared head" in n for n in report.notes)


def test_anchor_detr_untied_head_copy_is_reported(sources):
    src = dict(sources["anchor_detr"])
    src["transformer.class_embed.3.weight"] = src["transformer.class_embed.0.weight"] + 1
    out, report = _convert("anchor_detr", src)
    assert report.unused_source_keys == ["transformer.class_embed.3.weight"]
    assert torch.equal(out["class_embed.weight"], src["transformer.class_embed.0.weight"])


def test_coco_id_head_is_reordered(sources):
    src = dict(sources["detr"])
    src["class_embed.weight"] = torch.arange(92.0)[:, None].expand(92, 256).clone()
    src["class_embed.bias"] = torch.arange(92.0)
    out, report = _convert("detr", src)
    rows = out["class_embed.bias"].long().tolist()
    assert len(rows) == 81 and rows[0] == 1 and rows[-1] == 91  # person = id 1, no-object last
    assert rows[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]  # id 12 is unused in COCO
    assert torch.equal(out["class_embed.weight"][:, 0], out["class_embed.bias"])


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("kind", KINDS)
def test_detect_detrex(kind, sources):
    assert detect_detrex(sources[kind]) == kind
    assert detect_detrex({"model": sources[kind], "iteration": 10}) == kind


@pytest.mark.parametrize("kind", KINDS)
def test_auto_source_detection_picks_detrex(kind, sources):
    # detrex's Anchor DETR shares the original repo's `transformer.encoder_layers.` names
    from projects.enact.checkpoint import convert_state_dict, detect_source

    assert detect_source(sources[kind]) == "detrex"
    _, report = convert_state_dict(sources[kind], "auto", kind)
    assert report.unused_source_keys == CASES[kind][3]
    dropped = [n for n in report.notes if "non-model" in n]
    assert dropped == (["dropped 1 non-model key(s) (detrex's criterion state, not weights): criterion.empty_weight"]
                       if kind == "detr" else [])


def test_detect_detrex_rejects_other_layouts(models):
    assert detect_detrex({}) is None
    assert detect_detrex({"fc.weight": torch.zeros(2, 2)}) is None
    assert detect_detrex(models("detr_r50_300ep").state_dict()) is None
    assert detect_detrex(models("anchor_detr_r50_dc5_50ep").state_dict()) is None
    w = torch.zeros(1)
    original_detr = {
        "backbone.0.body.conv1.weight": w,
        "transformer.encoder.layers.0.self_attn.in_proj_weight": w,
        "transformer.decoder.layers.0.multihead_attn.in_proj_weight": w,
    }
    assert detect_detrex(original_detr) is None
    original_anchor_detr = {
        "backbone.body.conv1.weight": w,
        "transformer.encoder_layers.0.self_attn.in_proj_weight": w,
        "input_proj.0.0.weight": torch.zeros(256, 2048, 1, 1),
        "input_proj.0.1.weight": torch.zeros(256),
    }
    assert detect_detrex(original_anchor_detr) is None


# ------------------------------------------------------------------------------------ errors
def test_unknown_key_is_listed_as_unused(sources):
    src = dict(sources["conditional_detr"])
    src["transformer.decoder.layers.0.attentions.1.some_new_proj.weight"] = torch.zeros(3)
    src["extra_head.weight"] = torch.zeros(3)
    out, report = _convert("conditional_detr", src)
    assert report.unused_source_keys == [
        "transformer.decoder.layers.0.attentions.1.some_new_proj.weight",
        "extra_head.weight",
    ]
    assert not any("some_new_proj" in k or "extra_head" in k for k in out)


def test_wrong_shape_names_the_key(models, sources):
    src = dict(sources["conditional_detr"])
    src["transformer.decoder.layers.2.ffns.0.layers.0.0.weight"] = torch.zeros(1024, 256)
    with pytest.raises(ValueError) as err:
        convert_detrex(src, "conditional_detr", target=models("conditional_detr_r50_50ep"))
    msg = str(err.value)
    assert "transformer.decoder.layers.2.linear1.weight" in msg
    assert "transformer.decoder.layers.2.ffns.0.layers.0.0.weight" in msg
    assert "(1024, 256)" in msg and "(2048, 256)" in msg


def test_bad_packed_projection_raises(sources):
    src = dict(sources["anchor_detr"])
    src["transformer.encoder_layers.0.self_attn.in_proj_bias"] = torch.zeros(1279)
    with pytest.raises(ValueError, match=r"transformer\.encoder_layers\.0\.self_attn\.in_proj_bias"):
        convert_detrex(src, "anchor_detr")


def test_wrong_model_kind_raises(sources):
    with pytest.raises(ValueError, match="conditional_detr"):
        convert_detrex(sources["conditional_detr"], "detr")
    with pytest.raises(ValueError, match="unknown detrex model"):
        convert_detrex(sources["detr"], "dino")


def test_cli_converts_a_complete_detrex_checkpoint_without_allow_unused(models, sources, tmp_path, monkeypatch, capsys):
    """A real detrex checkpoint layout (criterion.empty_weight included) goes through
    tools/convert_checkpoint.py without --allow-unused; the report says what was dropped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(cli, "build_model", lambda path: models(Path(path).stem))
    assert "criterion.empty_weight" in sources["detr"]
    src, dst = tmp_path / "detrex_detr.pth", tmp_path / "converted.pth"
    torch.save({"model": sources["detr"], "iteration": 500000}, src)
    config = str(ROOT / "configs" / "detr_r50_300ep_enact.py")
    assert cli.main(["--config-file", config, "--source", "detrex", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 non-model key(s) (detrex's criterion state, not weights): criterion.empty_weight" in out
    assert "not used" not in out
    saved = torch.load(dst, map_location="cpu", weights_only=True)["model"]
    assert "criterion.empty_weight" not in saved and "class_embed.weight" in saved
