# The demo's Conditional DETR with Sparse DETR's encoder query sparsification: differs from
# conditional_detr_r18_shapes.py only in the encoder class (same layers and parameter names, plus
# the token scorer), so the baseline's checkpoint loads with only `scorer.*` missing.  Each encoder
# layer updates the top rho = 0.3 of every image's valid tokens (ranked once by the scorer); the
# other tokens pass through unchanged.  rho can be overridden, also at evaluation:
#   model.transformer.encoder.query_ratio=0.1
# The scorer learns only from loss_dam (BCE against the top rho of the decoder cross-attention map,
# counted once, weight 1).
from projects.enact.modeling.sparse_encoder import SparseTransformerEncoder

from .conditional_detr_r18_shapes import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder._target_ = SparseTransformerEncoder
model.transformer.encoder.query_ratio = 0.3
model.criterion.weight_dict["loss_dam"] = 1.0
model.criterion.weight_dict["loss_os"] = 1.0  # the objectness target instead: encoder.scorer_target="objectness"
model.encoder_aux_loss = False  # Sparse DETR's encoder aux loss: an option; it cost 4.7 AP on shapes (docs/sparse_detr.md)
train.output_dir = "./output/shapes/conditional_detr_r18_sparse"
