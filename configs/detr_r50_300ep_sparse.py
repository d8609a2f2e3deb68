# DETR R50 + Sparse DETR's encoder query sparsification (issue 23): each encoder layer updates the
# top rho = 0.3 of every image's valid tokens, ranked once by a token scorer; the other tokens pass
# through unchanged.  Differs from detr_r50_300ep.py only in the encoder class (same layers, plus
# `scorer.*`, which a baseline checkpoint lacks) and loss_dam (the scorer's BCE against the top rho
# of the decoder cross-attention map, counted once).  rho: model.transformer.encoder.query_ratio.
from projects.enact.modeling.sparse_encoder import SparseTransformerEncoder

from .detr_r50_300ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder._target_ = SparseTransformerEncoder
model.transformer.encoder.query_ratio = 0.3
model.criterion.weight_dict["loss_dam"] = 1.0
model.criterion.weight_dict["loss_os"] = 1.0  # the objectness target instead: encoder.scorer_target="objectness"
model.encoder_aux_loss = False  # Sparse DETR's encoder aux loss: an option; it cost 4.7 AP on shapes (docs/sparse_detr.md)
train.output_dir = "./output/detr_r50_300ep_sparse"
