# Small Conditional DETR from scratch on the built-in shapes dataset: the same backbone, width,
# depth, queries, data and schedule as detr_r18_shapes.py; focal loss and reference points.
from detectron2.config import LazyCall as L

from projects.enact.engine.schedule import step_lr_multiplier

from ..common.data.shapes import dataloader
from ..common.models.conditional_detr_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.shapes_model import shapes_schedule, shrink_for_shapes
from ..common.train import train

shrink_for_shapes(model)
shapes_schedule(optimizer, train, max_iter=1500, output_dir="./output/shapes/conditional_detr_r18")
lr_multiplier = L(step_lr_multiplier)(max_iter="${train.max_iter}", drop_fraction=2 / 3)
