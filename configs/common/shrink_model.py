# shrink_model: the one override that makes a detector's model config (DETR, Conditional DETR or
# Anchor DETR with any encoder: TransformerEncoder with MultiheadAttention / EnactAttention, RCDA,
# separable ENACT-RCDA) small, in place.  Its defaults are the tiny model of the tests (R18
# without DC5, d = 32, 4 heads, 2 + 2 layers, FFN 64, 12 queries or 6 anchors x 2 patterns); the
# shapes demos' model is configs/common/shapes_model.py's shrink_for_shapes.  In a config:
#     from .common.shrink_model import shrink_model
# elsewhere (it is no module of a package):
#     shrink_model = LazyConfig.load("configs/common/shrink_model.py", "shrink_model")
import re
from typing import Optional

from projects.enact.modeling.criterion import aux_weight_dict

_AUX_SUFFIX = re.compile(r"_\d+$")
_STAGES = ("res2", "res3", "res4", "res5")


def backbone_channels(depth: int, feature: str) -> int:
    """Channels of ResNet-``depth``'s output ``feature`` ("res2" ... "res5")."""
    base = 64 if depth < 50 else 256
    return base * 2 ** _STAGES.index(feature)


def shrink_model(
    model,
    *,
    depth: int = 18,
    dilation: bool = False,
    embed_dim: int = 32,
    num_heads: int = 4,
    num_encoder_layers: int = 2,
    num_decoder_layers: int = 2,
    ffn_dim: int = 64,
    num_queries: int = 12,
    num_anchors: int = 6,
    num_patterns: int = 2,
    in_features: Optional[str] = None,
    norm: Optional[str] = None,
    freeze_at: Optional[int] = None,
    dropout: Optional[float] = None,
    num_classes: Optional[int] = None,
    select_box_nums_for_evaluation: Optional[int] = None,
):
    """Sets ``model``'s sizes and returns it.

    The backbone gets ``depth`` and ``dilation`` (DC5); ``in_features`` (e.g. "res4": the
    backbone stops there), ``norm``, ``freeze_at``, ``dropout`` (every dropout of the transformer,
    the encoder attention's included), ``num_classes`` and ``select_box_nums_for_evaluation``
    keep the config's values when None.  The encoder attention (any module configured with
    ``embed_dim`` and ``num_heads``: MultiheadAttention, EnactAttention, MultiheadRCDA, ...) keeps
    its type and other arguments (e.g. ENACT's sigma).  DETR and Conditional DETR get
    ``num_queries`` queries, Anchor DETR ``num_anchors`` x ``num_patterns``.  The loss weights
    keep their base values, with auxiliary ones for the ``num_decoder_layers - 1`` first layers.
    """
    # backbone
    model.backbone.update(depth=depth, dilation=dilation)
    if norm is not None:
        model.backbone.norm = norm
    if freeze_at is not None:
        model.backbone.freeze_at = freeze_at
    if in_features is not None:
        model.backbone.out_features = (in_features,)
        model.in_features = in_features
    model.in_channels = backbone_channels(depth, model.get("in_features", "res5"))
    model.embed_dim = embed_dim
    if "position_embedding" in model:  # DETR, Conditional DETR (Anchor DETR: in the transformer)
        model.position_embedding.num_pos_feats = embed_dim // 2
    drop = {} if dropout is None else {"dropout": dropout}

    # encoder: a prototype attention or, without one, its own num_heads
    encoder = model.transformer.encoder
    encoder.update(num_layers=num_encoder_layers, embed_dim=embed_dim, ffn_dim=ffn_dim, **drop)
    attention = encoder.get("attention")
    if attention is None:
        encoder.num_heads = num_heads
    else:
        attention.update(embed_dim=embed_dim, num_heads=num_heads)
        for key in ("attn_drop", "proj_drop", "dropout"):
            if dropout is not None and key in attention:
                attention[key] = dropout

    # decoder and queries
    if "decoder" in model.transformer:  # DETR, Conditional DETR
        model.transformer.decoder.update(
            num_layers=num_decoder_layers, embed_dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim, **drop
        )
        model.num_queries = num_queries
    else:  # Anchor DETR: the decoder layers are the transformer's own
        model.transformer.update(
            num_decoder_layers=num_decoder_layers, num_heads=num_heads, ffn_dim=ffn_dim,
            num_anchors=num_anchors, num_patterns=num_patterns, **drop,
        )

    if num_classes is not None:
        model.num_classes = num_classes
    if select_box_nums_for_evaluation is not None:
        model.select_box_nums_for_evaluation = select_box_nums_for_evaluation
    weights = {k: w for k, w in model.criterion.weight_dict.items() if not _AUX_SUFFIX.search(k)}
    model.criterion.weight_dict = aux_weight_dict(weights, num_decoder_layers - 1 if model.get("aux_loss", True) else 0)
    return model
