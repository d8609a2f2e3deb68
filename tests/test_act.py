"""ACT (projects.enact.ActAttention): equal to standard attention when every query is its own
cluster, one output for one cluster, clusters against a loop-by-loop oracle, seeds, padding and
batch independence, bad arguments, gradients, state dict, per-layer projections."""
import pytest
import torch

from projects.enact import ActAttention, MultiheadAttention
from projects.enact.modeling.act import e2lsh_codes, hash_segmentation, number_act_layers
from projects.enact.modeling.transformer import TransformerEncoder

pytestmark = pytest.mark.usefixtures("single_thread")

C, HEADS = 32, 4


def inputs(n=12, batch=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, batch, C, generator=g, dtype=dtype)
    pos = torch.randn(n, batch, C, generator=g, dtype=dtype)
    return x, pos


def call(m, x, pos, mask=None):
    return m(x, x, x, query_pos=pos, key_pos=pos, key_padding_mask=mask)


def pair(dtype=torch.float64, **kw):
    """An ActAttention and a MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    act = ActAttention(C, HEADS, **kw).to(dtype)
    base = MultiheadAttention(C, HEADS).to(dtype)
    missing, unexpected = base.load_state_dict(act.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["hash_a", "hash_b"]
    return act.eval(), base.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_query_its_own_cluster_is_standard_attention(dtype):
    act, base = pair(dtype, bucket_width=1e-5, num_hashes=8)
    x, pos = inputs(dtype=dtype)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 9:] = True
    y, y_ref = call(act, x, pos, mask), call(base, x, pos, mask)
    assert act.last_num_clusters.tolist() == [[12] * HEADS, [9] * HEADS]
    torch.testing.assert_close(y[:, 0], y_ref[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:9, 1], y_ref[:9, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[9:, 1], x[9:, 1], atol=0, rtol=0)  # pads receive no attention


def test_one_cluster_gives_every_valid_query_the_same_output():
    act, base = pair(bucket_width=1e9, num_hashes=4)
    x, pos = inputs()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 7:] = True
    y = call(act, x, pos, mask)
    assert act.last_num_clusters.tolist() == [[1] * HEADS] * 2
    delta = y - x  # the attention output alone (the residual is the identity)
    torch.testing.assert_close(delta[:7, 0], delta[:1, 0].expand(7, C), atol=1e-12, rtol=0)
    torch.testing.assert_close(delta[:, 1], delta[:1, 1].expand(12, C), atol=1e-12, rtol=0)
    # = standard attention of the mean query (per head) against the valid keys
    d = C // HEADS
    w_q, w_k, w_v = act.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = act.attn.in_proj_bias.chunk(3)
    src = (x + pos)[:7, 0]
    q = (src @ w_q.T + b_q).view(7, HEADS, d).mean(0)  # (h, d)
    k = (src @ w_k.T + b_k).view(7, HEADS, d)
    v = (x[:7, 0] @ w_v.T + b_v).view(7, HEADS, d)
    att = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / d**0.5, -1)
    o = act.attn.out_proj(torch.einsum("hn,nhd->hd", att, v).reshape(C))
    torch.testing.assert_close(delta[0, 0], o, atol=1e-12, rtol=0)


def oracle_clusters(codes, valid):
    """Cluster slots by first appearance of each distinct code tuple, plain Python."""
    ids = torch.full(valid.shape, -1, dtype=torch.long)
    for r in range(codes.shape[0]):
        seen = {}
        for n in range(codes.shape[1]):
            if valid[r, n]:
                ids[r, n] = seen.setdefault(tuple(codes[r, n].tolist()), len(seen))
    return ids


def test_hash_segmentation_matches_oracle_and_is_consistent():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-2, 2, (5, 30, 3), generator=g)
    codes[:, :, 0] = 2**62 - 1  # large codes: tuples are compared, nothing is summed
    valid = torch.rand(5, 30, generator=g) > 0.3
    valid[4] = False  # an empty row
    seg = hash_segmentation(codes, valid)
    ids = oracle_clusters(codes, valid)
    assert torch.equal(seg.cluster_ids, ids)
    assert seg.num_clusters.tolist() == [int(ids[r].max()) + 1 if valid[r].any() else 0 for r in range(5)]
    # CSR: the members of each segment are its tokens, row-major
    for s in range(seg.num_segments):
        members = seg.tokens[seg.seg_starts[s] : seg.seg_starts[s + 1]]
        row = int(seg.seg_batch[s])
        slot = s - int(seg.row_offsets[row])
        expect = (ids.view(-1) == slot).nonzero().squeeze(1)
        expect = expect[expect // 30 == row]
        assert torch.equal(members, expect)
        assert (seg.token_segment[seg.seg_starts[s] : seg.seg_starts[s + 1]] == s).all()
    # codes differing in one coordinate only are different clusters, even with huge values
    c2 = torch.zeros(1, 3, 2, dtype=torch.long)
    c2[0, 1, 1] = 1
    c2[0, 2, 0] = 4  # 4^0 * 4 == 4^1 * 1: a sum of 4^i h_i would merge tokens 1 and 2
    assert hash_segmentation(c2).cluster_ids.tolist() == [[0, 1, 2]]


def test_e2lsh_codes_formula():
    g = torch.Generator().manual_seed(1)
    q, a, u = torch.randn(2, 3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g), torch.rand(3, 6, generator=g)
    codes = e2lsh_codes(q, a, u, 0.5)
    expect = torch.floor((torch.einsum("bhnd,hld->bhnl", q.double(), a.double()) + 0.5 * u.double()[None, :, None]) / 0.5)
    assert codes.dtype == torch.int64 and codes.shape == (2, 3, 5, 6)
    assert (codes - expect.long()).abs().max() <= 1 and (codes == expect.long()).float().mean() > 0.99


def test_deterministic_for_a_seed_and_different_across_seeds():
    a1, a2, b = ActAttention(C, HEADS, seed=5), ActAttention(C, HEADS, seed=5), ActAttention(C, HEADS, seed=6)
    assert torch.equal(a1.hash_a, a2.hash_a) and torch.equal(a1.hash_b, a2.hash_b)
    assert not torch.equal(a1.hash_a, b.hash_a) and not torch.equal(a1.hash_b, b.hash_b)
    assert ((a1.hash_b >= 0) & (a1.hash_b < 1)).all()  # b / r ~ U(0, 1)
    assert a1.hash_a.shape == (HEADS, 32, C // HEADS) and a1.hash_a.dtype == torch.float32
    # same weights, same seed: the same output; another seed: other clusters
    torch.manual_seed(0)
    m1 = ActAttention(C, HEADS, seed=5, bucket_width=0.5, num_hashes=3).double().eval()
    m2 = ActAttention(C, HEADS, seed=5, bucket_width=0.5, num_hashes=3).double().eval()
    m3 = ActAttention(C, HEADS, seed=6, bucket_width=0.5, num_hashes=3).double().eval()
    m2.load_state_dict(m1.state_dict())
    sd = {k: v for k, v in m1.state_dict().items() if not k.startswith("hash_")}
    m3.load_state_dict(sd, strict=False)
    x, pos = inputs(n=40)
    assert torch.equal(call(m1, x, pos), call(m2, x, pos))
    assert 2 < m1.statistics()["clusters_per_image"] < 40  # real clusters, so seeds can differ
    assert not torch.equal(call(m1, x, pos), call(m3, x, pos))


def test_padding_and_batch_independence():
    torch.manual_seed(0)
    act = ActAttention(C, HEADS, bucket_width=1.0, num_hashes=4).double().eval()
    x, pos = inputs(n=20, batch=3)
    lengths = [20, 13, 7]
    mask = torch.arange(20)[None, :] >= torch.tensor(lengths)[:, None]
    garbage = torch.randn(20, 3, C, dtype=torch.float64) * 100
    xg = torch.where(mask.T[..., None], garbage, x)
    y = call(act, xg, pos, mask)
    assert 1 < act.statistics()["clusters_per_image"] < 20
    assert act.last_num_clusters.shape == (3, HEADS)
    for b, n in enumerate(lengths):
        alone = call(act, x[:n, b : b + 1], pos[:n, b : b + 1])
        torch.testing.assert_close(y[:n, b : b + 1], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(y[n:, b], xg[n:, b], atol=0, rtol=0)  # pads: identity only


def test_batch_first_matches_sequence_first():
    torch.manual_seed(0)
    seq = ActAttention(C, HEADS, bucket_width=1.0).double().eval()
    bf = ActAttention(C, HEADS, bucket_width=1.0, batch_first=True).double().eval()
    bf.load_state_dict(seq.state_dict())
    x, pos = inputs()
    y = call(seq, x, pos)
    y_bf = bf(x.transpose(0, 1), query_pos=pos.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(y, y_bf, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_hashes": 0}, "num_hashes"),
        ({"num_hashes": 2.0}, "num_hashes"),
        ({"bucket_width": 0.0}, "bucket_width"),
        ({"bucket_width": -1.0}, "bucket_width"),
        ({"bucket_width": float("inf")}, "bucket_width"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ActAttention(C, HEADS, **kwargs)


def test_attn_mask_rejected():
    act = ActAttention(C, HEADS)
    x, pos = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="attn_mask"):
        act(x, query_pos=pos, attn_mask=torch.zeros(12, 12, dtype=torch.bool))


def test_gradients_flow_in_training_mode():
    torch.manual_seed(0)
    act = ActAttention(C, HEADS, bucket_width=1.0, attn_drop=0.1, proj_drop=0.1).train()
    x, pos = inputs(dtype=torch.float32)
    x.requires_grad_()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 10:] = True
    call(act, x, pos, mask).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in act.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in act.buffers())


def test_state_dict_holds_the_projections():
    a = ActAttention(C, HEADS, num_hashes=6, seed=1)
    sd = a.state_dict()
    assert torch.equal(sd["hash_a"], a.hash_a) and torch.equal(sd["hash_b"], a.hash_b)
    b = ActAttention(C, HEADS, num_hashes=6, seed=2)
    b.load_state_dict(sd)
    assert torch.equal(b.hash_a, a.hash_a)
    assert not [n for n, _ in a.named_parameters() if n.startswith("hash")]  # buffers, not parameters


def test_encoder_layers_get_different_deterministic_projections():
    def build():
        return TransformerEncoder(ActAttention(C, HEADS, seed=3), num_layers=3, embed_dim=C, ffn_dim=64)

    enc, enc2 = build(), build()
    a = [layer.self_attn.hash_a for layer in enc.layers]
    assert [layer.self_attn.layer_index for layer in enc.layers] == [0, 1, 2]
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    for l1, l2 in zip(enc.layers, enc2.layers):
        assert torch.equal(l1.self_attn.hash_a, l2.self_attn.hash_a)
        assert torch.equal(l1.self_attn.hash_b, l2.self_attn.hash_b)
    # number_act_layers numbers any model the same way
    ref = [x.clone() for x in a]
    for layer in enc.layers:
        layer.self_attn.set_layer_index(0)
    assert number_act_layers(enc) == 3
    assert all(torch.equal(x.hash_a, r) for x, r in zip((l.self_attn for l in enc.layers), ref))
    assert enc.layers[0].self_attn.hash_a.shape == (HEADS, 32, C // HEADS)


def test_encoder_runs_with_act():
    torch.manual_seed(0)
    enc = TransformerEncoder(ActAttention(C, HEADS, bucket_width=1.0), num_layers=2, embed_dim=C, ffn_dim=64).eval()
    # 4 distinct tokens, 4 copies of each: equal queries share their bucket
    x, pos = (t[torch.arange(16) // 4] for t in inputs(n=16, dtype=torch.float32))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 12:] = True
    out = enc(x, pos=pos, mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # image 0: 12 valid tokens in 3 prototypes, image 1: 16 in 4
    assert enc.layers[0].self_attn.statistics() == {"clusters_per_image": 3.5, "compression": 4.0}


def test_mtkd_adds_the_distillation_loss_with_shared_weights():
    """DETR(mtkd_attention=ActAttention(...)): one more loss, the full branch's boxes detached,
    gradients into the shared encoder weights; only the projections are new in the state dict;
    inference and the full branch's losses are those of the plain model."""
    from detectron2.config import LazyCall as L
    from detection_helpers import build, infer, inference_batch, tiny_config, two_image_batch

    from projects.enact.modeling.act import act_branch

    plain = build(tiny_config("detr_r50_300ep"))
    cfg = tiny_config("detr_r50_300ep")
    cfg.mtkd_attention = L(ActAttention)(embed_dim=32, num_heads=4, num_hashes=4, bucket_width=1.0)
    model = build(cfg)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtkd_act.") and "hash_" in k for k in missing)
    assert len(model.mtkd_act) == len(model.transformer.encoder.layers)
    assert not torch.equal(model.mtkd_act[0].hash_a, model.mtkd_act[1].hash_a)
    batch = two_image_batch()
    model.train()
    plain.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses = model(batch)
    torch.manual_seed(1)
    plain_losses = plain(batch)
    assert set(losses) == set(plain_losses) | {"loss_mtkd"}
    for k, v in plain_losses.items():
        torch.testing.assert_close(losses[k], v)
    assert float(losses["loss_mtkd"].detach()) > 0 and torch.isfinite(losses["loss_mtkd"].detach())
    losses["loss_mtkd"].backward()
    enc_grad = model.transformer.encoder.layers[0].self_attn.attn.in_proj_weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0  # through the ACT branch, shared weights
    # the full branch's encoder attention is back in place after the ACT branch
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.transformer.encoder.layers)
    assert all("attn" not in twin._modules for twin in model.mtkd_act)
    model.eval()
    plain.eval()
    batch = inference_batch(batch)
    for a, b in zip(infer(model, batch), infer(plain, batch)):
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    # act_branch restores the layers even when the branch fails
    with pytest.raises(RuntimeError):
        with act_branch(model.transformer.encoder, model.mtkd_act):
            raise RuntimeError("boom")
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.transformer.encoder.layers)


# ---------------------------------------------------------------- act_encoder on built models
PROJECT_MODELS = ["detr_r50_300ep", "conditional_detr_r50_50ep", "anchor_detr_r50_dc5_50ep_mhsa"]


def encoder_output(model, batch):
    """The detections of ``model`` (eval, no gradients) on ``batch`` and its encoder's output at
    the valid (not padded) tokens, (T, C).  (Padded tokens: standard attention gives them an
    output, ACT none; no valid token sees them, nor does the decoder.)"""
    from detection_helpers import infer

    from projects.enact.modeling.encoder_adapter import find_encoder

    seen = []
    hook = lambda mod, args, kwargs, out: seen.append((out, kwargs["mask"]))  # noqa: E731
    handle = find_encoder(model).register_forward_hook(hook, with_kwargs=True)
    try:
        detections = infer(model, batch)
    finally:
        handle.remove()
    assert len(seen) == 1
    memory, mask = seen[0]  # (N, B, C), (B, N) True = pad
    assert mask.any()  # two image sizes: padding in the batch
    return detections, memory.transpose(0, 1)[~mask]


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_act_encoder_with_a_tiny_bucket_width_equals_the_original_model(name):
    """act_encoder on a built project model: exactly the encoder's self-attentions become ACT,
    with every valid query its own cluster (r tiny) the encoder's output and the detections are
    the original model's, a padded batch of two image sizes."""
    import copy

    from detection_helpers import build, inference_batch, tiny_config, two_image_batch

    from projects.enact import act_encoder

    model = build(tiny_config(name)).eval()
    original = copy.deepcopy(model)
    assert act_encoder(model, num_hashes=8, bucket_width=1e-6) is model
    acts = [n for n, m in model.named_modules() if isinstance(m, ActAttention)]
    assert acts == [f"transformer.encoder.layers.{i}.self_attn" for i in range(len(model.transformer.encoder.layers))]
    rest = lambda m: [(n, type(x)) for n, x in m.named_modules() if ".self_attn" not in n]  # noqa: E731
    assert rest(model) == rest(original)  # everything else (the decoder's self-attentions too) untouched
    assert [type(m) for n, m in model.named_modules() if "decoder" in n and n.endswith(".self_attn")] == \
        [type(m) for n, m in original.named_modules() if "decoder" in n and n.endswith(".self_attn")]
    batch = inference_batch(two_image_batch())
    (dets, memory), (ref_dets, ref_memory) = encoder_output(model, batch), encoder_output(original, batch)
    torch.testing.assert_close(memory, ref_memory, atol=1e-5, rtol=0)
    assert not torch.equal(memory, torch.zeros_like(memory))
    for a, b in zip(dets, ref_dets):
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    # every valid token its own cluster: the counts are the tokens of each (padded) image
    last = model.transformer.encoder.layers[-1].self_attn
    assert torch.equal(last.last_num_clusters, last.last_num_tokens[:, None].expand_as(last.last_num_clusters))
    assert last.last_num_tokens[0] != last.last_num_tokens[1]
    # and a real bucket width changes the encoder's output (ACT does act)
    coarse = act_encoder(copy.deepcopy(original), num_hashes=4, bucket_width=4.0)
    _, coarse_memory = encoder_output(coarse, batch)
    assert (coarse_memory - ref_memory).abs().max() > 1e-3


def test_act_encoder_state_dict_per_layer_seeds_and_the_act_config():
    """ACT adds no parameters: the original state dict loads with none missing and none
    unexpected, only the hash buffers (one pair per layer) are new; the converted state dict loads
    exactly (strict) into a fresh conversion.  Layer k's projections come from (seed, k), as an
    ACT config's EncoderStack numbers them: act_encoder(baseline) is configs/detr_r50_300ep_act.py
    with the baseline's weights, output for output."""
    import copy

    from detection_helpers import build, inference_batch, tiny_config, two_image_batch

    from projects.enact import act_encoder

    original = build(tiny_config("detr_r50_300ep")).eval()
    model = act_encoder(copy.deepcopy(original))
    layers = [layer.self_attn for layer in model.transformer.encoder.layers]
    assert [a.layer_index for a in layers] == [0, 1] and not torch.equal(layers[0].hash_a, layers[1].hash_a)
    assert (layers[0].num_hashes, layers[0].bucket_width, layers[0].seed) == (32, 8.0, 0)
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        f"transformer.encoder.layers.{i}.self_attn.hash_{x}" for i in range(2) for x in "ab"
    )
    assert dict(model.named_parameters()).keys() == dict(original.named_parameters()).keys()
    for k, v in original.state_dict().items():  # the trained weights carried over
        assert torch.equal(model.state_dict()[k], v), k
    fresh = act_encoder(build(tiny_config("detr_r50_300ep"), seed=1))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    # deterministic for a seed, different across seeds
    again = act_encoder(copy.deepcopy(original))
    other = act_encoder(copy.deepcopy(original), seed=1)
    for a, b, c in zip(layers, (l.self_attn for l in again.transformer.encoder.layers),
                       (l.self_attn for l in other.transformer.encoder.layers)):
        assert torch.equal(a.hash_a, b.hash_a) and torch.equal(a.hash_b, b.hash_b)
        assert not torch.equal(a.hash_a, c.hash_a)
    # the ACT config (L = 32, r = 8, seed 0) with the baseline's weights is the same model
    config_model = build(tiny_config("detr_r50_300ep_act")).eval()
    missing, unexpected = config_model.load_state_dict(original.state_dict(), strict=False)
    assert not unexpected and all("hash_" in k for k in missing)
    assert all(torch.equal(v, config_model.state_dict()[k]) for k, v in model.state_dict().items())
    batch = inference_batch(two_image_batch())
    (_, memory), (_, config_memory) = encoder_output(model, batch), encoder_output(config_model, batch)
    torch.testing.assert_close(memory, config_memory, atol=0, rtol=0)


def test_act_encoder_never_wraps_twice_and_refuses_what_it_cannot_convert():
    """An ACT or ENACT model (converted, or built from an ACT config) is refused by both adapters,
    naming the class found; RCDA (no ACT form), no encoder and bad ACT arguments are errors that
    leave the model unchanged."""
    import copy

    from detection_helpers import build, tiny_config
    from torch import nn

    from projects.enact import EnactAttention, act_encoder, enact_encoder

    base = build(tiny_config("detr_r50_300ep"))
    act = act_encoder(copy.deepcopy(base), num_hashes=4)
    with pytest.raises(ValueError, match=r"already converted \(ActAttention\)"):
        act_encoder(act)
    with pytest.raises(ValueError, match=r"already converted \(ActAttention\)"):  # ACT -> ENACT
        enact_encoder(act)
    enact = enact_encoder(copy.deepcopy(base), sigma=2)
    with pytest.raises(ValueError, match=r"already converted \(EnactAttention\)"):  # ENACT -> ACT
        act_encoder(enact)
    assert all(type(layer.self_attn) is EnactAttention for layer in enact.transformer.encoder.layers)
    native = build(tiny_config("detr_r50_300ep_act"))  # ActAttention from the config, never converted
    with pytest.raises(ValueError, match=r"already converted \(ActAttention\)"):
        act_encoder(native)
    with pytest.raises(ValueError, match=r"already converted \(ActAttention\)"):
        enact_encoder(native)
    rcda = build(tiny_config("anchor_detr_r50_dc5_50ep"))
    with pytest.raises(ValueError, match="MultiheadRCDA .*ACT has no RCDA form"):
        act_encoder(rcda)
    assert not any(isinstance(m, ActAttention) for m in rcda.modules())
    with pytest.raises(ValueError, match="no transformer.encoder"):
        act_encoder(nn.Linear(2, 2))
    for kwargs, what in (({"num_hashes": 0}, "num_hashes"), ({"bucket_width": 0.0}, "bucket_width"),
                         ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=what):
            act_encoder(base, **kwargs)
    assert all(type(layer.self_attn) is MultiheadAttention for layer in base.transformer.encoder.layers)
