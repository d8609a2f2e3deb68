# DETR R50 + ENACT: the baseline with ENACT as the encoder self-attention (sigma = 5).
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .detr_r50_300ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1, sigma=5
)
train.output_dir = "./output/detr_r50_300ep_enact"
