# AdamW as DETR trains it: lr 1e-4, backbone at 0.1x, weight decay 1e-4 on every parameter.
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from projects.enact.engine.schedule import backbone_lr_factor

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # model is filled in by tools/train_net.py
        base_lr="${..lr}",
        weight_decay_norm=None,
        lr_factor_func=backbone_lr_factor,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
