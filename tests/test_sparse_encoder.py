"""Sparse DETR's encoder query sparsification (projects/enact/modeling/sparse_encoder.py): rho = 1
is the dense encoder, unselected tokens and pads pass through bit for bit, the selected ones match
a plainly written reference, batch independence, gradients, bad rho; the shapes configs build,
train a step and load the baseline's checkpoint."""
import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detection_helpers import sample, sparse, tiny_config

from projects.enact import EnactAttention
from projects.enact.modeling.sparse_encoder import (
    SparseTransformerEncoder,
    attention_map,
    check_query_ratio,
    dam_loss,
    dam_target,
    objectness_target,
    select_tokens,
    selection_statistics,
)
from projects.enact.modeling.sparse_selection import SparseOutputs
from projects.enact.modeling.transformer import TransformerEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, HEADS, LAYERS = 16, 4, 2
LENGTHS = (40, 27, 9)  # valid tokens of the three images; N = 40

pytestmark = pytest.mark.usefixtures("single_thread")


def attention(kind):
    return None if kind == "mhsa" else EnactAttention(C, HEADS, sigma=1)


def encoders(kind, rho, dtype=torch.float64, seed=0):
    """A sparse encoder and the dense encoder with the same layer weights, in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(num_layers=LAYERS, embed_dim=C, ffn_dim=32, dropout=0.0, num_heads=HEADS)
    sparse = SparseTransformerEncoder(attention(kind), query_ratio=rho, **kwargs).to(dtype).eval()
    dense = TransformerEncoder(attention(kind), **kwargs).to(dtype).eval()
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(k.startswith("scorer.") for k in unexpected)
    return sparse, dense


def inputs(lengths=LENGTHS, n=40, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, len(lengths), C, generator=g).to(dtype)
    pos = torch.randn(n, len(lengths), C, generator=g).to(dtype)
    mask = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]  # (B, N), True = pad
    src[mask.t()] = 1e3  # pads with values that would show if they leaked into a valid token
    return src, pos, mask


@pytest.mark.parametrize("kind", ["mhsa", "enact"])
def test_rho_one_equals_the_dense_encoder_on_valid_tokens(kind):
    sparse, dense = encoders(kind, 1.0)
    src, pos, mask = inputs()
    out = sparse(src, pos, mask, return_selection=True)
    assert out.selection.num_selected.tolist() == list(LENGTHS)
    assert torch.equal(out.selection.token_mask(), ~mask)
    valid = (~mask).t()
    torch.testing.assert_close(out.memory[valid], dense(src, pos, mask)[valid], rtol=0, atol=1e-12)
    assert torch.equal(out.memory[~valid], src[~valid])  # pads are not touched


@pytest.mark.parametrize("kind", ["mhsa", "enact"])
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.75])
def test_unselected_tokens_and_pads_pass_through_bit_for_bit(kind, rho):
    sparse, _ = encoders(kind, 0.5, dtype=torch.float32)
    sparse.query_ratio = rho  # read at every call
    src, pos, mask = inputs(dtype=torch.float32)
    memory, sel = sparse(src, pos, mask, return_selection=True)
    chosen = sel.token_mask()  # (B, N)
    assert sel.num_selected.tolist() == [max(1, math.ceil(round(rho * n, 6))) for n in LENGTHS]
    assert chosen.sum(1).tolist() == sel.num_selected.tolist()
    assert not (chosen & mask).any()  # pads never selected
    # the selected tokens are the best-scored valid ones
    scores = sel.scores.detach()
    for b in range(len(LENGTHS)):
        others = scores[b][~chosen[b] & ~mask[b]]
        assert others.numel() == 0 or scores[b][chosen[b]].min() >= others.max()
    assert torch.equal(memory.transpose(0, 1)[~chosen], src.transpose(0, 1)[~chosen])
    assert not torch.isclose(memory.transpose(0, 1)[chosen], src.transpose(0, 1)[chosen]).all(-1).any()


def reference_sparse_encoder(encoder, src, pos, mask, chosen):
    """Each image alone, its selected tokens updated by hand-written post-norm layers (standard
    multi-head attention over all valid tokens), every other token frozen."""
    out = src.clone()
    for b in range(src.shape[1]):
        valid = ~mask[b]
        x, p = src[valid, b], pos[valid, b]  # (n, C)
        sel = chosen[b][valid]
        for layer in encoder.layers:
            attn = layer.self_attn.attn
            wq, wk, wv = attn.in_proj_weight.chunk(3)
            bq, bk, bv = attn.in_proj_bias.chunk(3)
            q = (x[sel] + p[sel]) @ wq.t() + bq
            k = (x + p) @ wk.t() + bk
            v = x @ wv.t() + bv
            d = C // HEADS
            heads = []
            for h in range(HEADS):
                qs, ks, vs = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
                heads.append(torch.softmax(qs @ ks.t() / math.sqrt(d), -1) @ vs)
            y = layer.norm1(x[sel] + torch.cat(heads, -1) @ attn.out_proj.weight.t() + attn.out_proj.bias)
            y = layer.norm2(y + layer.linear2(torch.relu(layer.linear1(y))))
            x = x.clone()
            x[sel] = y
        out[valid, b] = x
    return out


def test_selected_tokens_match_a_plainly_written_reference():
    sparse, _ = encoders("mhsa", 0.3, dtype=torch.float32)
    src, pos, mask = inputs(dtype=torch.float32)
    with torch.no_grad():
        memory, sel = sparse(src, pos, mask, return_selection=True)
        expected = reference_sparse_encoder(sparse, src, pos, mask, sel.token_mask())
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mhsa", "enact"])
def test_an_image_gives_the_same_result_alone_and_in_a_batch(kind):
    sparse, _ = encoders(kind, 0.3)
    src, pos, mask = inputs()
    batch = sparse(src, pos, mask, return_selection=True)
    for b, n in enumerate(LENGTHS):  # alone, cropped to its own valid tokens (no pads)
        alone = sparse(src[:n, b:b + 1], pos[:n, b:b + 1], mask[b:b + 1, :n], return_selection=True)
        assert torch.equal(alone.selection.token_mask()[0], batch.selection.token_mask()[b, :n])
        torch.testing.assert_close(alone.memory[:, 0], batch.memory[:n, b], rtol=0, atol=1e-12)


def test_gradients_reach_the_scorer_only_through_its_scores():
    sparse, _ = encoders("mhsa", 0.3, dtype=torch.float32)
    sparse.train()
    assert sparse.detach_scorer_input and sparse.scorer_reads_pos  # the defaults (measured: docs/sparse_detr.md)
    sparse.detach_scorer_input = False
    src, pos, mask = inputs(dtype=torch.float32)
    src.requires_grad_(True)
    memory, sel = sparse(src, pos, mask, return_selection=True)
    memory.square().sum().backward(retain_graph=True)
    assert all(p.grad is None for p in sparse.scorer.parameters())  # the selection is an index
    assert all(p.grad is not None for n, p in sparse.named_parameters() if not n.startswith("scorer."))
    src.grad = None
    sel.scores[sel.valid].sum().backward()  # a loss on the scores (loss_dam) is the scorer's one route
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sparse.scorer.parameters())
    assert src.grad is not None  # through the scorer's input, to the backbone
    src.grad = None
    sparse.detach_scorer_input = True  # the option keeps the scorer's loss at the scorer
    sparse(src, pos, mask, return_selection=True).selection.scores.sum().backward()
    assert src.grad is None


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.3", None])
def test_a_bad_query_ratio_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="query_ratio"):
        check_query_ratio(bad)
    with pytest.raises(ValueError, match="query_ratio"):
        SparseTransformerEncoder(num_layers=1, embed_dim=C, ffn_dim=8, num_heads=HEADS, query_ratio=bad)
    sparse, _ = encoders("mhsa", 0.3)
    sparse.query_ratio = bad  # checked at every call
    src, pos, mask = inputs()
    with pytest.raises(ValueError, match="query_ratio"):
        sparse(src, pos, mask)


def test_select_tokens_ties_and_all_valid():
    scores = torch.zeros(2, 5)  # all tied: the lowest positions win
    valid = torch.tensor([[True] * 5, [False, True, True, False, True]])
    sel = select_tokens(scores, valid, 0.5)
    assert sel.num_selected.tolist() == [3, 2]
    assert sel.token_mask().tolist() == [[True, True, True, False, False], [False, True, True, False, False]]
    assert sel.index[1, 2] == 5 and not sel.slots[1, 2]  # an empty slot points past the tokens


# ---------------------------------------------------------------------- detectors and configs
def load(path):
    cfg = LazyConfig.load(os.path.join(ROOT, path))
    cfg.train.device = "cpu"
    cfg.model.device = "cpu"
    return cfg


def one_training_step(model, images, scorer_learns=True, loss="loss_dam"):
    """A training step; every trainable parameter gets a finite gradient, the scorer's only
    with ``scorer_learns`` (loss_dam computed and weighted).  Returns the weighted losses."""
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(images)
    assert (loss in losses) == scorer_learns and not any(k.startswith(("loss_dam_", "loss_os_")) for k in losses)
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".scorer." in name and not scorer_learns:  # the selection is an index: no gradient
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    return losses


IMAGES = [sample(64, 96, 0, [[5, 6, 40, 50]], [1]), sample(48, 64, 1)]


@pytest.mark.parametrize("config", ["detr_r50_300ep", "conditional_detr_r50_50ep", "anchor_detr_r50_dc5_50ep_mhsa"])
def test_the_sparse_encoder_drops_into_every_mhsa_detector(config):
    cfg = sparse(tiny_config(config))
    cfg.criterion.weight_dict["loss_dam"] = 0.5
    torch.manual_seed(0)
    model = instantiate(cfg)
    assert isinstance(model.transformer.encoder, SparseTransformerEncoder)
    seen = []
    handle = model.criterion.register_forward_pre_hook(lambda m, args: seen.append(args[0]["sparse"]))
    one_training_step(model, IMAGES)
    handle.remove()
    # the DAM: every query's weights of every head and decoder layer sum to 1 over the valid tokens
    sel, dam = seen[0].selection, seen[0].dam
    layers, heads = 2, 4
    torch.testing.assert_close(dam.sum(1), torch.full((2,), float(layers * heads * model.num_queries)))
    assert (dam[~sel.valid] == 0).all() and sel.valid.shape == dam.shape
    # the weight is applied once; the loss reaches the scorer only (its input is detached by
    # default), or with detach_scorer_input=False also the backbone and the input projection
    for detach in (True, False):
        model.transformer.encoder.detach_scorer_input = detach
        model.zero_grad(set_to_none=True)
        losses = model(IMAGES)
        losses["loss_dam"].backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(".scorer." in n for n in grads)
        if detach:
            assert all(".scorer." in n for n in grads), grads
        else:
            assert any(n.startswith("input_proj.") for n in grads)
            # ... and the positions the scorer reads (Anchor DETR's are learnt), nothing else
            others = {n for n in grads if ".scorer." not in n and not n.startswith(("backbone.", "input_proj."))}
            assert all("pos" in n for n in others), others
    model.criterion.weight_dict.pop("loss_dam")  # no weight: no loss, no gradient
    one_training_step(model, IMAGES, scorer_learns=False)
    model.eval()  # inference at another rho
    model.transformer.encoder.query_ratio = 0.1
    with torch.no_grad():
        assert len(model(IMAGES)) == 2


def test_the_dam_is_the_decoders_cross_attention_summed():
    """DETR's decoder: the DAM equals the eager cross-attention weights summed over queries,
    heads and layers, taken from nn.MultiheadAttention's own weights."""
    from projects.enact.modeling.transformer import TransformerDecoder

    torch.manual_seed(0)
    dec = TransformerDecoder(num_layers=2, embed_dim=C, num_heads=HEADS, ffn_dim=32, dropout=0.0).double().eval()
    tgt, qpos = torch.randn(5, 2, C).double(), torch.randn(5, 2, C).double()
    memory, pos, mask = inputs(lengths=(40, 27))
    hs, dam = dec(tgt, memory, pos, qpos, mask, return_attention_map=True)
    torch.testing.assert_close(hs, dec(tgt, memory, pos, qpos, mask), rtol=0, atol=0)
    expected, x = 0, tgt
    for layer in dec.layers:
        x1 = layer.norm1(layer.self_attn(query=x, key=x, value=x, query_pos=qpos, key_pos=qpos))
        _, w = layer.cross_attn.attn(
            (x1 + qpos).transpose(0, 1), (memory + pos).transpose(0, 1), memory.transpose(0, 1),
            key_padding_mask=mask, average_attn_weights=False,
        )  # (B, h, Q, N)
        expected = expected + w.sum((1, 2))
        x = layer(x, memory, pos, qpos, mask)
    torch.testing.assert_close(dam, expected, rtol=0, atol=1e-12)
    assert (dam[mask] == 0).all()


@pytest.mark.parametrize("name", ["sparse", "sparse_enact"])
def test_shapes_config_trains_a_step_and_loads_the_baseline_checkpoint(name):
    cfg = load(f"configs/shapes/conditional_detr_r18_shapes_{name}.py")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    encoder = model.transformer.encoder
    assert isinstance(encoder, SparseTransformerEncoder) and encoder.query_ratio == 0.3
    assert isinstance(encoder.layers[0].self_attn, EnactAttention) == name.endswith("enact")
    base = instantiate(load("configs/shapes/conditional_detr_r18_shapes.py").model)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    new = ("transformer.encoder.scorer.",) + (("w_prob",) if name.endswith("enact") else ())
    assert any(k.startswith(new[0]) for k in missing)
    assert all(k.startswith(new[0]) or (len(new) > 1 and "w_prob" in k) for k in missing), missing
    losses = one_training_step(model, [sample(64, 80, 0, [[5, 6, 40, 50]], [1]), sample(48, 64, 1)])
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------- the scorer's target and loss
def test_dam_target_and_loss_on_a_hand_computed_case():
    # one head, d = 1, two queries (0 and 1), three keys (0, 0, ln 2); key 1 is a pad
    q = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(1, 1, 2, 1)
    k = torch.tensor([0.0, 0.0, math.log(2.0)], dtype=torch.float64).reshape(1, 1, 3, 1)
    # no mask: query 0 -> 1/3 each, query 1 -> (1, 1, 2) / 4
    torch.testing.assert_close(attention_map(q, k)[0], torch.tensor([7 / 12, 7 / 12, 5 / 6], dtype=torch.float64))
    pad = torch.tensor([[False, True, False]])
    dam = attention_map(q, k, pad)  # query 0 -> (1/2, 0, 1/2), query 1 -> (1/3, 0, 2/3)
    torch.testing.assert_close(dam[0], torch.tensor([5 / 6, 0.0, 7 / 6], dtype=torch.float64))
    target = dam_target(dam, ~pad, torch.tensor([1]))  # ceil(0.5 * 2) = 1 token: the last
    assert target.tolist() == [[0.0, 0.0, 1.0]]
    scores = torch.tensor([[0.0, 50.0, 0.0]], requires_grad=True)  # the pad's score counts nothing
    loss = dam_loss(scores, target, ~pad)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.tensor([[0.25, 0.0, -0.25]]))  # (sigmoid(0) - t) / 2


def test_objectness_target_on_a_hand_computed_case():
    # a 2 x 3 map; image 0 is all valid, image 1 has its last column padded (2 x 2 valid tokens)
    valid = torch.tensor([[True] * 6, [True, True, False, True, True, False]])
    boxes = [torch.tensor([[0.25, 0.5, 0.5, 1.0]]),  # x in [0, 0.5]: centres 1/6 (in), 1/2 (in), 5/6
             torch.tensor([[0.75, 0.75, 0.5, 0.5], [0.1, 0.1, 0.01, 0.01]])]  # x, y in [0.5, 1]: token (1, 1)
    target = objectness_target(valid, (2, 3), boxes)
    assert target.tolist() == [[1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 1, 0]]
    assert objectness_target(valid, (2, 3), [torch.zeros(0, 4)] * 2).sum() == 0  # no boxes: all 0


@pytest.mark.parametrize("config", ["conditional_detr_r50_50ep", "anchor_detr_r50_dc5_50ep_mhsa"])
def test_the_objectness_target_trains_the_scorer_without_a_dam(config):
    cfg = tiny_config(config)
    cfg.transformer.encoder._target_ = SparseTransformerEncoder
    cfg.transformer.encoder.scorer_target = "objectness"
    cfg.criterion.weight_dict.update(loss_dam=1.0, loss_os=1.0)
    torch.manual_seed(0)
    model = instantiate(cfg)
    seen = []
    handle = model.criterion.register_forward_pre_hook(lambda m, args: seen.append(args[0]["sparse"]))
    losses = one_training_step(model, IMAGES, loss="loss_os")
    handle.remove()
    assert "loss_dam" not in losses and seen[0].dam is None and seen[0].target == "objectness"
    with pytest.raises(ValueError, match="scorer_target"):
        SparseTransformerEncoder(num_layers=1, embed_dim=C, ffn_dim=8, num_heads=HEADS, scorer_target="os")


def test_selection_statistics_on_a_hand_computed_case():
    # one 1 x 4 image, rho = 0.5: the scorer picks tokens 0 and 1, the DAM's best are 1 and 3
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    sel = select_tokens(scores, torch.ones(1, 4, dtype=torch.bool), 0.5)
    dam = torch.tensor([[0.1, 0.5, 0.0, 0.4]])
    box = [{"boxes": torch.tensor([[0.125, 0.5, 0.25, 1.0]])}]  # covers token 0 only
    stats = selection_statistics(SparseOutputs(sel, dam, (1, 4)), box)
    expected = {"selected_share": 0.5, "dam_overlap": 0.5, "dam_mass": 0.6 / 0.9, "dam_top_share": 0.9 / 1.0,
                "in_box_share": 0.5, "box_token_share": 0.25}
    assert {k: round(float(v[0]), 6) for k, v in stats.items()} == {k: round(v, 6) for k, v in expected.items()}
    assert set(selection_statistics(SparseOutputs(sel, None))) == {"selected_share"}


@pytest.mark.parametrize("config", ["detr_r50_300ep", "conditional_detr_r50_50ep", "anchor_detr_r50_dc5_50ep_mhsa"])
def test_every_sparse_enact_config_trains_a_step(config):
    """The COCO ``_sparse_enact`` configs (shrunk): a sparse encoder whose layers attend to ENACT's
    clusters; a training step gives every parameter a finite gradient and loss_dam; the
    ``_sparse`` config's state dict loads with nothing missing but ENACT's own parameters."""
    cfg = tiny_config(f"{config}_sparse_enact")
    torch.manual_seed(0)
    model = instantiate(cfg)
    encoder = model.transformer.encoder
    assert isinstance(encoder, SparseTransformerEncoder) and encoder.query_ratio == 0.3
    assert all(isinstance(layer.self_attn, EnactAttention) for layer in encoder.layers)
    losses = one_training_step(model, IMAGES)
    assert all(torch.isfinite(v) for v in losses.values())
    plain = instantiate(tiny_config(f"{config}_sparse"))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("self_attn" in k for k in missing), missing


def test_the_scorer_may_read_positions_and_stop_its_loss_at_its_input():
    """scorer_reads_pos scores src + pos; detach_scorer_input keeps loss_dam's gradient out of src."""
    sparse, _ = encoders("mhsa", 0.3)
    sparse.detach_scorer_input = sparse.scorer_reads_pos = False
    src, pos, mask = inputs()
    src.requires_grad_(True)
    plain = sparse.select(src, mask, pos).scores
    torch.testing.assert_close(plain, sparse.scorer(src).transpose(0, 1))
    sparse.scorer_reads_pos = True
    torch.testing.assert_close(sparse.select(src, mask, pos).scores, sparse.scorer(src + pos).transpose(0, 1))
    sparse.select(src, mask, pos).scores.sum().backward()
    assert src.grad is not None and src.grad.abs().sum() > 0
    src.grad = None
    sparse.detach_scorer_input = True
    scores = sparse.select(src, mask, pos).scores
    assert not scores.requires_grad or src.grad is None
    scores.sum().backward() if scores.requires_grad else None
    assert src.grad is None
