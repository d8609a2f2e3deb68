# Anchor DETR R50 with detrex's nn.MultiheadAttention encoder (attention_type) + ENACT (sigma = 3):
# detrex's own config (projects/anchor_detr/configs/anchor_detr_r50_50ep.py of the detrex checkout)
# with ENACT in the encoder's self-attentions (its encoder is built inside the transformer, so the
# transformer class is switched; every model.* key stays detrex's).  detrex is found through
# $DETREX_ROOT or an importable detrex package beside its projects/ folder
# (projects/enact/detrex_support.py); a clear RuntimeError says what to set otherwise.
from projects.enact.detrex_support import EnactAnchorDETRTransformer, detrex_config

_detrex = detrex_config("projects/anchor_detr/configs/anchor_detr_r50_50ep.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _detrex[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.transformer.attention_type = "nn.MultiheadAttention"  # detrex's MHSA variant of Anchor DETR
model.transformer._target_ = EnactAnchorDETRTransformer
model.transformer.sigma = 3
train.output_dir = "./output/detrex/anchor_detr_r50_50ep_mhsa_enact"
# COCOEvaluator writes its files under this config's own train.output_dir (follows train.output_dir=...)
dataloader.evaluator.output_dir = "${train.output_dir}"
