"""A small built-in synthetic detection dataset ("shapes") in COCO format.

Every image is a plain or noisy, weakly coloured background with 1 to ``max_objects`` filled
shapes on it.  The classes differ both by shape and by colour, so that a DETR trained from
scratch on a CPU for a few hundred iterations can learn them:

==========  ==========  ==================
 id (json)  class        colour
==========  ==========  ==================
 1          square       red
 2          circle       green
 3          triangle     blue
 4          cross        yellow
 5          ring         magenta
==========  ==========  ==================

(``num_classes`` keeps the first 3 to 5.)  Shapes lie entirely inside the image; their boxes are
the exact pixel extent of the drawn shape (``[x, y, w, h]``, COCO convention, pixel-coverage:
the shape covers pixels ``x .. x + w - 1``), computed from each object's own mask.  Objects may
overlap a little (the intersection of two boxes is at most ``max_overlap`` of the smaller one)
and later objects are drawn over earlier ones; boxes are amodal.

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)`` and the
image/object parameters, so the same call gives byte-identical files.  Layout under ``root``::

    {root}/{prefix}_{split}/000001.png ...
    {root}/annotations/{prefix}_{split}.json      # COCO: info, images, annotations, categories

The json's ``info["params"]`` records the generation parameters; :func:`generate_shapes` skips
the work when the json exists, has the requested parameters and all its images are on disk.

Default root: ``$ENACT_DATASETS/enact_shapes``, else ``$DETECTRON2_DATASETS/enact_shapes``, else
``./datasets/enact_shapes`` (see :func:`default_shapes_root`).
"""

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "default_shapes_root",
    "generate_shapes",
    "register_shapes",
    "shapes_metadata",
]

logger = logging.getLogger(__name__)

# Name and base RGB colour of every class, in category-id order (id = index + 1).
SHAPES_CLASSES: Tuple[str, ...] = ("square", "circle", "triangle", "cross", "ring")
SHAPES_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (220, 40, 40),  # red
    (40, 190, 50),  # green
    (40, 70, 225),  # blue
    (235, 215, 30),  # yellow
    (200, 40, 210),  # magenta
)
_SPLIT_CODES = {"train": 0, "val": 1}
_GENERATOR_VERSION = 1


def default_shapes_root() -> str:
    """``$ENACT_DATASETS/enact_shapes``, else ``$DETECTRON2_DATASETS/enact_shapes``, else
    ``./datasets/enact_shapes`` (made absolute)."""
    base = os.environ.get("ENACT_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"
    return os.path.abspath(os.path.join(os.path.expanduser(base), "enact_shapes"))


def shapes_metadata(num_classes: int = 4) -> Dict:
    """detectron2 metadata (``thing_classes``, ``thing_colors``) of the first ``num_classes``."""
    _check_num_classes(num_classes)
    return {
        "thing_classes": list(SHAPES_CLASSES[:num_classes]),
        "thing_colors": [list(c) for c in SHAPES_COLORS[:num_classes]],
    }


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= int(num_classes) <= len(SHAPES_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES_CLASSES)}], got {num_classes}")


def _log(msg: str) -> None:
    # Logged when logging is configured (detectron2's setup_logger / a training tool), printed
    # otherwise, so that a long generation is never silent.
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(msg)
    else:
        print(f"[enact_shapes] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, x0: int, y0: int, w: int, h: int) -> None:
    """Draw class ``cls`` filling the box of pixels [x0, x0 + w) x [y0, y0 + h) with value 255."""
    x1, y1 = x0 + w - 1, y0 + h - 1  # PIL's coordinates are inclusive
    name = SHAPES_CLASSES[cls]
    if name == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif name == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif name == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2.0, y0)], fill=255)
    elif name == "cross":
        tw = max(3, int(round(w * 0.34)))
        th = max(3, int(round(h * 0.34)))
        cx0 = x0 + (w - tw) // 2
        cy0 = y0 + (h - th) // 2
        draw.rectangle([cx0, y0, cx0 + tw - 1, y1], fill=255)  # vertical bar
        draw.rectangle([x0, cy0, x1, cy0 + th - 1], fill=255)  # horizontal bar
    elif name == "ring":
        width = max(3, int(round(min(w, h) * 0.2)))
        draw.ellipse([x0, y0, x1, y1], outline=255, width=width)
    else:  # pragma: no cover - table and code out of sync
        raise AssertionError(name)


def _overlap_ok(box: Tuple[int, int, int, int], boxes: List[Tuple[int, int, int, int]], max_overlap: float) -> bool:
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        iw = min(x + w, bx + bw) - max(x, bx)
        ih = min(y + h, by + bh) - max(y, by)
        if iw > 0 and ih > 0 and iw * ih > max_overlap * min(w * h, bw * bh):
            return False
    return True


def _make_image(rng: np.random.Generator, p: Dict) -> Tuple[Image.Image, List[Dict]]:
    """One image and its objects ({"category": 0-based class, "bbox": [x, y, w, h]})."""
    W = int(rng.integers(p["image_size"][0], p["image_size"][1] + 1))
    H = int(rng.integers(p["image_size"][0], p["image_size"][1] + 1))
    # Weakly coloured grey background (objects are saturated, so they always stand out).
    grey = rng.uniform(p["background"][0], p["background"][1])
    bg = np.clip(grey + rng.uniform(-15, 15, size=3), 0, 255).astype(np.uint8)
    img = Image.new("RGB", (W, H), tuple(int(v) for v in bg))

    num = int(rng.integers(1, p["max_objects"] + 1))
    lo, hi = p["object_size"]
    hi = min(hi, int(0.7 * min(W, H)))  # keep room to place the object
    lo = min(lo, hi)
    objects: List[Dict] = []
    boxes: List[Tuple[int, int, int, int]] = []
    for _ in range(num):
        for _attempt in range(30):
            size = rng.uniform(lo, hi)
            aspect = float(np.exp(rng.uniform(-0.3, 0.3)))  # w / h in ~[0.74, 1.35]
            w = int(np.clip(round(size * np.sqrt(aspect)), 3, min(W, hi)))
            h = int(np.clip(round(size / np.sqrt(aspect)), 3, min(H, hi)))
            x = int(rng.integers(0, W - w + 1))
            y = int(rng.integers(0, H - h + 1))
            cls = int(rng.integers(0, p["num_classes"]))
            if _overlap_ok((x, y, w, h), boxes, p["max_overlap"]):
                break
        else:
            continue  # no room left for this object
        mask = Image.new("L", (W, H), 0)
        _draw_shape(ImageDraw.Draw(mask), cls, x, y, w, h)
        bbox = mask.getbbox()  # exact extent: (left, top, right, bottom), right/bottom exclusive
        if bbox is None:  # pragma: no cover - every shape is at least 3 px wide
            continue
        color = np.clip(np.array(SHAPES_COLORS[cls]) + rng.integers(-25, 26, size=3), 0, 255)
        img.paste(tuple(int(c) for c in color), mask=mask)
        boxes.append((x, y, w, h))
        l, t, r, b = bbox
        objects.append({"category": cls, "bbox": [l, t, r - l, b - t], "area": (r - l) * (b - t)})

    noise_std = rng.uniform(0.0, p["noise"]) if p["noise"] > 0 else 0.0
    if noise_std > 0.5:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, noise_std, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img, objects


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def _paths(root: str, prefix: str, split: str) -> Tuple[str, str]:
    image_root = os.path.join(root, f"{prefix}_{split}")
    json_file = os.path.join(root, "annotations", f"{prefix}_{split}.json")
    return image_root, json_file


def _up_to_date(json_file: str, image_root: str, params: Dict) -> bool:
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("params") != params:
        return False
    return all(os.path.isfile(os.path.join(image_root, im["file_name"])) for im in data.get("images", []))


def generate_shapes(
    root: Optional[str] = None,
    split: str = "train",
    num_images: int = 300,
    seed: int = 0,
    *,
    prefix: str = "enact_shapes",
    num_classes: int = 4,
    image_size: Sequence[int] = (128, 192),
    object_size: Sequence[int] = (14, 80),
    max_objects: int = 6,
    max_overlap: float = 0.2,
    background: Sequence[float] = (60, 190),
    noise: float = 12.0,
    image_ext: str = "png",
    force: bool = False,
) -> Tuple[str, str]:
    """Write one split of the shapes dataset (unless already there); returns (json_file, image_root).

    Args:
        root: dataset folder (default :func:`default_shapes_root`).
        split: "train" or "val" (different image streams for the same seed).
        num_images: images in the split; image ``i`` does not depend on ``num_images``.
        seed: base random seed.
        prefix: file-name prefix of the image folder and json.
        num_classes: 3 to 5 (the first ``num_classes`` of :data:`SHAPES_CLASSES`; 1-2 allowed too).
        image_size: (min, max) side of an image in pixels, each side drawn independently.
        object_size: (min, max) size of an object's longer-ish side in pixels (capped at 0.7 of the
            image's shorter side).
        max_objects: objects per image are drawn uniformly in [1, max_objects] (fewer when no
            room is found).
        max_overlap: largest intersection of two boxes, as a fraction of the smaller box.
        background: (min, max) grey level of the background.
        noise: largest standard deviation of the per-image Gaussian pixel noise (0 = plain).
        image_ext: "png" (lossless, default) or "jpg".
        force: regenerate even if the files are up to date.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    _check_num_classes(num_classes)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    image_ext = image_ext.lower().lstrip(".")
    if image_ext not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_ext must be 'png' or 'jpg', got {image_ext!r}")
    if not (0 < image_size[0] <= image_size[1]) or not (3 <= object_size[0] <= object_size[1]):
        raise ValueError(f"bad image_size {image_size} / object_size {object_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    root = os.path.abspath(os.path.expanduser(root or default_shapes_root()))
    params = {
        "generator": "enact_shapes",
        "version": _GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "image_size": [int(v) for v in image_size],
        "object_size": [int(v) for v in object_size],
        "max_objects": int(max_objects),
        "max_overlap": float(max_overlap),
        "background": [float(v) for v in background],
        "noise": float(noise),
        "image_ext": image_ext,
    }
    image_root, json_file = _paths(root, prefix, split)
    if not force and _up_to_date(json_file, image_root, params):
        return json_file, image_root

    t0 = time.perf_counter()
    if num_images >= 100:
        _log(f"generating {num_images} {split} images into {image_root} ...")
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    images, annotations = [], []
    file_names = set()
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], i]))
        img, objects = _make_image(rng, params)
        file_name = f"{i + 1:06d}.{image_ext}"
        file_names.add(file_name)
        path = os.path.join(image_root, file_name)
        if image_ext == "png":
            img.save(path, format="PNG", compress_level=1)
        else:
            img.save(path, format="JPEG", quality=95)
        images.append({"id": i + 1, "file_name": file_name, "width": img.width, "height": img.height})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["category"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    # Remove images of an earlier, larger generation (only our own file names).
    for name in os.listdir(image_root):
        stem, ext = os.path.splitext(name)
        if name not in file_names and stem.isdigit() and len(stem) == 6 and ext in (".png", ".jpg", ".jpeg"):
            os.remove(os.path.join(image_root, name))
    data = {
        "info": {
            "description": f"ENACT synthetic shapes dataset, {split} split",
            "version": str(_GENERATOR_VERSION),
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": SHAPES_CLASSES[k], "supercategory": "shape"} for k in range(num_classes)
        ],
    }
    # The json is written last and atomically: its presence means the images are complete.
    tmp = f"{json_file}.{os.getpid()}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, json_file)
    dt = time.perf_counter() - t0
    if num_images >= 100:
        _log(f"generated {num_images} {split} images ({len(annotations)} objects) in {dt:.1f} s")
    return json_file, image_root


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def _register_coco_style(name: str, metadata: Dict, json_file: str, image_root: str) -> None:
    """``register_coco_instances``, idempotent: same paths and classes -> nothing to do;
    different ones -> the old registration is replaced."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = (
            meta.get("json_file") == json_file
            and meta.get("image_root") == image_root
            and meta.get("thing_classes") == metadata.get("thing_classes")
        )
        if same:
            return
        logger.warning(f"dataset {name!r} is registered with other files; replacing it")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, metadata, json_file, image_root)


def register_shapes(
    name_prefix: str = "enact_shapes",
    root: Optional[str] = None,
    num_train: int = 300,
    num_val: int = 50,
    seed: int = 0,
    **kwargs,
) -> List[str]:
    """Generate (if missing) and register ``{name_prefix}_train`` and ``{name_prefix}_val``.

    The datasets are COCO-style (``register_coco_instances``): their metadata has ``json_file``,
    ``image_root``, ``evaluator_type="coco"`` and ``thing_classes``, so ``COCOEvaluator`` works on
    them.  Calling it again with the same arguments does nothing; with other arguments the files
    are regenerated and the registration replaced.  ``kwargs`` go to :func:`generate_shapes`
    (``num_classes``, ``image_size``, ``object_size``, ``max_objects``, ...); the val split uses
    the same seed, on a different random stream.

    Returns the registered names ``[train, val]``.
    """
    root = os.path.abspath(os.path.expanduser(root or default_shapes_root()))
    metadata = shapes_metadata(kwargs.get("num_classes", 4))
    names = []
    for split, num in (("train", num_train), ("val", num_val)):
        json_file, image_root = generate_shapes(root, split, num, seed, prefix=name_prefix, **kwargs)
        name = f"{name_prefix}_{split}"
        _register_coco_style(name, dict(metadata), json_file, image_root)
        names.append(name)
    return names
