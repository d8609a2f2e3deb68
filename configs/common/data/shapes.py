# The built-in synthetic "shapes" dataset (generated on first use, no download): 4 classes of
# coloured shapes (1-6 objects of 14-80 px) on 128-192 px images; DETR's augmentation scaled to
# that size.  Small on purpose: a DETR learns it from scratch on a CPU.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from projects.enact.data.shapes_loader import shapes_dataset_dicts
from projects.enact.data.transforms import build_detr_mapper

dataloader = OmegaConf.create()

_SHAPES = dict(num_train=600, num_val=100, num_classes=4, image_size=(128, 192), object_size=(14, 80), max_objects=6)

dataloader.train = L(build_detection_train_loader)(
    dataset=L(shapes_dataset_dicts)(split="train", **_SHAPES),
    mapper=L(build_detr_mapper)(
        is_train=True, image_format="BGR",
        min_sizes=(128, 144, 160, 176, 192), max_size=256, crop_pre_sizes=(128, 160), crop_size=(96, 160),
    ),
    total_batch_size=8,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(shapes_dataset_dicts)(split="val", filter_empty=False, **_SHAPES),
    mapper=L(build_detr_mapper)(is_train=False, image_format="BGR", min_size=160, max_size=256),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="enact_shapes_val", output_dir="${train.output_dir}")
