"""ACT (the ENACT paper's comparator, :mod:`.act`) into a built detector's encoder: :func:`act_encoder`.

As :mod:`.enact_adapter` does for ENACT, through :func:`~.encoder_sites.replace_encoder_attention`:
detrex's ``MultiheadAttention`` -> ``ActAttention``; torch's ``nn.MultiheadAttention`` (detrex
Anchor DETR's dense encoder) -> ``ActAttention`` behind ``TorchMultiheadAttentionAdapter``.  ACT has
no RCDA form: an RCDA encoder is refused.  ACT adds no parameters; its hash projections (buffers)
are drawn per layer from ``seed`` and the layer's position among those replaced.
"""
from typing import Callable, List

from torch import nn

from .act import ActAttention
from .attention import check_attn_implementation
from .encoder_sites import AttentionSpec, check_encoder_options, find_encoder, replace_encoder_attention

__all__ = ["ACT_ENCODER_OPTIONS", "act_attention_factory", "act_encoder", "check_act_options", "replace_with_act"]

ACT_ENCODER_OPTIONS = ("num_hashes", "bucket_width", "seed", "attn_implementation")


def check_act_options(entry: str, num_hashes, bucket_width, seed, attn_implementation) -> None:
    """ACT's arguments checked before anything is replaced: a ``ValueError`` naming ``entry``, the
    argument and what it accepts."""
    try:
        ActAttention(8, 1, num_hashes=num_hashes, bucket_width=bucket_width, seed=seed)
        check_attn_implementation(attn_implementation)
    except ValueError as e:
        raise ValueError(f"{entry}: {e}") from None


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


def replace_with_act(encoder: nn.Module, num_hashes: int, bucket_width: float, seed: int, owner: str,
                     **options) -> List[str]:
    """ACT in every self-attention of ``encoder`` (arguments checked by the caller; an RCDA
    encoder is refused); returns the replaced modules' names."""
    return replace_encoder_attention(encoder, act_attention_factory(num_hashes, bucket_width, seed, **options), None,
                                     owner=owner, label="ACT")


def act_encoder(model: nn.Module, num_hashes: int = 32, bucket_width: float = 8.0, seed: int = 0,
                **options) -> nn.Module:
    """Turn the encoder self-attentions of a built detrex-style detector into ACT
    (:class:`~projects.enact.modeling.act.ActAttention`, the ENACT paper's comparator), in place, as
    ``enact_encoder`` does: detrex ``MultiheadAttention`` -> ``ActAttention``;
    ``nn.MultiheadAttention`` (Anchor DETR MHSA) -> ``ActAttention`` behind
    ``TorchMultiheadAttentionAdapter``.  ACT adds no parameters: every trained weight is
    carried over; only the buffers ``hash_a`` / ``hash_b`` are new, drawn for the k-th replaced
    attention from ``seed`` and layer index k (distinct in every layer, deterministic).
    ``options``: ``attn_implementation``.  Returns ``model``.  Raises ``TypeError`` for an unknown
    option and ``ValueError`` for an RCDA encoder (ACT has no RCDA form), a model without a dense
    self-attention encoder, bad ACT arguments, or a model already converted (to ACT or ENACT);
    every message starts with ``act_encoder``.
    """
    check_encoder_options("act_encoder", options, ACT_ENCODER_OPTIONS[3:])
    check_act_options("act_encoder", num_hashes, bucket_width, seed, options.get("attn_implementation", "sdpa"))
    owner = f"act_encoder({type(getattr(model, 'module', model)).__name__})"
    replace_with_act(find_encoder(model, "act_encoder"), num_hashes, bucket_width, seed, owner, **options)
    return model
