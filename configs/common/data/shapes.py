# The built-in synthetic "shapes" dataset (generated on first use, no download): 4 classes of
# coloured shapes, 1-6 objects of 16-176 px on 192-256 px images (4000 train / 500 val images),
# so COCO's small / medium / large box areas (< 32², 32²-96², > 96² px) all occur (23 / 58 / 19 % in val).
# The models see the images at about half that size (shortest edge 96-128 in training, 112 at
# test): flip and multi-scale resize (DETR's augmentation without its crop branch) scaled to it.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from projects.enact.data.shapes_loader import shapes_dataset_dicts
from projects.enact.data.transforms import build_detr_mapper

dataloader = OmegaConf.create()

_SHAPES = dict(
    num_train=4000, num_val=500, num_classes=4, image_size=(192, 256), object_size=(16, 176), max_objects=6
)

dataloader.train = L(build_detection_train_loader)(
    dataset=L(shapes_dataset_dicts)(split="train", **_SHAPES),
    mapper=L(build_detr_mapper)(
        is_train=True, image_format="BGR",
        min_sizes=(96, 112, 128), max_size=160, crop_prob=0.0,  # no crop branch: it slows this short schedule
    ),
    total_batch_size=8,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(shapes_dataset_dicts)(split="val", filter_empty=False, **_SHAPES),
    mapper=L(build_detr_mapper)(is_train=False, image_format="BGR", min_size=112, max_size=160),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="enact_shapes_val", output_dir="${train.output_dir}")
