"""Every LazyConfig loads and instantiates its model; each +ENACT config differs from its
baseline only in the encoder attention, so a baseline checkpoint loads into it."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if "common" not in p.split(os.sep) and "detrex" not in p.split(os.sep)  # configs/detrex: test_detrex_configs.py
)
ENACT_PAIRS = [(c.replace("_enact.py", ".py"), c) for c in CONFIGS if c.endswith("_enact.py")]
ACT_PAIRS = [(c.replace("_act.py", ".py"), c) for c in CONFIGS if c.endswith("_act.py")]


def load(path):
    cfg = LazyConfig.load(os.path.join(ROOT, path))
    cfg.train.device = "cpu"
    return cfg


def test_configs_found():
    assert len(CONFIGS) >= 7 and ENACT_PAIRS, CONFIGS
    assert len(ACT_PAIRS) >= 4, ACT_PAIRS  # DETR, Conditional DETR, MHSA Anchor DETR, shapes DETR


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_builds_model(path):
    cfg = load(path)
    for key in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg, f"{path} has no {key}"
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if "shapes" not in path:  # COCO models: stem and res2 frozen, as the DETR family's code (layer2-4 train)
        trains = {n.split(".")[1] for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
        assert trains == {"res3", "res4", "res5"}, trains
    assert cfg.train.max_iter > 0 and cfg.train.output_dir
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.0) == 1.0
    # overrides from the command line reach the derived values
    cfg = LazyConfig.apply_overrides(cfg, ["train.max_iter=100"])
    assert instantiate(cfg.lr_multiplier)._num_updates == 100


@pytest.mark.parametrize("path", [c for c in CONFIGS if "shapes" not in c])
def test_shrink_model_makes_every_coco_model_tiny(path):
    """configs/common/shrink_model.py's defaults on every detector family and encoder."""
    shrink_model = LazyConfig.load(os.path.join(ROOT, "configs", "common", "shrink_model.py"), "shrink_model")
    cfg = load(path)
    full = OmegaConf.to_container(cfg.model.transformer.encoder)  # type and attention, before
    torch.manual_seed(0)
    model = instantiate(shrink_model(cfg.model, num_classes=3))
    encoder = model.transformer.encoder
    assert len(encoder.layers) == 2 and encoder.embed_dim == model.embed_dim == 32
    assert model.num_queries == 12 and model.class_embed.out_features in (3, 4)  # (+ "no object")
    assert model.backbone.output_shape()["res5"].stride == 32 and len(model.backbone.res5) == 2  # R18, no DC5
    assert type(encoder) is full["_target_"] and getattr(encoder, "sigma", None) == full.get("sigma")
    attention = full.get("attention")
    if attention is not None:  # same type, other arguments (ENACT's sigma) kept
        attn = encoder.layers[0].self_attn
        assert type(attn) is attention["_target_"] and attn.num_heads == 4
        assert getattr(attn, "clustering", None) is None or attn.clustering.sigma == attention["sigma"]
    assert sum(p.numel() for p in model.parameters()) < 12_000_000  # R18 (11.2 M) + a tiny transformer


@pytest.mark.parametrize("base,enact", ENACT_PAIRS)
def test_enact_twin_shares_every_parameter_but_w_prob(base, enact):
    torch.manual_seed(0)
    base_model = instantiate(load(base).model)
    enact_model = instantiate(load(enact).model)
    missing, unexpected = enact_model.load_state_dict(base_model.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("w_prob" in k for k in missing), missing
    base_shapes = {k: v.shape for k, v in base_model.state_dict().items()}
    for k, v in enact_model.state_dict().items():
        if "w_prob" not in k:
            assert base_shapes[k] == v.shape, k


@pytest.mark.parametrize("base,act", ACT_PAIRS)
def test_act_twin_loads_the_baseline_checkpoint_as_is(base, act):
    """ACT adds no parameters: only its hash projection buffers are missing from a baseline's
    state dict, and every encoder layer has its own."""
    torch.manual_seed(0)
    base_model = instantiate(load(base).model)
    act_model = instantiate(load(act).model)
    missing, unexpected = act_model.load_state_dict(base_model.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.rsplit(".", 1)[-1] in ("hash_a", "hash_b") for k in missing), missing
    assert sum(p.numel() for p in act_model.parameters()) == sum(p.numel() for p in base_model.parameters())
    layers = act_model.transformer.encoder.layers
    assert len(layers) > 1 and not torch.equal(layers[0].self_attn.hash_a, layers[1].self_attn.hash_a)
