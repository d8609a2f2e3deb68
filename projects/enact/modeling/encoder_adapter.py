"""Put ENACT (or another clustered attention) into the encoder of an already built detector.

``replace_encoder_attention(encoder, factory)`` finds the self-attentions of an encoder and
replaces each by ``factory(spec)``, carrying the trained projection weights over.  It knows three
kinds of encoder self-attention, all found by duck typing (detrex itself is not imported here):

* detrex's ``MultiheadAttention`` (``layers[i].attentions[j]`` of a ``BaseTransformerLayer`` whose
  ``operation_order`` names it ``self_attn``; DETR, Conditional DETR, DAB-DETR, DN-DETR, Group
  DETR, ...): replaced by ``factory(spec)`` directly (same call signature and ``attn.*`` keys);
* torch's ``nn.MultiheadAttention`` held as ``self_attn`` (detrex Anchor DETR's MHSA encoder):
  ``factory(spec)`` wrapped in :class:`TorchMultiheadAttentionAdapter`, which keeps torch's call
  signature (tuple return, no residual) and state-dict keys (``in_proj_weight``, ``out_proj.*``);
* detrex's ``MultiheadRCDA`` held as ``self_attn`` (Anchor DETR's default encoder): replaced by
  ``rcda_factory(module)`` (for ENACT: :class:`EnactPackedRCDA`, separable ENACT; ACT has no RCDA
  form, so :func:`act_encoder` refuses such an encoder).

The decoder is never touched.  An encoder without such attentions, or one already converted,
is an error naming what was found.  ``factory`` may build any module with detrex's
``MultiheadAttention`` signature (``EnactAttention``, ``ActAttention``, ...).  Two factories are
given: :func:`enact_attention_factory` (used by :func:`enact_encoder`) and
:func:`act_attention_factory` (used by :func:`act_encoder`, ACT's per-layer hash projections seeded
from ``seed`` and ``spec.layer_index``).  A converted model (ENACT or ACT, or anything put in by
this file) is refused by both: never a double wrap.
"""
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import enact_ops

from .act import ActAttention
from .attention import check_attn_implementation
from .enact import CLUSTERING_MODES, EnactAttention, EnactClustering, check_sigma
from .pnp import is_token_sampler_transformer, use_raster_order
from .rcda import rcda_combine, rcda_weights

__all__ = [
    "ACT_ENCODER_OPTIONS",
    "AttentionSpec",
    "ENACT_ENCODER_OPTIONS",
    "EnactPackedRCDA",
    "TorchMultiheadAttentionAdapter",
    "act_attention_factory",
    "act_encoder",
    "check_act_options",
    "check_encoder_options",
    "check_enact_options",
    "enact_attention_factory",
    "enact_encoder",
    "encoder_self_attentions",
    "find_encoder",
    "replace_encoder_attention",
]

# set on every module this file puts into a model: converting twice is an error
REPLACED_FLAG = "_replaced_encoder_attention"


class AttentionSpec(NamedTuple):
    """What a factory needs to build the replacement of one encoder self-attention."""

    embed_dim: int
    num_heads: int
    attn_drop: float
    proj_drop: float
    batch_first: bool
    attn_implementation: str = "sdpa"
    layer_index: int = 0  # the position of this attention among those replaced (ACT seeds by it)


class TorchMultiheadAttentionAdapter(nn.Module):
    """``nn.MultiheadAttention``'s interface around a detrex-style attention ``inner``:
    ``forward(query, key, value, key_padding_mask=None, ...) -> (out, None)`` without residual, and
    the state-dict keys of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.*``; ``inner``'s other parameters keep their names, e.g. ``clustering.w_prob.*``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.batch_first = inner.batch_first
        self._register_state_dict_hook(TorchMultiheadAttentionAdapter._save_hook)
        self._register_load_state_dict_pre_hook(self._load_hook)
        self.register_load_state_dict_post_hook(TorchMultiheadAttentionAdapter._rename_missing)

    @staticmethod
    def _save_hook(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + "inner.")]:
            rest = key[len(prefix + "inner."):]
            rest = rest[len("attn."):] if rest.startswith("attn.") else rest
            state_dict[prefix + rest] = state_dict.pop(key)
        return state_dict

    def _load_hook(self, state_dict, prefix, *args):
        self._load_prefix = prefix
        own = {k[len("attn."):] if k.startswith("attn.") else k: k for k in self.inner.state_dict()}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest in own:
                state_dict[prefix + "inner." + own[rest]] = state_dict.pop(key)

    @staticmethod
    def _rename_missing(module, incompatible):
        """Missing keys under their state-dict names (``...self_attn.clustering.w_prob.weight``)."""
        inner = getattr(module, "_load_prefix", "") + "inner."
        keys = incompatible.missing_keys
        keys[:] = [inner[:-len("inner.")] + k[len(inner):].removeprefix("attn.") if k.startswith(inner) else k
                   for k in keys]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        # nn.MultiheadAttention has no residual: identity = 0.  An encoder self-attention (the only
        # place this adapter is put): the queries are the keys' positions, so the keys' padding is
        # the queries' (ACT leaves padded queries out of its clusters; detrex's Anchor DETR builds
        # query and key as two equal tensors, so ACT cannot see that they are the same)
        extra = {}
        if key_padding_mask is not None and query.shape[:2] == key.shape[:2]:
            extra["query_padding_mask"] = key_padding_mask
        out = self.inner(query, key, value, identity=torch.zeros_like(query), attn_mask=attn_mask,
                         key_padding_mask=key_padding_mask, **extra)
        return out, None

    def statistics(self) -> dict:
        return self.inner.statistics() if hasattr(self.inner, "statistics") else {}


class EnactPackedRCDA(nn.Module):
    """Separable ENACT (see :mod:`.enact_rcda`) with the parameters and call signature of detrex's
    ``MultiheadRCDA`` (Anchor DETR): ``in_proj_weight`` (5C, C) packing q_row, q_col, k_row, k_col,
    v; ``in_proj_bias``; ``out_proj``; plus ``cluster_x`` / ``cluster_y`` (``w_prob`` each).

    ``forward(query_row, query_col, key_row, key_col, value, key_padding_mask=None, ...)`` with
    query_* (B, L, C), key_* and value (B, H, W, C), key_padding_mask (B, H, W) True = pad, returns
    ``(out (L, B, C), None)`` as detrex's does.  Keys are averaged over all pixels as detrex does
    (``key_row`` over H: column keys, ``key_col`` over W: row keys), then clustered per axis.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 sigma: int = 3, mode: str = "segments", backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.cluster_x = EnactClustering(embed_dim, sigma, mode, backend)
        self.cluster_y = EnactClustering(embed_dim, sigma, mode, backend)
        self.last_num_tokens: Optional[torch.Tensor] = None

    @classmethod
    def from_module(cls, rcda: nn.Module, sigma: int = 3, mode: str = "segments", backend: str = "auto"):
        """Build from a detrex ``MultiheadRCDA`` (weights copied; its options checked)."""
        if getattr(rcda, "in_proj_weight", None) is None or getattr(rcda, "bias_k_row", None) is not None \
                or getattr(rcda, "add_zero_attn", False):
            raise ValueError(f"{type(rcda).__name__}: only packed projections without bias_k / add_zero_attn are supported")
        new = cls(rcda.embed_dim, rcda.num_heads, rcda.dropout, rcda.in_proj_bias is not None, sigma, mode, backend)
        return new.to(rcda.in_proj_weight.device, rcda.in_proj_weight.dtype)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, ..., C) -> (B, n, ..., d)
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim).movedim(-2, 1)

    def forward(self, query_row, query_col, key_row, key_col, value, key_padding_mask=None, **kwargs):
        from .enact_rcda import cluster_grid  # here: enact_rcda needs detectron2, projects.enact does not

        b, h, w, c = value.shape
        weights = self.in_proj_weight.chunk(5)
        biases = self.in_proj_bias.chunk(5) if self.in_proj_bias is not None else (None,) * 5
        pad_x = pad_y = None
        if key_padding_mask is not None:  # rectangular pads: first row / column give them
            pad_x, pad_y = key_padding_mask[:, 0, :], key_padding_mask[:, :, 0]
        # pooling then projecting = projecting then pooling (affine, weights sum to one)
        grid = cluster_grid(self.cluster_x, self.cluster_y, key_row.mean(1), key_col.mean(2), value, pad_x, pad_y)
        a_x, a_y = rcda_weights(
            self._split(F.linear(query_row, weights[0], biases[0])),
            self._split(F.linear(query_col, weights[1], biases[1])),
            self._split(F.linear(grid.key_x, weights[2], biases[2])),
            self._split(F.linear(grid.key_y, weights[3], biases[3])),
            grid.mask_x,
            grid.mask_y,
        )
        if self.training and self.dropout > 0.0:
            a_x, a_y = F.dropout(a_x, p=self.dropout), F.dropout(a_y, p=self.dropout)
        v = self._split(F.linear(grid.value, weights[4], biases[4]))  # (B, n, H', W', d)
        out = self.out_proj(rcda_combine(a_x, a_y, v).movedim(1, -2).flatten(-2))  # (B, L, C)
        self.last_num_tokens = (torch.full((b,), h * w, device=value.device) if key_padding_mask is None
                                else (~key_padding_mask).sum((1, 2)).detach())
        return out.transpose(0, 1), None

    def statistics(self) -> dict:
        """Of the last call: clusters per image H' W' and compression N / M (means over images)."""
        cx, cy = self.cluster_x, self.cluster_y
        if self.last_num_tokens is None or cx.last_num_clusters is None or cy.last_num_clusters is None:
            return {}
        m = cx.last_num_clusters.double() * cy.last_num_clusters.double()
        return {"clusters_per_image": float(m.mean()),
                "compression": float((self.last_num_tokens.double() / m).mean())}


def enact_attention_factory(sigma: int = 5, mode: str = "segments", backend: str = "auto", **options) -> Callable:
    """The factory ``replace_encoder_attention`` calls for ENACT: spec -> EnactAttention."""

    def factory(spec: AttentionSpec) -> nn.Module:
        kwargs = dict(attn_implementation=spec.attn_implementation)
        kwargs.update(options)
        return EnactAttention(spec.embed_dim, spec.num_heads, spec.attn_drop, spec.proj_drop, spec.batch_first,
                              sigma=sigma, mode=mode, backend=backend, **kwargs)

    return factory


def act_attention_factory(num_hashes: int = 32, bucket_width: float = 8.0, seed: int = 0, **options) -> Callable:
    """The factory ``replace_encoder_attention`` calls for ACT: spec -> ActAttention whose hash
    projections are drawn for layer ``spec.layer_index`` (the position of the attention among those
    replaced, 0, 1, ... in encoder order: the numbering ``EncoderStack`` gives a project model's
    layers, so converting a baseline gives the projections of the ACT config with the same seed)."""
    # checked once here, before anything is replaced (ActAttention checks them again)
    ActAttention(8, 1, num_hashes=num_hashes, bucket_width=bucket_width, seed=seed)

    def factory(spec: AttentionSpec) -> nn.Module:
        kwargs = dict(attn_implementation=spec.attn_implementation)
        kwargs.update(options)
        module = ActAttention(spec.embed_dim, spec.num_heads, spec.attn_drop, spec.proj_drop, spec.batch_first,
                              num_hashes=num_hashes, bucket_width=bucket_width, seed=seed, **kwargs)
        module.set_layer_index(spec.layer_index)
        return module

    return factory


# ---------------------------------------------------------------- finding and replacing
class _Site(NamedTuple):
    parent: nn.Module
    slot: object  # int (ModuleList index) or attribute name
    name: str
    module: nn.Module


def _encoder_sites(encoder: nn.Module) -> List[_Site]:
    """Every self-attention slot of ``encoder``: ``attentions[j]`` of layers with an
    ``operation_order`` (only the ``self_attn`` entries) and ``self_attn`` attributes."""
    sites = []
    for name, mod in encoder.named_modules():
        prefix = f"{name}." if name else ""
        attentions, order = getattr(mod, "attentions", None), getattr(mod, "operation_order", None)
        if isinstance(attentions, nn.ModuleList) and order is not None:
            ops = [op for op in order if op in ("self_attn", "cross_attn")]
            for j, (op, attn) in enumerate(zip(ops, attentions)):
                if op == "self_attn":
                    sites.append(_Site(attentions, j, f"{prefix}attentions.{j}", attn))
        attn = mod._modules.get("self_attn")
        if attn is not None:
            sites.append(_Site(mod, "self_attn", f"{prefix}self_attn", attn))
    return sites


def encoder_self_attentions(encoder: nn.Module) -> List[nn.Module]:
    """The self-attention modules of ``encoder`` in encoder order, of whatever kind (the slots
    :func:`replace_encoder_attention` replaces; e.g. for tools that hook them)."""
    return [site.module for site in _encoder_sites(encoder)]


def _kind(module: nn.Module) -> str:
    if getattr(module, REPLACED_FLAG, False) or isinstance(module, (TorchMultiheadAttentionAdapter, EnactPackedRCDA)) \
            or any(hasattr(module, a) for a in ("clustering", "cluster_x", "hash_a")):  # ENACT, separable ENACT, ACT
        return "replaced"
    if isinstance(module, nn.MultiheadAttention):
        return "torch"
    if type(module).__name__ == "MultiheadRCDA" and getattr(module, "in_proj_weight", None) is not None:
        return "rcda"
    inner = getattr(module, "attn", None)
    if isinstance(inner, nn.MultiheadAttention) and type(module).__name__ == "MultiheadAttention" \
            and hasattr(module, "proj_drop"):
        return "detrex"
    return "other"


def _load_weights(new: nn.Module, old_state: dict, what: str) -> None:
    result = new.load_state_dict(old_state, strict=False)
    lost = [k for k in result.missing_keys if k in old_state]
    if result.unexpected_keys or lost:
        raise RuntimeError(f"{what}: weights do not carry over (unexpected {result.unexpected_keys}, lost {lost})")


def _class_name(module: nn.Module) -> str:
    inner = getattr(module, "inner", None)
    return f"{type(module).__name__}({type(inner).__name__})" if isinstance(inner, nn.Module) else type(module).__name__


def _encoder_attention_classes(encoder: nn.Module) -> List[str]:
    """The attention classes of an encoder without a self-attention slot, as its refusal names
    them: the deformable ones when there are any (what mixes the encoder's tokens, e.g.
    Focus-DETR's MultiScaleDeformableAttention beside a MultiheadAttention over the tokens it
    selects), else every module whose class name says attention."""
    names = sorted({type(m).__name__ for m in encoder.modules()
                    if "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()})
    deformable = [n for n in names if "deform" in n.lower()]
    return deformable or names


def replace_encoder_attention(
    encoder: nn.Module,
    factory: Callable[[AttentionSpec], nn.Module],
    rcda_factory: Optional[Callable[[nn.Module], nn.Module]] = None,
    owner: str = "",
    label: str = "ENACT",
) -> List[str]:
    """Replace, in place, every self-attention of ``encoder`` (see the module docstring) by
    ``factory(spec)`` (or ``rcda_factory(module)`` for an RCDA one), copying the trained weights.
    Returns the replaced modules' names.  Raises ``ValueError`` (before replacing anything) if the
    encoder was already converted, has no attention of a supported kind (naming the classes found)
    or has RCDA attentions and no ``rcda_factory``; ``label`` names the replacement in the errors."""
    owner = owner or type(encoder).__name__
    sites = _encoder_sites(encoder)
    kinds = [_kind(s.module) for s in sites]
    if "replaced" in kinds:
        done = sorted({_class_name(s.module) for s, k in zip(sites, kinds) if k == "replaced"})
        raise ValueError(f"{owner}: the encoder's self-attentions are already converted ({', '.join(done)}); "
                         "convert the original model only once")
    rcda = [s for s, k in zip(sites, kinds) if k == "rcda" or (k == "other" and "RCDA" in type(s.module).__name__)]
    if rcda and rcda_factory is None:
        raise ValueError(f"{owner}: the encoder's self-attentions are {type(rcda[0].module).__name__} (row-column "
                         f"attention, Anchor DETR's default) and {label} has no RCDA form; use Anchor DETR's dense "
                         "self-attention encoder (detrex: model.transformer.attention_type='nn.MultiheadAttention'; "
                         "this project: configs/anchor_detr_r50_dc5_50ep_mhsa.py)")
    others = sorted({type(s.module).__name__ for s, k in zip(sites, kinds) if k == "other"})
    if not sites or others:
        accepted = ("detrex's MultiheadAttention or torch's nn.MultiheadAttention" if rcda_factory is None else
                    "detrex's MultiheadAttention, torch's nn.MultiheadAttention or detrex's MultiheadRCDA")
        if others:
            what = f"its encoder self-attention is {', '.join(others)}"
        else:
            found = _encoder_attention_classes(encoder)
            what = f"its encoder has {', '.join(found)}" if found else "its encoder has no attention module"
        raise ValueError(f"{owner}: {what}, not a dense self-attention ({label} replaces an encoder self-attention "
                         f"that is {accepted})")
    names = []
    for index, (site, kind) in enumerate(zip(sites, kinds)):
        old = site.module
        if kind == "rcda":
            new = rcda_factory(old)
        else:
            mha = old if kind == "torch" else old.attn
            batch_first = bool(getattr(old, "batch_first", mha.batch_first))
            spec = AttentionSpec(mha.embed_dim, mha.num_heads, float(mha.dropout),
                                 float(old.proj_drop.p) if kind == "detrex" else 0.0, batch_first,
                                 getattr(old, "attn_implementation", "sdpa"), index)
            new = factory(spec)
            if kind == "torch":
                new = TorchMultiheadAttentionAdapter(new)
        param = next(old.parameters())
        new = new.to(param.device, param.dtype)
        _load_weights(new, old.state_dict(), f"{owner}.{site.name}")
        new.train(old.training)
        setattr(new, REPLACED_FLAG, True)
        if isinstance(site.slot, int):
            site.parent[site.slot] = new
        else:
            setattr(site.parent, site.slot, new)
        names.append(site.name)
    return names


def find_encoder(model: nn.Module) -> nn.Module:
    """The encoder of a detector: ``model.transformer.encoder`` (detrex's DETR family) or
    ``model.transformer.encoder_layers`` (detrex's Anchor DETR: its spatial layers; the
    multi-level layers, when any, attend across levels and are not replaced)."""
    model = getattr(model, "module", model)  # DDP
    transformer = getattr(model, "transformer", model)
    for name in ("encoder", "encoder_layers"):
        encoder = getattr(transformer, name, None)
        if isinstance(encoder, nn.Module):
            return encoder
    raise ValueError(f"{type(model).__name__}: no transformer.encoder (or transformer.encoder_layers) found")


ENACT_ENCODER_OPTIONS = ("sigma", "mode", "backend", "attn_implementation")
ACT_ENCODER_OPTIONS = ("num_hashes", "bucket_width", "seed", "attn_implementation")


def check_encoder_options(entry: str, options: dict, accepted: Sequence[str]) -> None:
    """A ``TypeError`` naming ``entry`` (e.g. ``enact_encoder``), the unknown keywords and the
    accepted ones, for an option that would otherwise fail deep inside an attention's constructor."""
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"{entry}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(accepted)}")


def check_enact_options(entry: str, sigma, mode, backend, attn_implementation) -> None:
    """ENACT's arguments checked before anything is replaced: a ``ValueError`` naming ``entry``, the
    argument and what it accepts."""
    try:
        check_sigma(sigma)
        if mode not in CLUSTERING_MODES:
            raise ValueError(f"mode must be one of {CLUSTERING_MODES}, got {mode!r}")
        if backend not in enact_ops.BACKENDS:
            raise ValueError(f"backend must be one of {enact_ops.BACKENDS}, got {backend!r}")
        check_attn_implementation(attn_implementation)
    except ValueError as e:
        raise ValueError(f"{entry}: {e}") from None


def check_act_options(entry: str, num_hashes, bucket_width, seed, attn_implementation) -> None:
    """ACT's arguments checked before anything is replaced (as :func:`check_enact_options`)."""
    try:
        ActAttention(8, 1, num_hashes=num_hashes, bucket_width=bucket_width, seed=seed)
        check_attn_implementation(attn_implementation)
    except ValueError as e:
        raise ValueError(f"{entry}: {e}") from None


def _find_encoder(entry: str, model: nn.Module) -> nn.Module:
    try:
        return find_encoder(model)
    except ValueError as e:
        raise ValueError(f"{entry}: {e}") from None


def enact_encoder(model: nn.Module, sigma: int = 5, mode: str = "segments", **options) -> nn.Module:
    """Turn the encoder self-attentions of a built detrex-style detector into ENACT, in place,
    keeping the trained projection weights (only ``w_prob`` is new); the decoder is untouched.

    detrex ``MultiheadAttention`` -> ``EnactAttention``; ``nn.MultiheadAttention`` (Anchor DETR
    MHSA) -> ``EnactAttention`` behind :class:`TorchMultiheadAttentionAdapter`; ``MultiheadRCDA``
    -> :class:`EnactPackedRCDA` (separable ENACT).  ``options``: ``backend``,
    ``attn_implementation``.  ``mode="identity"`` gives a model equal to the original.
    PnP-DETR (a transformer whose ``sampler`` pools background tokens): its encoder then gets the
    sampled tokens in raster order and keeps the pooled ones unclustered (:mod:`.pnp`).
    Returns ``model``.  Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad
    value, a model without a dense self-attention encoder (e.g. deformable attention, naming its
    class) or one already converted; every message starts with ``enact_encoder``.
    """
    check_encoder_options("enact_encoder", options, ENACT_ENCODER_OPTIONS[2:])
    backend = options.pop("backend", "auto")
    check_enact_options("enact_encoder", sigma, mode, backend, options.get("attn_implementation", "sdpa"))
    entry = f"enact_encoder({type(getattr(model, 'module', model)).__name__})"
    replace_encoder_attention(
        _find_encoder("enact_encoder", model),
        enact_attention_factory(sigma, mode, backend, **options),
        lambda rcda: EnactPackedRCDA.from_module(rcda, sigma, mode, backend),
        owner=entry,
    )
    transformer = getattr(getattr(model, "module", model), "transformer", None)
    if transformer is not None and is_token_sampler_transformer(transformer):
        use_raster_order(transformer)  # PnP-DETR: sampled tokens in raster order (see .pnp)
    return model


def act_encoder(model: nn.Module, num_hashes: int = 32, bucket_width: float = 8.0, seed: int = 0,
                **options) -> nn.Module:
    """Turn the encoder self-attentions of a built detrex-style detector into ACT
    (:class:`~projects.enact.modeling.act.ActAttention`, the ENACT paper's comparator), in place, as
    :func:`enact_encoder` does: detrex ``MultiheadAttention`` -> ``ActAttention``;
    ``nn.MultiheadAttention`` (Anchor DETR MHSA) -> ``ActAttention`` behind
    :class:`TorchMultiheadAttentionAdapter`.  ACT adds no parameters: every trained weight is
    carried over; only the buffers ``hash_a`` / ``hash_b`` are new, drawn for the k-th replaced
    attention from ``seed`` and layer index k (distinct in every layer, deterministic).
    ``options``: ``attn_implementation``.  Returns ``model``.  Raises ``TypeError`` for an unknown
    option and ``ValueError`` for an RCDA encoder (ACT has no RCDA form), a model without a dense
    self-attention encoder, bad ACT arguments, or a model already converted (to ACT or ENACT);
    every message starts with ``act_encoder``.
    """
    check_encoder_options("act_encoder", options, ACT_ENCODER_OPTIONS[3:])
    check_act_options("act_encoder", num_hashes, bucket_width, seed, options.get("attn_implementation", "sdpa"))
    replace_encoder_attention(
        _find_encoder("act_encoder", model),
        act_attention_factory(num_hashes, bucket_width, seed, **options),
        None,
        owner=f"act_encoder({type(getattr(model, 'module', model)).__name__})",
        label="ACT",
    )
    return model
