# Anchor DETR R50-DC5 with a standard multi-head self-attention encoder over the flattened map
# (instead of RCDA): the same decoder, queries, losses and schedule as anchor_detr_r50_dc5_50ep.py.
# The encoder self-attention is the one entry to swap: model.transformer.encoder.attention.
from detectron2.config import LazyCall as L

from projects.enact.modeling.attention import MultiheadAttention
from projects.enact.modeling.transformer import TransformerEncoder

from .anchor_detr_r50_dc5_50ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder = L(TransformerEncoder)(
    attention=L(MultiheadAttention)(embed_dim=256, num_heads=8, attn_drop=0.0, proj_drop=0.0),
    num_layers=6, embed_dim=256, ffn_dim=1024, dropout=0.0,
)
train.output_dir = "./output/anchor_detr_r50_dc5_50ep_mhsa"
