# DETR R50 + ACT (the comparator, Zheng et al. BMVC 2021): the baseline with ACT as the encoder
# self-attention, L = 32 hash rounds, r = 8 (the paper's values at head dim 32).  ACT adds no
# parameters: evaluate a trained baseline checkpoint training-free with
#   tools/train_net.py --config-file configs/detr_r50_300ep_act.py --eval-only train.init_checkpoint=...
# (L: model.transformer.encoder.attention.num_hashes=16|20|24|32).
from detectron2.config import LazyCall as L

from projects.enact import ActAttention

from .detr_r50_300ep import dataloader, lr_multiplier, model, optimizer, train

model.transformer.encoder.attention = L(ActAttention)(
    embed_dim=256, num_heads=8, attn_drop=0.1, proj_drop=0.1, num_hashes=32, bucket_width=8.0, seed=0
)
train.output_dir = "./output/detr_r50_300ep_act"
