# Anchor DETR R50-DC5 + ENACT (sigma = 3).  Anchor DETR's encoder is RCDA, whose keys are a grid:
# this uses separable ENACT (projects/enact/modeling/separable_enact.py) - columns clustered for the
# row branch, rows for the column branch, values pooled in the resulting rectangular blocks - so
# RCDA runs unchanged on an (H', W') grid.  ENACT on a standard MHSA encoder instead:
# anchor_detr_r50_dc5_50ep_mhsa_enact.py.
from detectron2.config import LazyCall as L

from projects.enact.modeling.enact_rcda import EnactRCDAEncoder

from .anchor_detr_r50_dc5_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder = L(EnactRCDAEncoder)(
    num_layers=6, embed_dim=256, ffn_dim=1024, dropout=0.0, num_heads=8, sigma=3
)
train.output_dir = "./output/anchor_detr_r50_dc5_50ep_enact"
