"""ENACT inside real detrex models (marked ``detrex``: ``make test-detrex DETREX_SRC=...``).

For each of detrex's DETR, Conditional DETR, DAB-DETR, DN-DETR, Group DETR, Anchor DETR (RCDA
and MHSA encoders) and PnP-DETR, built tiny from detrex's own config: ``enact_encoder`` replaces
exactly the encoder's self-attentions, the original state dict loads with only ENACT's ``w_prob``
missing, ``mode="identity"`` reproduces detrex's outputs, and a training step with real ENACT gives
every parameter a gradient.  PnP-DETR's sampled tokens reach ENACT in raster order.  Then the bad
inputs and their exact messages.
"""
import copy

import pytest
import torch
from torch import nn

from detrex_helpers import DETREX_MODELS, padded_images, perturb_heads, prediction_diff, shrink_detrex_model

pytestmark = [pytest.mark.detrex, pytest.mark.usefixtures("single_thread")]

MODELS = list(DETREX_MODELS)
# identity ENACT vs detrex: the largest difference of the predictions (scores, boxes / image size) as
# measured on the tiny models here (float32 rounding, 1-2 ulp); the tests allow IDENTITY_FACTOR times it
IDENTITY_DIFF = {"detr": 1.43e-7, "conditional_detr": 1.43e-7, "dab_detr": 1.59e-7, "dn_detr": 2.38e-7,
                 "group_detr": 1.91e-7, "anchor_detr_rcda": 1.64e-7, "anchor_detr_mhsa": 1.43e-7, "pnp_detr": 1.49e-7,
                 "dab_detr_3patterns": 1.91e-7, "dab_detr_dc5": 2.38e-7}
IDENTITY_FACTOR = 4


def build(name, **overrides):
    from detectron2.config import instantiate
    from projects.enact.detrex_support import detrex_config

    path, attention_type = DETREX_MODELS[name]
    cfg = shrink_detrex_model(detrex_config(path).model)
    if attention_type:
        cfg.transformer.attention_type = attention_type
    for key, value in overrides.items():
        cfg[key] = value
    torch.manual_seed(0)
    return instantiate(cfg)


def encoder_self_attentions(model):
    """Names of the encoder's self-attention modules, read from detrex's own structure."""
    tr = model.transformer
    if hasattr(tr, "encoder"):
        return [f"transformer.encoder.layers.{i}.attentions.{j}"
                for i, layer in enumerate(tr.encoder.layers)
                for j, op in enumerate(o for o in layer.operation_order if o.endswith("attn")) if op == "self_attn"]
    return [f"transformer.encoder_layers.{i}.self_attn" for i in range(len(tr.encoder_layers))]


def with_targets(images, num_classes=80):
    from detectron2.structures import Boxes, Instances

    out = []
    for i, img in enumerate(images):
        h, w = img["image"].shape[1:]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 4, w - 3.0, h - 5.0]]))
        inst.gt_classes = torch.tensor([i + 1, (3 * i + 7) % num_classes])
        out.append(dict(img, instances=inst))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_identity_enact_equals_detrex(name, capsys):
    from projects.enact import enact_encoder

    model = build(name).eval()
    perturb_heads(model)
    original = copy.deepcopy(model)
    expected_names = encoder_self_attentions(model)
    decoder_types = {n: type(m) for n, m in model.named_modules() if "decoder" in n}

    assert enact_encoder(model, sigma=2, mode="identity") is model
    replaced = [n for n, m in model.named_modules() if getattr(m, "_replaced_encoder_attention", False)]
    assert replaced == expected_names and len(replaced) == 2  # the 2 encoder layers of the tiny model
    assert {n: type(m) for n, m in model.named_modules() if "decoder" in n} == decoder_types

    # the original's weights load with only ENACT's w_prob missing, nothing unexpected
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".w_prob." in k for k in result.missing_keys)
    assert len(result.missing_keys) == 2 * len(replaced) * (2 if name == "anchor_detr_rcda" else 1)
    assert set(model.state_dict()) - set(original.state_dict()) == set(result.missing_keys)

    images = padded_images()
    diff = prediction_diff(original, model, images)
    with capsys.disabled():
        print(f"\n{name}: identity ENACT vs detrex, max abs diff (scores, boxes / image size) {diff:.2e}")
    assert diff <= IDENTITY_FACTOR * IDENTITY_DIFF[name], (diff, IDENTITY_DIFF[name])


# detrex models beyond the ones with a config here, through enact_encoder (docs/detrex.md lists more,
# SQR-DETR among them: its config alone takes 12 s to load here)
MORE_MODELS = {
    "dab_detr_3patterns": ("projects/dab_detr/configs/dab_detr_r50_3patterns_50ep.py", True),
    "dab_detr_dc5": ("projects/dab_detr/configs/dab_detr_r50_dc5_50ep.py", False),  # dilated R50 kept
}


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_identity_enact_equals_detrex_in_more_models(name, capsys):
    from detectron2.config import instantiate
    from projects.enact import enact_encoder
    from projects.enact.detrex_support import detrex_config

    path, small_backbone = MORE_MODELS[name]
    torch.manual_seed(0)
    model = instantiate(shrink_detrex_model(detrex_config(path).model, backbone=small_backbone)).eval()
    perturb_heads(model)
    original = copy.deepcopy(model)
    enact_encoder(model, sigma=2, mode="identity")
    assert [n for n, m in model.named_modules() if getattr(m, "_replaced_encoder_attention", False)] == \
        encoder_self_attentions(model)
    diff = prediction_diff(original, model, padded_images())
    with capsys.disabled():
        print(f"\n{name}: identity ENACT vs detrex, max abs diff (scores, boxes / image size) {diff:.2e}")
    assert diff <= IDENTITY_FACTOR * IDENTITY_DIFF[name], (diff, IDENTITY_DIFF[name])


def training_step(model, name):
    model.train()
    torch.manual_seed(1)
    losses = model(with_targets(padded_images()))
    weights = model.criterion.weight_dict
    sum(v * weights[k] for k, v in losses.items() if k in weights).backward()
    # (the MHSA adapter's parameters are named inner.attn.* inside, in_proj_* in its state dict)
    return {n.replace("inner.attn.", "").replace("inner.", ""): (None if p.grad is None else bool(p.grad.abs().sum() > 0))
            for n, p in model.named_parameters() if p.requires_grad}


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


@pytest.mark.parametrize("name", MODELS)
def test_identity_enact_equals_detrex_on_padded_training_batch(name, monkeypatch):
    """In training mode detrex passes the padding mask to the encoder (at inference it treats the
    batch as unpadded): the losses of a padded batch of two sizes agree too (dropout off)."""
    from projects.enact import enact_encoder

    if name == "dn_detr" and not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # see the gradient test
    model = no_dropout(build(name)).train()
    perturb_heads(model)
    original = copy.deepcopy(model)
    enact_encoder(model, sigma=2, mode="identity")
    batch = with_targets(padded_images())
    losses = []
    for m in (original, model):
        torch.manual_seed(3)  # DN-DETR's noised queries
        with torch.no_grad():
            losses.append(m(batch))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gives_every_parameter_a_gradient(name, monkeypatch):
    """Real ENACT (segments): every parameter that detrex's own model trains gets a non-zero
    gradient in the ENACT model too, and every w_prob gets one (its bias: exactly zero in value,
    since softmax ignores a shift of all logits, but present).  The baseline is detrex's model
    itself on the same step: a few of its parameters get a zero or no gradient by construction
    (e.g. the first decoder self-attention over all-zero queries, Anchor DETR's adapt_pos1d in
    its MHSA variant), and so they do with ENACT."""
    from projects.enact import enact_encoder

    if name == "dn_detr" and not torch.cuda.is_available():
        # DN-DETR's criterion calls .cuda() (detrex's dn_criterion.py); on a CPU-only machine this
        # test makes .cuda() a no-op for the step: everything else runs as on a GPU.
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    model = build(name)
    perturb_heads(model)
    baseline = training_step(copy.deepcopy(model), name)
    enact_encoder(model, sigma=1, mode="segments")
    grads = training_step(model, name)
    w_prob = {n: g for n, g in grads.items() if ".w_prob." in n}
    assert len(w_prob) == (8 if name == "anchor_detr_rcda" else 4)
    assert all(g is not None for g in w_prob.values())
    assert all(g for n, g in w_prob.items() if n.endswith("weight"))
    assert {n: g for n, g in grads.items() if n not in w_prob} == baseline
    assert sum(g is True for g in baseline.values()) > 0.9 * len(baseline)
    stats = [m.statistics() for m in model.modules() if hasattr(m, "statistics")
             and (hasattr(m, "clustering") or hasattr(m, "cluster_x"))]
    assert len(stats) == 2 and all(s["clusters_per_image"] >= 1 for s in stats)


def test_the_mechanism_takes_another_attention_act():
    """replace_encoder_attention with a factory of ACT (EnactAttention's signature): the same
    sites, the trained projections carried over, per-layer seeds from spec.layer_index."""
    from projects.enact import ActAttention, replace_encoder_attention
    from projects.enact.modeling.encoder_adapter import find_encoder

    def act(spec):
        module = ActAttention(spec.embed_dim, spec.num_heads, spec.attn_drop, spec.proj_drop, spec.batch_first)
        module.set_layer_index(spec.layer_index)
        return module

    for name in ("detr", "anchor_detr_mhsa"):
        model = build(name).eval()
        original = copy.deepcopy(model)
        names = replace_encoder_attention(find_encoder(model), act)
        assert len(names) == 2
        acts = [m for m in model.modules() if isinstance(m, ActAttention)]
        assert len(acts) == 2 and not torch.equal(acts[0].hash_a, acts[1].hash_a)
        result = model.load_state_dict(original.state_dict(), strict=False)
        assert result.unexpected_keys == [] and all("hash_" in k for k in result.missing_keys)
        with torch.no_grad():
            out = model(padded_images())
        assert len(out) == 2 and torch.isfinite(out[0]["instances"].scores).all()


def test_converting_twice_is_an_error():
    from projects.enact import enact_encoder

    model = enact_encoder(build("dab_detr"))
    with pytest.raises(ValueError, match="already converted.*EnactAttention"):
        enact_encoder(model)


def holder_of(encoder_cfg, cls_name="Holder"):
    """A model with ``transformer.encoder`` built from ``encoder_cfg`` (nothing else built)."""
    from detectron2.config import instantiate

    encoder = instantiate(encoder_cfg)

    def __init__(self):
        nn.Module.__init__(self)
        self.transformer = nn.Module()
        self.transformer.encoder = encoder

    return type(cls_name, (nn.Module,), {"__init__": __init__})()


def one_layer_encoder_of(config_path, cls_name):
    """A model named cls_name holding the encoder of a detrex config, shrunk to one small layer."""
    from projects.enact.detrex_support import detrex_config

    cfg = detrex_config(config_path).model
    cfg.transformer.encoder.num_layers, cfg.transformer.encoder.feedforward_dim = 1, 32
    return holder_of(cfg.transformer.encoder, cls_name)


def test_deformable_encoders_are_refused_naming_only_their_attention():
    from projects.enact import act_encoder, enact_encoder

    deformable = one_layer_encoder_of("projects/deformable_detr/configs/deformable_detr_r50_50ep.py", "DeformableDETR")
    with pytest.raises(ValueError) as e:
        enact_encoder(deformable)
    assert str(e.value) == (
        "enact_encoder(DeformableDETR): its encoder self-attention is MultiScaleDeformableAttention, not a dense "
        "self-attention (ENACT replaces an encoder self-attention that is detrex's MultiheadAttention, torch's "
        "nn.MultiheadAttention or detrex's MultiheadRCDA)")
    # Focus-DETR: no 'self_attn' at all; its MultiheadAttention (over the tokens it selects) is not named
    focus = one_layer_encoder_of("projects/focus_detr/configs/focus_detr_resnet/focus_detr_r50_4scale_12ep.py",
                                 "FOCUS_DETR")
    with pytest.raises(ValueError) as e:
        act_encoder(focus)
    assert str(e.value) == (
        "act_encoder(FOCUS_DETR): its encoder has MultiScaleDeformableAttention, not a dense self-attention (ACT "
        "replaces an encoder self-attention that is detrex's MultiheadAttention or torch's nn.MultiheadAttention)")
    with pytest.raises(ValueError) as e:
        enact_encoder(nn.Linear(2, 2))
    assert str(e.value) == "enact_encoder: Linear: no transformer.encoder (or transformer.encoder_layers) found"


def test_bad_options_name_the_entry_point_the_argument_and_what_is_accepted():
    from projects.enact import act_encoder, enact_encoder
    from projects.enact.detrex_support import EnactDabDetrTransformerEncoder

    model = build("dab_detr")
    cases = [
        (enact_encoder, dict(bogus=1), TypeError,
         "enact_encoder: unknown option 'bogus'; accepted: backend, attn_implementation"),
        (enact_encoder, dict(bogus=1, num_hashes=4), TypeError,
         "enact_encoder: unknown options 'bogus', 'num_hashes'; accepted: backend, attn_implementation"),
        (enact_encoder, dict(mode="segment"), ValueError,
         "enact_encoder: mode must be one of ('segments', 'uniform', 'identity'), got 'segment'"),
        (enact_encoder, dict(sigma=0), ValueError, "enact_encoder: sigma must be a positive int, got 0"),
        (enact_encoder, dict(backend="cuda"), ValueError,
         "enact_encoder: backend must be one of ('auto', 'compiled', 'reference'), got 'cuda'"),
        (enact_encoder, dict(attn_implementation="flash"), ValueError,
         "enact_encoder: attn_implementation must be one of ('sdpa', 'eager'), got 'flash'"),
        (act_encoder, dict(sigma=5), TypeError, "act_encoder: unknown option 'sigma'; accepted: attn_implementation"),
        (act_encoder, dict(num_hashes=0), ValueError, "act_encoder: num_hashes must be an int >= 1, got 0"),
    ]
    for entry, kwargs, error, message in cases:
        with pytest.raises(error) as e:
            entry(model, **kwargs)
        assert str(e.value) == message
    assert not any(getattr(m, "_replaced_encoder_attention", False) for m in model.modules())  # nothing replaced
    with pytest.raises(ValueError) as e:
        EnactDabDetrTransformerEncoder(num_layers=1, sigma=2.5)
    assert str(e.value) == "EnactDabDetrTransformerEncoder: sigma must be a positive int, got 2.5"


def test_pnp_detr_encoder_sees_its_sampled_tokens_in_raster_order():
    """PnP-DETR's sampler orders the sampled tokens by score: with ENACT its output reaches the
    encoder in raster order (same tokens, same positions, pads after them), and the 30 pooled
    background tokens are not clustered (ENACT's clustering sees the sampled tokens only)."""
    from projects.enact import EnactAttention, enact_encoder

    model = build("pnp_detr").eval()
    original = copy.deepcopy(model)
    enact_encoder(model, sigma=1)
    # the sampler's input: a (B, C, 6, 7) feature map, image 1 padded to 4 x 5 (True = pad)
    g = torch.Generator().manual_seed(0)
    c = model.transformer.embed_dim
    x, pos = torch.randn(2, c, 6, 7, generator=g), torch.randn(42, 2, c, generator=g)
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[1, 4:], mask[1, :, 5:] = True, True
    with torch.no_grad():
        src0, loss0, top0, mask0, pos0 = original.transformer.sampler(x, mask.flatten(1), pos, 0.5)
        src1, loss1, top1, mask1, pos1 = model.transformer.sampler(x, mask.flatten(1), pos, 0.5)
    s, tail = top0.shape[1], model.transformer.sampler.unsample_abstract_number
    assert torch.equal(loss0, loss1) and torch.equal(mask0, mask1) and src1.shape[0] == s + tail
    lengths = (~mask0[:, :s]).sum(1)
    assert lengths.tolist() == [21, 10]  # half of 42 and of 20 valid tokens: a padded batch
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(top1[b, :n], top0[b, :n].sort().values)  # raster order
        order = top0[b, :n].argsort()
        assert torch.equal(src1[:n, b], src0[:n, b][order]) and torch.equal(pos1[:n, b], pos0[:n, b][order])
    assert torch.equal(src1[s:], src0[s:]) and torch.equal(pos1[s:], pos0[s:])  # pooled tokens, unchanged
    attentions = [m for m in model.modules() if isinstance(m, EnactAttention)]
    assert len(attentions) == 2 and all(a.unclustered_tail == tail for a in attentions)
    with torch.no_grad():
        model(padded_images())
    tokens = [a.clustering.last_num_tokens for a in attentions]  # the sampled tokens only, not the pooled
    assert all(t.tolist() == [8, 8] for t in tokens)  # half of the 4 x 4 padded grid (detrex: no mask at inference)
    assert all((a.clustering.last_num_clusters < t).all() for a, t in zip(attentions, tokens))  # clusters formed


def test_bad_detrex_root(monkeypatch, tmp_path):
    from projects.enact.detrex_support import detrex_root

    monkeypatch.setenv("DETREX_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="is not a detrex checkout.*make test-detrex DETREX_SRC"):
        detrex_root()


def test_identity_mode_is_documented_and_checked():
    from projects.enact import EnactClustering

    assert "identity" in EnactClustering.__doc__
    with pytest.raises(ValueError, match="mode must be one of"):
        EnactClustering(8, mode="identical")
