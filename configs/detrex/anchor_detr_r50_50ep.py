# detrex's own config (projects/anchor_detr/configs/anchor_detr_r50_50ep.py of the detrex checkout),
# unchanged but for its output folders: the baseline twin of anchor_detr_r50_50ep_enact.py
# (tools/benchmark.py pairs X.py with X_enact.py).
from projects.enact.detrex_support import detrex_config

_detrex = detrex_config("projects/anchor_detr/configs/anchor_detr_r50_50ep.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _detrex[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
train.output_dir = "./output/detrex/anchor_detr_r50_50ep"
# COCOEvaluator writes its files under this config's own train.output_dir (follows train.output_dir=...)
dataloader.evaluator.output_dir = "${train.output_dir}"
