# COCO 2017 with DETR's augmentation (flip; multi-scale resize 480-800 / max 1333, or
# resize-crop-resize), through detectron2's builtin registration: files under
# $DETECTRON2_DATASETS/coco/{train2017,val2017,annotations} (default ./datasets).
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from projects.enact.data.transforms import build_detr_mapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(build_detr_mapper)(is_train=True, image_format="BGR"),
    total_batch_size=8,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(build_detr_mapper)(is_train=False, image_format="BGR"),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}", output_dir="${train.output_dir}")
