# Conditional DETR R50 + ENACT (sigma = 5).
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1, sigma=5
)
train.output_dir = "./output/conditional_detr_r50_50ep_enact"
