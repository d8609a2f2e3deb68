"""ACT inside real detrex models (marked ``detrex``: ``make test-detrex DETREX_SRC=...``).

``act_encoder`` (the same mechanism as ``enact_encoder``) on detrex's DETR, Conditional DETR,
DAB-DETR, DN-DETR, Group DETR, Anchor DETR (MHSA encoder) and PnP-DETR, built tiny from detrex's
own configs: exactly the encoder's self-attentions become ACT, every trained weight carries over (ACT adds no
parameters; only the hash buffers are new, distinct in every layer), and with every query its own
cluster (a tiny bucket width) the outputs are detrex's, at inference and in the losses of a padded
training batch.  Then Anchor DETR's RCDA (ACT has no RCDA form), no double wrap between ACT and
ENACT, a training step, and configs/detrex/*_act.py.
"""
import copy
from pathlib import Path

import pytest
import torch

from detrex_helpers import (
    DETREX_MODELS, assert_detrex_except_results_folder, flat_config, padded_images, perturb_heads, prediction_diff,
    shrink_detrex_model,
)
from test_detrex import build, encoder_self_attentions, no_dropout, training_step, with_targets

pytestmark = [pytest.mark.detrex, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]
MODELS = [name for name in DETREX_MODELS if name != "anchor_detr_rcda"]
TINY_R = dict(num_hashes=8, bucket_width=1e-6)  # every query its own cluster


def act_modules(model):
    """name -> ActAttention of ``model`` (inside the MHSA adapter: the adapter's name)."""
    from projects.enact import ActAttention

    return {n[: -len(".inner")] if n.endswith(".inner") else n: m
            for n, m in model.named_modules() if isinstance(m, ActAttention)}


def cuda_free(name, monkeypatch):
    if name == "dn_detr" and not torch.cuda.is_available():
        # DN-DETR's criterion calls .cuda() (detrex's dn_criterion.py): a no-op for the test
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


@pytest.mark.parametrize("name", MODELS)
def test_act_encoder_replaces_exactly_the_encoder_and_equals_detrex(name, capsys):
    from projects.enact import act_encoder

    model = build(name).eval()
    perturb_heads(model)
    original = copy.deepcopy(model)
    decoder_types = {n: type(m) for n, m in model.named_modules() if "decoder" in n}

    assert act_encoder(model, **TINY_R) is model
    acts = act_modules(model)
    assert list(acts) == encoder_self_attentions(model) and len(acts) == 2
    assert {n: type(m) for n, m in model.named_modules() if "decoder" in n} == decoder_types
    # distinct, deterministic projections in every layer
    assert [a.layer_index for a in acts.values()] == [0, 1]
    first, second = acts.values()
    assert not torch.equal(first.hash_a, second.hash_a) and not torch.equal(first.hash_b, second.hash_b)

    # ACT adds no parameters: the original's state dict loads with nothing unexpected and only the
    # hash buffers missing; the trained weights are already there
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f"{n}.hash_{x}" for n in acts for x in "ab")
    assert set(model.state_dict()) - set(original.state_dict()) == set(result.missing_keys)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in original.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.state_dict().items())
    # the converted state dict loads exactly into a fresh conversion
    fresh = act_encoder(build(name), **TINY_R)
    fresh.load_state_dict(model.state_dict(), strict=True)

    images = padded_images()
    diff = prediction_diff(original, model, images)
    stats = first.statistics()
    assert stats["compression"] == 1.0  # every query its own cluster
    with capsys.disabled():
        print(f"\n{name}: ACT (r = 1e-6) vs detrex, max abs diff (scores, boxes / image size) {diff:.2e}")
    assert diff < 1e-4


def record_self_attentions(model, names):
    """Hooks recording, for each encoder self-attention named, its output (L, B, C) and the
    padding mask (B, L) it was given."""
    seen = {}
    modules = dict(model.named_modules())
    for name in names:
        def hook(mod, args, kwargs, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            out = out.transpose(0, 1) if getattr(mod, "batch_first", False) else out
            seen[name] = (out, kwargs["key_padding_mask"])
        modules[name].register_forward_hook(hook, with_kwargs=True)
    return seen


# decoders that mask the memory's padding: their losses cannot see the padded encoder outputs
# (ACT: the identity there, "pads receive no attention"; DAB-, DN-, Group and Conditional DETR's
# detrex decoders attend to the padded memory, so their losses differ there by design)
MASKED_MEMORY = {"detr", "anchor_detr_mhsa"}


# (PnP-DETR samples equally many tokens of these two images: nothing in its encoder is padded)
@pytest.mark.parametrize("name", [n for n in MODELS if n != "pnp_detr"])
def test_act_encoder_equals_detrex_on_a_padded_training_batch(name, monkeypatch):
    """In training mode detrex passes the padding mask to the encoder: pads are left out of the
    clusters (each valid token its own cluster, pads in none), every encoder self-attention's
    output at the valid tokens is detrex's, and where the decoder masks the padded memory the
    losses of the padded batch are detrex's (dropout off)."""
    from projects.enact import act_encoder

    cuda_free(name, monkeypatch)
    model = no_dropout(build(name)).train()
    perturb_heads(model)
    original = copy.deepcopy(model)
    act_encoder(model, **TINY_R)
    names = encoder_self_attentions(model)
    ours, theirs = record_self_attentions(model, names), record_self_attentions(original, names)
    batch = with_targets(padded_images())
    losses = []
    for m in (original, model):
        torch.manual_seed(3)  # DN-DETR's noised queries
        with torch.no_grad():
            losses.append(m(batch))
    assert losses[0].keys() == losses[1].keys()
    for layer in names:
        (out, mask), (ref, ref_mask) = ours[layer], theirs[layer]
        assert mask is not None and mask.any() and torch.equal(mask, ref_mask)
        valid = ~mask.T  # (L, B)
        torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=0)
    for act in act_modules(model).values():  # each valid token its own cluster, pads in none
        valid_counts = (~ours[names[act.layer_index]][1]).sum(1)
        assert torch.equal(act.last_num_tokens, valid_counts)
        assert torch.equal(act.last_num_clusters, valid_counts[:, None].expand_as(act.last_num_clusters))
    if name in MASKED_MEMORY:
        for key in losses[0]:
            torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["detr", "anchor_detr_mhsa"])
def test_act_training_step_gives_every_trained_parameter_a_gradient(name):
    """Real ACT (L = 32, r = 8): the parameters detrex's model trains get a gradient with ACT too
    (ACT has none of its own); clusters per image are fewer than tokens at a coarse r."""
    from projects.enact import act_encoder

    model = build(name)
    perturb_heads(model)
    baseline = training_step(copy.deepcopy(model), name)
    act_encoder(model, bucket_width=64.0)
    grads = training_step(model, name)
    assert grads.keys() == baseline.keys()
    assert {n for n, g in grads.items() if g} >= {n for n, g in baseline.items() if g}
    # the encoder's projections learn through the prototypes (queries) and keys / values
    enc = [n for n in grads if "encoder" in n and "in_proj_weight" in n]
    assert enc and all(grads[n] for n in enc)
    stats = [a.statistics() for a in act_modules(model).values()]
    assert len(stats) == 2 and all(1 <= s["clusters_per_image"] for s in stats)
    assert any(s["compression"] > 1 for s in stats)


def test_act_has_no_rcda_form():
    from detectron2.config import instantiate

    from projects.enact import act_encoder
    from projects.enact.detrex_support import ActAnchorDETRTransformer, detrex_config

    model = build("anchor_detr_rcda")
    with pytest.raises(ValueError, match=r"MultiheadRCDA \(row-column.*ACT has no RCDA form.*nn.MultiheadAttention"):
        act_encoder(model)
    assert not act_modules(model)  # nothing replaced
    cfg = shrink_detrex_model(detrex_config(DETREX_MODELS["anchor_detr_rcda"][0]).model)
    cfg.transformer._target_ = ActAnchorDETRTransformer  # the config route: the same error
    with pytest.raises(ValueError, match="ACT has no RCDA form"):
        instantiate(cfg)


@pytest.mark.parametrize("name", ["dab_detr", "anchor_detr_mhsa"])
def test_never_a_double_wrap_between_act_and_enact(name):
    from projects.enact import act_encoder, enact_encoder

    inner = "TorchMultiheadAttentionAdapter\\((ActAttention|EnactAttention)\\)" if name == "anchor_detr_mhsa" else None
    act = act_encoder(build(name))
    for convert in (act_encoder, enact_encoder):
        with pytest.raises(ValueError, match=r"already converted \(" + (inner or "ActAttention") + r"\)"):
            convert(act)
    enact = enact_encoder(build(name), sigma=2)
    with pytest.raises(ValueError, match=r"already converted \(" + (inner or "EnactAttention") + r"\)"):
        act_encoder(enact)
    assert not act_modules(enact)


# ---------------------------------------------------------------- configs/detrex/*_act.py
ACT_CONFIGS = {
    "detr_r50_300ep_act": ("detr", "ActDetrTransformerEncoder"),
    "conditional_detr_r50_50ep_act": ("conditional_detr", "ActConditionalDetrTransformerEncoder"),
}


@pytest.mark.parametrize("config", list(ACT_CONFIGS))
def test_act_config_is_detrex_with_an_act_encoder(config):
    """configs/detrex/X_act.py: detrex's config with only the encoder class, L and r changed;
    built tiny, its encoder's 2 self-attentions are ACT with distinct projections, a detrex state
    dict loads with only the hash buffers missing, and the model is act_encoder(detrex's model)."""
    from detectron2.config import LazyConfig, instantiate

    from projects.enact import act_encoder
    from projects.enact.detrex_support import detrex_config

    name, cls = ACT_CONFIGS[config]
    cfg = LazyConfig.load(str(ROOT / "configs" / "detrex" / f"{config}.py"))
    base = detrex_config(DETREX_MODELS[name][0])

    ours, theirs = flat_config(cfg.model), flat_config(base.model)
    assert set(theirs) <= set(ours)
    changed = {k for k in ours if k not in theirs or ours[k] != theirs[k]}
    enc = "transformer.encoder"
    assert changed == {f"{enc}._target_", f"{enc}.num_hashes", f"{enc}.bucket_width"}
    assert ours[f"{enc}._target_"].__name__ == cls
    assert (ours[f"{enc}.num_hashes"], ours[f"{enc}.bucket_width"]) == (32, 8.0)
    assert_detrex_except_results_folder(cfg, base)

    torch.manual_seed(0)
    model = instantiate(shrink_detrex_model(cfg.model)).eval()
    acts = act_modules(model)
    assert list(acts) == encoder_self_attentions(model) and len(acts) == 2
    first, second = acts.values()
    assert (first.num_hashes, first.bucket_width, first.seed) == (32, 8.0, 0)
    assert not torch.equal(first.hash_a, second.hash_a)
    detrex_model = build(name).eval()
    result = model.load_state_dict(detrex_model.state_dict(), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(
        f"{n}.hash_{x}" for n in acts for x in "ab")
    converted = act_encoder(copy.deepcopy(detrex_model))
    assert model.state_dict().keys() == converted.state_dict().keys()
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in model.state_dict().items())
    images = padded_images()
    with torch.no_grad():
        for a, b in zip(model(images), converted(images)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)
