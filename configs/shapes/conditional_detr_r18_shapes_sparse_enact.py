# Sparse DETR's query sparsification and ENACT together: rho = 0.3 of the tokens are encoder queries
# (conditional_detr_r18_shapes_sparse.py) and they attend to ENACT's clusters of all valid tokens
# (the demo's EnactAttention, sigma = 2, as conditional_detr_r18_shapes_enact.py).  Differs from
# conditional_detr_r18_shapes_sparse.py only in the encoder attention.
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .conditional_detr_r18_shapes_sparse import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=128, num_heads=8, attn_drop=0.0, proj_drop=0.0, sigma=2
)
train.output_dir = "./output/shapes/conditional_detr_r18_sparse_enact"
