# Conditional DETR R101 (C5) on COCO: 50 epochs, lr drop at 40, batch 8 (the paper's Table 2).
from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.output_dir = "./output/conditional_detr_r101_50ep"
