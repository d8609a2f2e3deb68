"""A detrex-style attention behind ``nn.MultiheadAttention``'s interface.

detrex's Anchor DETR with its dense encoder (``attention_type='nn.MultiheadAttention'``) holds
torch's ``nn.MultiheadAttention`` as ``self_attn``: called as ``(query, key, value,
key_padding_mask=...)``, returning a tuple, no residual, state-dict keys ``in_proj_weight``,
``in_proj_bias``, ``out_proj.*``.  :class:`TorchMultiheadAttentionAdapter` puts an attention with
detrex's ``MultiheadAttention`` signature (``EnactAttention``, ``ActAttention``) in its place.
"""
import torch
from torch import nn

__all__ = ["TorchMultiheadAttentionAdapter"]


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
