# The demo (`make demo`): small Conditional DETR + ENACT on the shapes dataset; differs from
# conditional_detr_r18_shapes.py only in the encoder attention (sigma = 2: the demo's maps have
# ~250 tokens, a fifth of COCO's at stride 32).
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .conditional_detr_r18_shapes import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=128, num_heads=8, attn_drop=0.0, proj_drop=0.0, sigma=2
)
train.output_dir = "./output/shapes/conditional_detr_r18_enact"
