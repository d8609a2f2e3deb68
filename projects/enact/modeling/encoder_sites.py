"""Finding the self-attentions of a built detector's encoder, and replacing them.

``replace_encoder_attention(encoder, factory)`` finds the self-attentions of an encoder and
replaces each by ``factory(spec)``, carrying the trained projection weights over.  It knows three
kinds of encoder self-attention, all found by duck typing (detrex itself is not imported here):

* detrex's ``MultiheadAttention`` (``layers[i].attentions[j]`` of a ``BaseTransformerLayer`` whose
  ``operation_order`` names it ``self_attn``; DETR, Conditional DETR, DAB-DETR, DN-DETR, Group
  DETR, ...): replaced by ``factory(spec)`` directly (same call signature and ``attn.*`` keys);
* torch's ``nn.MultiheadAttention`` held as ``self_attn`` (detrex Anchor DETR's MHSA encoder):
  ``factory(spec)`` wrapped in :class:`~.torch_mha_adapter.TorchMultiheadAttentionAdapter`, which
  keeps torch's call signature and state-dict keys;
* detrex's ``MultiheadRCDA`` held as ``self_attn`` (Anchor DETR's default encoder): replaced by
  ``rcda_factory(module)`` (ENACT's is :func:`~.enact_adapter.enact_rcda_factory`; ACT has no
  RCDA form, so ``act_encoder`` refuses such an encoder).

The decoder is never touched.  An encoder without such attentions, or one already converted,
is an error naming what was found.  ``factory`` may build any module with detrex's
``MultiheadAttention`` signature (``EnactAttention``, ``ActAttention``, ...).  A converted model
(anything put in by this module) is refused: never a double wrap.
"""
from typing import Callable, List, NamedTuple, Optional, Sequence

from torch import nn

from .torch_mha_adapter import TorchMultiheadAttentionAdapter

__all__ = [
    "AttentionSpec",
    "REPLACED_FLAG",
    "check_encoder_options",
    "encoder_self_attentions",
    "find_encoder",
    "replace_encoder_attention",
]

# set on every module replace_encoder_attention puts into a model: converting twice is an error
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


# ---------------------------------------------------------------- finding
def find_encoder(model: nn.Module, entry: str = "") -> nn.Module:
    """The encoder of a detector: ``model.transformer.encoder`` (detrex's DETR family) or
    ``model.transformer.encoder_layers`` (detrex's Anchor DETR: its spatial layers; the
    multi-level layers, when any, attend across levels and are not replaced).  A ``ValueError``
    when there is none (its message prefixed with ``entry``, e.g. ``enact_encoder``, if given)."""
    model = getattr(model, "module", model)  # DDP
    transformer = getattr(model, "transformer", model)
    for name in ("encoder", "encoder_layers"):
        encoder = getattr(transformer, name, None)
        if isinstance(encoder, nn.Module):
            return encoder
    prefix = f"{entry}: " if entry else ""
    raise ValueError(f"{prefix}{type(model).__name__}: no transformer.encoder (or transformer.encoder_layers) found")


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
    if getattr(module, REPLACED_FLAG, False) or isinstance(module, TorchMultiheadAttentionAdapter) \
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


# ---------------------------------------------------------------- replacing
def _load_weights(new: nn.Module, old_state: dict, what: str) -> None:
    result = new.load_state_dict(old_state, strict=False)
    lost = [k for k in result.missing_keys if k in old_state]
    if result.unexpected_keys or lost:
        raise RuntimeError(f"{what}: weights do not carry over (unexpected {result.unexpected_keys}, lost {lost})")


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


def check_encoder_options(entry: str, options: dict, accepted: Sequence[str]) -> None:
    """A ``TypeError`` naming ``entry`` (e.g. ``enact_encoder``), the unknown keywords and the
    accepted ones, for an option that would otherwise fail deep inside an attention's constructor."""
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"{entry}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(accepted)}")
