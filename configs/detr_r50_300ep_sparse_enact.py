# DETR R50 + Sparse DETR's query sparsification + ENACT (sigma = 5): the selected rho = 0.3
# of the tokens attend to ENACT's clusters of all valid tokens.  Differs from detr_r50_300ep_sparse.py
# only in the encoder attention (that of detr_r50_300ep_enact.py).
from detectron2.config import LazyCall as L

from projects.enact import EnactAttention

from .detr_r50_300ep_sparse import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1, sigma=5
)
train.output_dir = "./output/detr_r50_300ep_sparse_enact"
