"""ENACT in PnP-DETR's encoder: the sampled tokens in raster order, the pooled ones kept apart.

PnP-DETR's transformer (detrex ``projects/pnp_detr``) does not give its encoder the feature map:
its ``sampler`` (``SortSampler``) returns

    src (S + T, B, C)   the S = max_b(sampled) tokens of highest score, *ordered by score*
                        (``sort_confidence_topk``, (B, S): their raster indices), then the T
                        (``unsample_abstract_number``, 30) background tokens pooled from the rest
    mask (B, S + T)     True = pad (the sampled slots past an image's own count; never the pooled)
    pos (S + T, B, C)   their position embeddings (the pooled ones: pooled too)

ENACT clusters runs of equal curvature sign along the token order, so a sequence ordered by score
would make clusters of tokens that merely score alike.  :func:`raster_order_sampler` (a forward
hook on the sampler) puts every image's sampled tokens back into raster order (its pads stay after
them), which is the order ENACT assumes; note that a subset of the feature map is still not
contiguous in the image: two neighbours in that order may lie far apart (a run never spans the
dropped tokens' place, it simply skips them).  The T pooled tokens have no place in the image:
they are not clustered, each stays one key and value of its own (``EnactAttention.unclustered_tail
= T``), and ENACT's statistics count the sampled tokens only.  With ``mode="identity"`` the
model equals detrex's (the encoder and the decoder's cross-attention do not depend on the order of
their keys; float sums may differ in the last bits).

Nothing here imports detrex: the transformer is recognised by its ``sampler`` with an
``unsample_abstract_number``.
"""
from typing import Tuple

import torch
from torch import nn

__all__ = ["is_token_sampler_transformer", "raster_order_sampler", "use_raster_order"]

HOOK_FLAG = "_enact_raster_order_hook"


def is_token_sampler_transformer(transformer: nn.Module) -> bool:
    """Whether ``transformer`` is PnP-DETR's (a ``sampler`` that pools ``unsample_abstract_number`` tokens)."""
    sampler = getattr(transformer, "sampler", None)
    return isinstance(sampler, nn.Module) and isinstance(getattr(sampler, "unsample_abstract_number", None), int)


def raster_order_sampler(module: nn.Module, inputs, output: Tuple) -> Tuple:
    """Forward hook of PnP-DETR's ``SortSampler``: its output with every image's sampled tokens
    (src, pos, mask and ``sort_confidence_topk``) in raster order, pads after them; the pooled
    tokens and the regularisation loss unchanged."""
    src, reg_loss, topk, mask, pos = output
    s = topk.shape[1]  # S: sampled slots
    pad = mask[:, :s]  # (B, S) True = pad slot
    key = topk.masked_fill(pad, torch.iinfo(topk.dtype).max)  # pads last, in their order (stable)
    order = key.sort(dim=1, stable=True).indices  # (B, S)
    index = order.t().unsqueeze(-1).expand(-1, -1, src.shape[-1])  # (S, B, C)
    src = torch.cat([src[:s].gather(0, index), src[s:]])
    pos = torch.cat([pos[:s].gather(0, index), pos[s:]])
    mask = torch.cat([pad.gather(1, order), mask[:, s:]], dim=1)
    return src, reg_loss, topk.gather(1, order), mask, pos


def use_raster_order(transformer: nn.Module) -> int:
    """For PnP-DETR's ``transformer`` whose encoder attentions were converted to ENACT: its sampler
    hands the encoder the sampled tokens in raster order, and every ``EnactAttention`` of the
    encoder keeps the pooled tokens unclustered.  Returns T, the pooled tokens per image."""
    from .enact import EnactAttention

    sampler = transformer.sampler
    tail = int(sampler.unsample_abstract_number)
    for module in transformer.encoder.modules():
        if isinstance(module, EnactAttention):
            module.unclustered_tail = tail
    if not getattr(sampler, HOOK_FLAG, False):
        sampler.register_forward_hook(raster_order_sampler)
        setattr(sampler, HOOK_FLAG, True)
    return tail
