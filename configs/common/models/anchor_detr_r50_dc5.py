# Anchor DETR R50-DC5: row-column decoupled attention (RCDA) encoder and decoder, 300 anchor
# points x 3 patterns, FFN 1024, dropout 0, focal loss, weights class 2 / L1 5 / GIoU 2.
# The encoder is the entry to swap: model.transformer.encoder (RCDAEncoder, or a
# TransformerEncoder with MHSA / EnactAttention, or the separable ENACT-RCDA encoder).
from detectron2.config import LazyCall as L

from projects.enact.modeling.anchor_detr import AnchorDETR, AnchorDETRTransformer, RCDAEncoder
from projects.enact.modeling.backbone import build_resnet_backbone
from projects.enact.modeling.criterion import SetCriterion, aux_weight_dict
from projects.enact.modeling.matcher import HungarianMatcher

model = L(AnchorDETR)(
    backbone=L(build_resnet_backbone)(depth=50, dilation=True, freeze_at=2, norm="FrozenBN"),
    transformer=L(AnchorDETRTransformer)(
        encoder=L(RCDAEncoder)(num_layers=6, embed_dim=256, ffn_dim=1024, dropout=0.0, num_heads=8),
        num_decoder_layers=6, num_heads=8, ffn_dim=1024, dropout=0.0,
        num_anchors=300, num_patterns=3, anchor_prior="learned",
    ),
    num_classes=80,
    in_features="res5",
    in_channels=2048,
    embed_dim=256,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2, cost_bbox=5, cost_giou=2, use_focal=True),
        weight_dict=aux_weight_dict({"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 5),
        losses=("class", "boxes"),
        use_focal=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    aux_loss=True,
    device="${train.device}",
)
