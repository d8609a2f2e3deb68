"""Put ENACT (or ACT) into the encoder of an already built detector: the public entry points.

This module only gathers them; each lives in the module of its concept:

* :mod:`.encoder_sites` -- finding an encoder's self-attentions and replacing them
  (:func:`replace_encoder_attention`, :func:`find_encoder`, :func:`encoder_self_attentions`,
  :class:`AttentionSpec`, :func:`check_encoder_options`);
* :mod:`.enact_adapter` -- ENACT: :func:`enact_encoder`, :func:`enact_attention_factory`,
  :class:`EnactPackedRCDA` (separable ENACT in place of detrex's ``MultiheadRCDA``, see
  :mod:`.separable_enact`), :func:`check_enact_options`;
* :mod:`.act_adapter` -- ACT: :func:`act_encoder`, :func:`act_attention_factory`,
  :func:`check_act_options`;
* :mod:`.torch_mha_adapter` -- :class:`TorchMultiheadAttentionAdapter` (``nn.MultiheadAttention``'s
  interface, for detrex Anchor DETR's dense encoder).

``from projects.enact.modeling.encoder_adapter import X`` keeps working for every name below.
"""
from .act_adapter import ACT_ENCODER_OPTIONS, act_attention_factory, act_encoder, check_act_options
from .enact_adapter import (
    ENACT_ENCODER_OPTIONS,
    EnactPackedRCDA,
    check_enact_options,
    enact_attention_factory,
    enact_encoder,
)
from .encoder_sites import (
    REPLACED_FLAG,
    AttentionSpec,
    check_encoder_options,
    encoder_self_attentions,
    find_encoder,
    replace_encoder_attention,
)
from .torch_mha_adapter import TorchMultiheadAttentionAdapter

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
