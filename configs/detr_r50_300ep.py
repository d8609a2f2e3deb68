# DETR R50 (C5) on COCO: 300 epochs, lr drop at 200, batch 8 (the paper's Table 2 baseline).
from detectron2.config import LazyCall as L

from projects.enact.engine.schedule import COCO_TRAIN_IMAGES, epochs_to_iters, step_lr_multiplier

from .common.data.coco_detr import dataloader
from .common.models.detr_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

dataloader.train.total_batch_size = 8
train.max_iter = epochs_to_iters(300, COCO_TRAIN_IMAGES, batch_size=8)
lr_multiplier = L(step_lr_multiplier)(max_iter="${train.max_iter}", drop_fraction=200 / 300)
train.checkpointer.period = epochs_to_iters(10, COCO_TRAIN_IMAGES, batch_size=8)
train.eval_period = epochs_to_iters(10, COCO_TRAIN_IMAGES, batch_size=8)
train.output_dir = "./output/detr_r50_300ep"
