# DETR R50 (C5): backbone, sine positions, post-norm transformer (6 + 6 layers, d=256, 8 heads,
# FFN 2048, dropout 0.1), 100 queries, CE + L1 + GIoU with auxiliary decoder losses.
# The encoder self-attention is the one entry to swap: model.transformer.encoder.attention.
from detectron2.config import LazyCall as L

from projects.enact.modeling.attention import MultiheadAttention
from projects.enact.modeling.backbone import build_resnet_backbone
from projects.enact.modeling.criterion import SetCriterion, aux_weight_dict
from projects.enact.modeling.detr import DETR
from projects.enact.modeling.matcher import HungarianMatcher
from projects.enact.modeling.position_encoding import PositionEmbeddingSine
from projects.enact.modeling.transformer import Transformer, TransformerDecoder, TransformerEncoder

model = L(DETR)(
    backbone=L(build_resnet_backbone)(depth=50, dilation=False, freeze_at=2, norm="FrozenBN"),
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, normalize=True),
    transformer=L(Transformer)(
        encoder=L(TransformerEncoder)(
            attention=L(MultiheadAttention)(embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1),
            num_layers=6, embed_dim=256, ffn_dim=2048, dropout=0.1,
        ),
        decoder=L(TransformerDecoder)(
            num_layers=6, embed_dim=256, num_heads=8, ffn_dim=2048, dropout=0.1, return_intermediate=True
        ),
    ),
    num_classes=80,
    num_queries=100,
    in_features="res5",
    in_channels=2048,
    embed_dim=256,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=1, cost_bbox=5, cost_giou=2),
        weight_dict=aux_weight_dict({"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 5),
        losses=("class", "boxes"),
        eos_coef=0.1,
    ),
    aux_loss=True,
    device="${train.device}",
)
