# Anchor DETR R50-DC5, standard self-attention encoder + ACT (L = 32, r = 8); differs from
# anchor_detr_r50_dc5_50ep_mhsa.py only in the encoder attention, so its checkpoint loads as is.
from detectron2.config import LazyCall as L

from projects.enact import ActAttention

from .anchor_detr_r50_dc5_50ep_mhsa import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(ActAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, num_hashes=32, bucket_width=8.0, seed=0
)
train.output_dir = "./output/anchor_detr_r50_dc5_50ep_mhsa_act"
