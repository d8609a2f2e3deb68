# Demo: ACT's multi-task knowledge distillation (MTKD, the ACT paper's Eq. 7) on the shapes DETR:
# fine-tune a trained baseline with the detection loss of the full-attention branch plus the L2
# distance between the ACT branch's boxes and the full branch's (detached), weight 1.  As the
# paper (5 + 2 epochs at lr 1e-5 then 1e-6 on COCO): a short run at a tenth of the training lr,
# dropped at 5/7.  Start from the baseline and evaluate the ACT branch with the _act config:
#   tools/train_net.py --config-file configs/shapes/detr_r18_shapes_act_mtkd.py \
#       train.init_checkpoint=output/shapes/detr_r18/model_final.pth
#   tools/train_net.py --config-file configs/shapes/detr_r18_shapes_act.py --eval-only \
#       train.init_checkpoint=output/shapes/detr_r18_act_mtkd/model_final.pth
from detectron2.config import LazyCall as L

from projects.enact import ActAttention

from .detr_r18_shapes import dataloader, lr_multiplier, model, optimizer, train

model.mtkd_attention = L(ActAttention)(
    embed_dim=128, num_heads=8, attn_drop=0.0, proj_drop=0.0, num_hashes=32, bucket_width=4.0, seed=0
)
model.mtkd_weight = 1.0
optimizer.lr = 5e-5
train.max_iter = 300
lr_multiplier.drop_fraction = 5 / 7
train.output_dir = "./output/shapes/detr_r18_act_mtkd"
