# Anchor DETR R50-DC5, standard self-attention encoder + ENACT (sigma = 3, the paper's value for
# Anchor DETR); differs from anchor_detr_r50_dc5_50ep_mhsa.py only in the encoder attention.
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .anchor_detr_r50_dc5_50ep_mhsa import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, sigma=3
)
train.output_dir = "./output/anchor_detr_r50_dc5_50ep_mhsa_enact"
