"""Tests of the data side: synthetic shapes dataset, registration, file checks, DETR augmentation."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from projects.enact.data import (
    DETR_MIN_SIZES,
    SHAPES_CLASSES,
    RandomChoice,
    build_detr_mapper,
    check_coco_files,
    check_dataset_available,
    detr_test_augmentation,
    detr_train_augmentation,
    generate_shapes,
    register_coco,
    register_shapes,
)

NUM_TRAIN, NUM_VAL = 8, 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny registered shapes dataset: (root, [train name, val name])."""
    root = str(tmp_path_factory.mktemp("shapes"))
    names = register_shapes("test_shapes", root=root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return root, names


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _files(root, split, prefix="test_shapes"):
    return os.path.join(root, "annotations", f"{prefix}_{split}.json"), os.path.join(root, f"{prefix}_{split}")


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,num", [("train", NUM_TRAIN), ("val", NUM_VAL)])
def test_files_match_json(shapes, split, num):
    root, _ = shapes
    json_file, image_root = _files(root, split)
    data = _load_json(json_file)
    assert {"info", "images", "annotations", "categories"} <= set(data)
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES[:4])
    assert len(data["images"]) == num
    assert len({im["id"] for im in data["images"]}) == num
    sizes = set()
    for im in data["images"]:
        with Image.open(os.path.join(image_root, im["file_name"])) as pil:
            assert pil.size == (im["width"], im["height"])
            assert pil.mode == "RGB"
        assert 128 <= im["width"] <= 192 and 128 <= im["height"] <= 192
        sizes.add((im["width"], im["height"]))
    assert len(sizes) > 1  # varied sizes: batches need padding
    by_id = {im["id"]: im for im in data["images"]}
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    per_image = {i: 0 for i in by_id}
    for a in data["annotations"]:
        im = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w >= 3 and h >= 3
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["area"] == w * h
        assert a["iscrowd"] == 0
        assert 1 <= a["category_id"] <= 4
        per_image[a["image_id"]] += 1
    assert all(1 <= n <= 6 for n in per_image.values())


def test_boxes_are_exact(tmp_path):
    """Noise-free single-object images: the box is exactly the extent of the non-background pixels."""
    json_file, image_root = generate_shapes(
        str(tmp_path), "train", 12, seed=3, num_classes=5, max_objects=1, noise=0.0
    )
    data = _load_json(json_file)
    seen = set()
    for im, ann in zip(data["images"], data["annotations"]):
        assert ann["image_id"] == im["id"]
        arr = np.asarray(Image.open(os.path.join(image_root, im["file_name"])), dtype=np.int16)
        bg = arr[0, 0] if ann["bbox"][:2] != [0, 0] else arr[-1, -1]
        ys, xs = np.nonzero(np.abs(arr - bg).max(axis=2) > 0)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert box == ann["bbox"]
        seen.add(ann["category_id"])
    assert len(seen) >= 3


def test_determinism_and_skip(tmp_path):
    a, b, c = (str(tmp_path / d) for d in "abc")
    ja, ra = generate_shapes(a, "val", 5, seed=7)
    jb, rb = generate_shapes(b, "val", 5, seed=7)
    jc, rc = generate_shapes(c, "val", 5, seed=8)
    with open(ja, "rb") as fa, open(jb, "rb") as fb, open(jc, "rb") as fc:
        assert fa.read() == fb.read()
        fc.seek(0)
        assert json.load(fc)["annotations"] != _load_json(ja)["annotations"]
    for im in _load_json(ja)["images"]:
        with open(os.path.join(ra, im["file_name"]), "rb") as fa, open(os.path.join(rb, im["file_name"]), "rb") as fb:
            assert fa.read() == fb.read()
    # train and val are different streams
    jt, _ = generate_shapes(a, "train", 5, seed=7)
    assert _load_json(jt)["annotations"] != _load_json(ja)["annotations"]
    # same parameters: nothing rewritten
    mtime = os.stat(ja).st_mtime_ns
    first = os.path.join(ra, "000001.png")
    img_mtime = os.stat(first).st_mtime_ns
    assert generate_shapes(a, "val", 5, seed=7) == (ja, ra)
    assert os.stat(ja).st_mtime_ns == mtime and os.stat(first).st_mtime_ns == img_mtime
    assert _load_json(ja)["info"]["params"]["num_images"] == 5
    # other parameters: regenerated, stale images removed, image i unchanged
    with open(first, "rb") as f:
        first_bytes = f.read()
    generate_shapes(a, "val", 3, seed=7)
    assert _load_json(ja)["info"]["params"]["num_images"] == 3
    assert sorted(os.listdir(ra)) == ["000001.png", "000002.png", "000003.png"]
    with open(first, "rb") as f:
        assert f.read() == first_bytes
    # a missing image triggers regeneration
    os.remove(first)
    generate_shapes(a, "val", 3, seed=7)
    assert os.path.isfile(first)


def test_generation_speed(tmp_path):
    import time

    t0 = time.perf_counter()
    generate_shapes(str(tmp_path), "train", 60, seed=0)
    assert time.perf_counter() - t0 < 5.0  # ~7 ms an image on a 2-core CPU


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def test_registration(shapes):
    root, names = shapes
    assert names == ["test_shapes_train", "test_shapes_val"]
    # idempotent: same call again, and the names stay registered
    assert register_shapes("test_shapes", root=root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0) == names
    for name, num in zip(names, (NUM_TRAIN, NUM_VAL)):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(SHAPES_CLASSES[:4])
        assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == num
        for d in dicts:
            assert os.path.isfile(d["file_name"])
            assert d["annotations"]
            for a in d["annotations"]:
                assert a["bbox_mode"] == BoxMode.XYWH_ABS
                assert 0 <= a["category_id"] < 4  # contiguous ids
        check_dataset_available(name)
    check_dataset_available(names)


def test_reregistration_with_other_root(tmp_path):
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    register_shapes("test_move", root=r1, num_train=2, num_val=1)
    register_shapes("test_move", root=r2, num_train=2, num_val=1, num_classes=3)
    meta = MetadataCatalog.get("test_move_train")
    assert meta.json_file.startswith(r2) and meta.thing_classes == list(SHAPES_CLASSES[:3])
    assert len(DatasetCatalog.get("test_move_val")) == 1


# --------------------------------------------------------------------------------------------
# dataset checks
# --------------------------------------------------------------------------------------------
def test_check_missing_files(tmp_path):
    json_file = str(tmp_path / "nowhere" / "instances.json")
    image_root = str(tmp_path / "nowhere" / "images")
    if "test_missing_ds" not in DatasetCatalog.list():
        register_coco_instances("test_missing_ds", {}, json_file, image_root)
    with pytest.raises(FileNotFoundError) as e:
        check_dataset_available("test_missing_ds")
    assert json_file in str(e.value) and image_root in str(e.value)
    assert "DETECTRON2_DATASETS" in str(e.value)
    with pytest.raises(FileNotFoundError):
        check_coco_files("test_missing_ds")


def test_check_unknown_name():
    with pytest.raises(KeyError) as e:
        check_dataset_available("coco_2017_vall")
    msg = str(e.value)
    assert "coco_2017_vall" in msg and "coco_2017_val" in msg and "coco_2017_train" in msg
    with pytest.raises(KeyError):
        check_dataset_available(["coco_2017_train", "no_such_dataset"])


def test_register_coco(tmp_path):
    assert register_coco() == ["coco_2017_train", "coco_2017_val"]
    old = MetadataCatalog.get("coco_2017_val").json_file
    base = os.path.dirname(os.path.dirname(os.path.dirname(old)))  # <root>/coco/annotations/x.json
    root = str(tmp_path / "ds")
    try:
        register_coco(root=root)
        meta = MetadataCatalog.get("coco_2017_val")
        assert meta.json_file == os.path.join(root, "coco/annotations/instances_val2017.json")
        assert meta.image_root == os.path.join(root, "coco/val2017")
        assert len(meta.thing_classes) == 80
        with pytest.raises(FileNotFoundError) as e:
            check_dataset_available("coco_2017_val")
        assert meta.json_file in str(e.value) and meta.image_root in str(e.value)
        assert "DETECTRON2_DATASETS" in str(e.value)
        # files present -> passes
        os.makedirs(meta.image_root)
        os.makedirs(os.path.dirname(meta.json_file))
        with open(meta.json_file, "w") as f:
            f.write("{}")
        check_dataset_available("coco_2017_val")
    finally:
        register_coco(root=base)
    assert MetadataCatalog.get("coco_2017_val").json_file == old


# --------------------------------------------------------------------------------------------
# augmentation and mapper
# --------------------------------------------------------------------------------------------
def _first_dict(name):
    return dict(DatasetCatalog.get(name)[0])


def test_mapper_flip_mirrors_boxes(shapes):
    _, (train, _) = shapes
    d = _first_dict(train)
    w, h = d["width"], d["height"]
    # flip forced, resize to the original size (identity), no crop
    augs = detr_train_augmentation(min_sizes=(min(w, h),), max_size=10_000, flip_prob=1.0, crop_prob=0.0)
    out = build_detr_mapper(True, augmentations=augs)(dict(d))
    image = out["image"]
    assert image.shape == (3, h, w) and image.dtype == torch.uint8
    original = torch.as_tensor(np.array(Image.open(d["file_name"]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(image, original.flip(-1))
    gt = torch.tensor(
        [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in d["annotations"]],
        dtype=torch.float32,
    )
    mirrored = torch.stack([w - gt[:, 2], gt[:, 1], w - gt[:, 0], gt[:, 3]], dim=1)
    inst = out["instances"]
    assert torch.allclose(inst.gt_boxes.tensor, mirrored)
    assert inst.gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]


def _object_extent(image, bg):
    """Extent (x0, y0, x1, y1) of the pixels clearly different from the background colour."""
    diff = (image.permute(1, 2, 0).to(torch.int16) - bg).abs().amax(dim=2)
    ys, xs = torch.nonzero(diff > 40, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_augmentation_keeps_boxes_consistent(tmp_path):
    """Random flips, resizes and crops: the gt box follows the object's pixels."""
    register_shapes("test_single", root=str(tmp_path), num_train=6, num_val=1, seed=1, max_objects=1, noise=0.0)
    dicts = DatasetCatalog.get("test_single_train")
    min_sizes = (128, 144, 160, 176, 192)
    mapper = build_detr_mapper(
        True, min_sizes=min_sizes, max_size=256, crop_pre_sizes=(96, 128, 160), crop_size=(64, 128)
    )
    np.random.seed(0)
    whole = crops = 0
    for it in range(24):
        d = dict(dicts[it % len(dicts)])
        corner = None  # background colour (noise-free images), from a corner free of the object
        if d["annotations"][0]["bbox"][:2] != [0, 0]:
            corner = np.array(Image.open(d["file_name"]).convert("RGB"))[0, 0]
        out = mapper(d)
        image, inst = out["image"], out["instances"]
        H, W = image.shape[1:]
        assert min(H, W) in min_sizes or max(H, W) <= 256
        assert max(H, W) <= 256
        if corner is None:
            continue
        extent = _object_extent(image, torch.as_tensor(corner, dtype=torch.int16))
        if len(inst) == 0:  # cropped away
            crops += 1
            assert extent is None or (extent[2:] - extent[:2]).min() <= 4
            continue
        box = inst.gt_boxes.tensor[0]
        assert extent is not None
        # bilinear resizing blurs edges by about one source pixel (scale <= 3 here)
        tol = 4.0
        assert (extent[:2] >= box[:2] - tol).all() and (extent[2:] <= box[2:] + tol).all(), (it, box, extent)
        if box[0] > 0 and box[1] > 0 and box[2] < W and box[3] < H:  # not cut by the crop:
            assert torch.allclose(box, extent, atol=tol), (it, box, extent)  # tight
            whole += 1
    assert whole > 5, (whole, crops)


def test_random_choice_uses_both_branches():
    aug = detr_train_augmentation(
        min_sizes=(128, 160), max_size=256, crop_pre_sizes=(96, 128), crop_size=(64, 96)
    )
    assert isinstance(aug[0], T.RandomFlip) and isinstance(aug[1], RandomChoice)
    np.random.seed(0)
    image = np.zeros((150, 180, 3), dtype=np.uint8)
    kinds = {"crop": 0, "resize": 0}
    for _ in range(40):
        inp = T.AugInput(image.copy(), boxes=np.array([[10.0, 10.0, 60.0, 60.0]]))
        tfms = T.AugmentationList(aug)(inp)
        has_crop = any(isinstance(t, T.CropTransform) for t in tfms.transforms)
        kinds["crop" if has_crop else "resize"] += 1
        assert min(inp.image.shape[:2]) in (128, 160) or max(inp.image.shape[:2]) == 256
    assert kinds["crop"] > 5 and kinds["resize"] > 5
    with pytest.raises(ValueError):
        RandomChoice([])


def test_default_detr_sizes():
    assert DETR_MIN_SIZES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    np.random.seed(1)
    aug = T.AugmentationList(detr_train_augmentation())
    for _ in range(10):
        inp = T.AugInput(np.zeros((480, 640, 3), dtype=np.uint8))
        aug(inp)
        h, w = inp.image.shape[:2]
        assert min(h, w) in DETR_MIN_SIZES and max(h, w) <= 1333
    inp = T.AugInput(np.zeros((480, 640, 3), dtype=np.uint8))
    T.AugmentationList(detr_test_augmentation())(inp)
    assert inp.image.shape[:2] == (800, 1067)


def test_test_mapper(shapes):
    _, (_, val) = shapes
    d = _first_dict(val)
    out = build_detr_mapper(False, min_size=160, max_size=256)(dict(d))
    assert "instances" not in out and "annotations" not in out
    assert min(out["image"].shape[1:]) == 160 or max(out["image"].shape[1:]) == 256
    assert out["height"] == d["height"] and out["width"] == d["width"]


# --------------------------------------------------------------------------------------------
# the json is valid COCO: predictions equal to the ground truth score AP = 100
# --------------------------------------------------------------------------------------------
def test_coco_evaluator_on_ground_truth(shapes):
    from detectron2.evaluation import COCOEvaluator

    _, (_, val) = shapes

    def run(shift):
        evaluator = COCOEvaluator(val, tasks=("bbox",), distributed=False, output_dir=None)
        evaluator.reset()
        for d in DatasetCatalog.get(val):
            boxes = torch.tensor(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]],
                dtype=torch.float32,
            )
            inst = Instances((d["height"], d["width"]))
            inst.pred_boxes = Boxes(boxes + shift)
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        return evaluator.evaluate()["bbox"]

    exact = run(0.0)
    assert exact["AP"] == pytest.approx(100.0)
    assert exact["AP50"] == pytest.approx(100.0)
    assert run(torch.tensor([6.0, 6.0, 6.0, 6.0]))["AP"] < 90.0
