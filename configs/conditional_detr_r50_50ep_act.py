# Conditional DETR R50 + ACT (L = 32, r = 8): training-free on a trained baseline checkpoint
# (--eval-only train.init_checkpoint=...; ACT adds no parameters).
from detectron2.config import LazyCall as L

from projects.enact import ActAttention

from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(ActAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1, num_hashes=32, bucket_width=8.0, seed=0
)
train.output_dir = "./output/conditional_detr_r50_50ep_act"
