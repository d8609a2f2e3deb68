# Small Conditional DETR trained from scratch on the built-in shapes dataset, on a CPU: the
# baseline of the demo (configs/shapes/conditional_detr_r18_shapes_enact.py).  The model:
# configs/common/shapes_model.py; the data: configs/common/data/shapes.py.  3000 iterations, lr x0.1
# at 2400: seeds 0-2 spread by 1.7 AP (5.0 at 2000; docs/sparse_detr.md).
from detectron2.config import LazyCall as L

from projects.enact.engine.schedule import step_lr_multiplier

from ..common.data.shapes import dataloader
from ..common.models.conditional_detr_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.shapes_model import shapes_schedule, shrink_for_shapes
from ..common.train import train

shrink_for_shapes(model)
shapes_schedule(optimizer, train, max_iter=3000, output_dir="./output/shapes/conditional_detr_r18")
lr_multiplier = L(step_lr_multiplier)(max_iter="${train.max_iter}", drop_fraction=0.8)
