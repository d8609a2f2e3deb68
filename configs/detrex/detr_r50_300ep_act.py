# DETR R50 + ACT (the ENACT paper's comparator: L = 32 hash rounds, r = 8, the ACT paper's values
# at head dim 32): detrex's own config (projects/detr/configs/detr_r50_300ep.py of the detrex
# checkout) with ACT in the encoder's self-attentions (the encoder class is switched; every model.*
# key stays detrex's).  ACT adds no parameters: evaluate a trained detrex DETR checkpoint
# training-free with --eval-only train.init_checkpoint=... (only the hash buffers are new).
# detrex is found through $DETREX_ROOT or an importable detrex package beside its projects/ folder
# (projects/enact/detrex_support.py); a clear RuntimeError says what to set otherwise.
from projects.enact.detrex_support import ActDetrTransformerEncoder, detrex_config

_detrex = detrex_config("projects/detr/configs/detr_r50_300ep.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _detrex[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.transformer.encoder._target_ = ActDetrTransformerEncoder
model.transformer.encoder.num_hashes = 32  # L (the paper: 16, 20, 24, 32)
model.transformer.encoder.bucket_width = 8.0  # r (seed: 0 by default)
train.output_dir = "./output/detrex/detr_r50_300ep_act"
# COCOEvaluator writes its files under this config's own train.output_dir (follows train.output_dir=...)
dataloader.evaluator.output_dir = "${train.output_dir}"
