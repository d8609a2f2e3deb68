# PnP-DETR R50 + ENACT (sigma = 5): detrex's own config
# (projects/pnp_detr/configs/pnp_detr_r50_300ep.py of the detrex checkout) with ENACT in the
# encoder's self-attentions.  PnP-DETR's encoder sees the sampled tokens (ordered by score) and 30
# pooled background tokens, so the transformer class is switched: its sampler then hands the encoder
# the sampled tokens in raster order (a subset of the feature map: neighbours in that order need not
# touch in the image) and the pooled tokens stay unclustered (projects/enact/modeling/pnp.py); every
# model.* key stays detrex's.  detrex is found through $DETREX_ROOT or an importable detrex package
# beside its projects/ folder (projects/enact/detrex_support.py); a clear RuntimeError says what to
# set otherwise.
from projects.enact.detrex_support import EnactPnPDetrTransformer, detrex_config

_detrex = detrex_config("projects/pnp_detr/configs/pnp_detr_r50_300ep.py")
model, dataloader, optimizer, lr_multiplier, train = (
    _detrex[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.transformer._target_ = EnactPnPDetrTransformer
model.transformer.sigma = 5
train.output_dir = "./output/detrex/pnp_detr_r50_300ep_enact"  # detrex's reuses ./output/detr_r50_300ep
# COCOEvaluator writes its files under this config's own train.output_dir (follows train.output_dir=...)
dataloader.evaluator.output_dir = "${train.output_dir}"
