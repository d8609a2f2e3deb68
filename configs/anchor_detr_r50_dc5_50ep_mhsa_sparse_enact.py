# Anchor DETR R50-DC5 (standard self-attention encoder) + Sparse DETR's query sparsification + ENACT (sigma = 3): the selected rho = 0.3
# of the tokens attend to ENACT's clusters of all valid tokens.  Differs from anchor_detr_r50_dc5_50ep_mhsa_sparse.py
# only in the encoder attention (that of anchor_detr_r50_dc5_50ep_mhsa_enact.py).
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .anchor_detr_r50_dc5_50ep_mhsa_sparse import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, sigma=3
)
train.output_dir = "./output/anchor_detr_r50_dc5_50ep_mhsa_sparse_enact"
