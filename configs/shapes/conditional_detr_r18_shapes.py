# Small Conditional DETR from scratch on the built-in shapes dataset (same backbone, width,
# depth, queries, data and schedule as detr_r18_shapes.py; focal loss and reference points).
from detectron2.config import LazyCall as L

from projects.enact.engine.schedule import step_lr_multiplier
from projects.enact.modeling.criterion import aux_weight_dict

from ..common.data.shapes import dataloader
from ..common.models.conditional_detr_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.train import train

model.backbone.update(depth=18, freeze_at=0, norm="GN", out_features=("res4",))
model.in_features = "res4"
model.in_channels = 256
model.embed_dim = 128
model.position_embedding.num_pos_feats = 64
model.transformer.encoder.update(num_layers=3, embed_dim=128, ffn_dim=512, dropout=0.0)
model.transformer.encoder.attention.update(embed_dim=128, num_heads=8, attn_drop=0.0, proj_drop=0.0)
model.transformer.decoder.update(num_layers=3, embed_dim=128, num_heads=8, ffn_dim=512, dropout=0.0)
model.num_classes = 4
model.num_queries = 20
model.select_box_nums_for_evaluation = 20
model.criterion.weight_dict = aux_weight_dict({"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 2)

optimizer.lr = 5e-4
optimizer.params.lr_factor_func = None  # the backbone is trained from scratch at the full lr

train.device = "cpu"
train.max_iter = 1500
lr_multiplier = L(step_lr_multiplier)(max_iter="${train.max_iter}", drop_fraction=2 / 3)
train.checkpointer.period = 500
train.eval_period = 0  # evaluate once, at the end
train.log_period = 20
train.output_dir = "./output/shapes/conditional_detr_r18"
