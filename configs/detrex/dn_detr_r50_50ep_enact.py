# DN-DETR R50 + ENACT (sigma = 5): detrex's own config (projects/dn_detr/configs/dn_detr_r50_50ep.py
# of the detrex checkout) with ENACT in the encoder's self-attentions (the encoder class is
# switched; every model.* key stays detrex's).  detrex is found through $DETREX_ROOT or an
# importable detrex package beside its projects/ folder (projects/enact/detrex_support.py); a clear
# RuntimeError says what to set otherwise.
from projects.enact.detrex_support import EnactDNDetrTransformerEncoder, detrex_config

_detrex = detrex_config("projects/dn_detr/configs/dn_detr_r50_50ep.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _detrex[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.transformer.encoder._target_ = EnactDNDetrTransformerEncoder
model.transformer.encoder.sigma = 5
train.output_dir = "./output/detrex/dn_detr_r50_50ep_enact"
# COCOEvaluator writes its files under this config's own train.output_dir (follows train.output_dir=...)
dataloader.evaluator.output_dir = "${train.output_dir}"
