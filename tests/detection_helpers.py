"""Inputs, tiny configurations and checks shared by the detector tests (DETR, Conditional DETR,
Anchor DETR, ENACT-RCDA and the with/without-ENACT detector matrix)."""

import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from projects.enact.modeling.attention import MultiheadAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The one override that shrinks a detector's model config; its defaults are the tiny test model:
# ResNet-18 without DC5, 2 + 2 layers, C = 32, 4 heads, FFN 64, 12 queries (DETR, Conditional
# DETR) or 6 anchors x 2 patterns (Anchor DETR).
shrink_model = LazyConfig.load(os.path.join(ROOT, "configs", "common", "shrink_model.py"), "shrink_model")
NUM_CLASSES = 5


# ---------------------------------------------------------------------- models
def model_config(name: str):
    """The model config of ``configs/<name>.py``, on the CPU."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", f"{name}.py"))
    cfg.model.device = "cpu"
    return cfg.model


def tiny_config(name: str, **kwargs):
    """``model_config(name)`` shrunk to the tiny test model with ``NUM_CLASSES`` classes
    (``kwargs``: other arguments of ``shrink_model``)."""
    return shrink_model(model_config(name), **{"num_classes": NUM_CLASSES, **kwargs})


def sparse(model_cfg, query_ratio: float = 0.3):
    """``model_cfg`` with Sparse DETR's encoder (SparseTransformerEncoder at ``query_ratio``)."""
    from projects.enact.modeling.sparse_encoder import SparseTransformerEncoder

    model_cfg.transformer.encoder._target_ = SparseTransformerEncoder
    model_cfg.transformer.encoder.query_ratio = query_ratio
    return model_cfg


def build(model_cfg, seed: int = 0):
    """The model of ``model_cfg``, instantiated after seeding the global RNG with ``seed``."""
    torch.manual_seed(seed)
    return instantiate(model_cfg)


# ---------------------------------------------------------------------- inputs
def image(h: int, w: int, seed: int) -> torch.Tensor:
    """A random (3, h, w) uint8 image, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def instances(h: int, w: int, boxes: Sequence, classes: Sequence[int]) -> Instances:
    """Ground truth: absolute xyxy ``boxes`` (n, 4) with their ``classes`` (n,)."""
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def sample(
    h: int,
    w: int,
    seed: int,
    boxes: Sequence = (),
    classes: Sequence[int] = (),
    output_size: Optional[Tuple[int, int]] = None,
) -> Dict:
    """One input dict: ``image(h, w, seed)``, its ``instances`` (none by default) and, with
    ``output_size``, the requested output "height" and "width"."""
    x = {"image": image(h, w, seed), "instances": instances(h, w, boxes, classes)}
    if output_size is not None:
        x["height"], x["width"] = output_size
    return x


def two_image_batch(
    first: Tuple[int, int] = (96, 128),
    boxes: Sequence = ((10, 12, 60, 70), (80, 40, 150, 90)),
    second: Tuple[int, int] = (64, 96),
) -> List[Dict]:
    """Two images of different sizes, each with its own size as output size: ``boxes``
    (classes 1 and 3; by default one partly outside the image) on the first, none on the
    second."""
    return [
        sample(*first, 0, boxes, [1, 3], output_size=first),
        sample(*second, 1, output_size=second),
    ]


# ---------------------------------------------------------------------- test modules
class RecordingAttention(MultiheadAttention):
    """MultiheadAttention that records every call as (positional args, sorted keyword names)."""

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", []) + [(args, sorted(kwargs))]
        return super().forward(*args, **kwargs)


class CachedBackbone(torch.nn.Module):
    """Wraps a frozen backbone and returns its first output ever after (fixed input images)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.features = None

    def forward(self, images):
        if self.features is None:
            with torch.no_grad():
                self.features = self.backbone(images)
        return self.features


# ---------------------------------------------------------------------- training
def training_losses(model, batch: List[Dict]):
    """``model``'s weighted losses for ``batch`` in training mode (gradients cleared first): for
    a two-layer decoder, those of the last layer and the auxiliary ones of the first, each a
    finite, non-negative scalar."""
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(batch)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert set(losses) == expected
    for name, value in losses.items():
        value = value.detach()
        assert value.dim() == 0 and torch.isfinite(value) and float(value) >= 0, name
    return losses


def train_steps(model, batch: List[Dict], optimizer, steps: int) -> List[float]:
    """``steps`` optimizer steps on the summed losses of ``batch``; the loss before each."""
    history = []
    for _ in range(steps):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history


def checked_gradients(model, frozen: Optional[Tuple[str, ...]] = None):
    """After a backward pass: every trainable parameter (there are some) has a finite gradient,
    and with ``frozen`` every parameter that does not train starts with one of these prefixes.
    Returns the trainable (name, parameter) pairs."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    if frozen is not None:
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert n.startswith(frozen), n
    return trainable


# ---------------------------------------------------------------------- inference
def inference_batch(batch: List[Dict]) -> List[Dict]:
    """A two-image batch for inference at other output sizes: the first image's output upscaled
    to 192 x 256, the second's at its input size (no "height"/"width")."""
    batch[0]["height"], batch[0]["width"] = 192, 256  # upscaled output
    batch[1].pop("height"), batch[1].pop("width")  # defaults to the input size
    return batch


def infer(model, batch: List[Dict]) -> List[Instances]:
    """``model``'s eval-mode detections (without gradients), one Instances per image."""
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == len(batch)
    return [out["instances"] for out in outputs]


def check_detections(inst: Instances, image_size: Tuple[int, int], num_classes: int) -> None:
    """Instances of the requested size with finite xyxy boxes inside it, scores in decreasing
    order and classes in [0, num_classes)."""
    h, w = image_size
    assert isinstance(inst, Instances)
    assert inst.image_size == (h, w)
    boxes = inst.pred_boxes.tensor
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    assert inst.scores.tolist() == sorted(inst.scores.tolist(), reverse=True)
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()


# ---------------------------------------------------------------------- evaluation
def recomputed_coco_ap(predictions_json, datasets_root) -> Dict[str, float]:
    """AP, AP50 and AP75 (in %) that pycocotools' COCOeval computes from the predictions a run wrote
    (``coco_instances_results.json``) against the one validation json under ``datasets_root``:
    what the run's own COCOEvaluator reports must equal it."""
    import contextlib
    import glob
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (gt_json,) = glob.glob(os.path.join(str(datasets_root), "**", "annotations", "*_val.json"), recursive=True)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        ev = COCOeval(gt, gt.loadRes(str(predictions_json)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1], "AP75": 100 * ev.stats[2]}


# ---------------------------------------------------------------------- tools
def load_tool(name: str):
    """The module of ``tools/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_run(tmp, model_cfg, name_prefix: str) -> Tuple[str, str]:
    """A config (yaml) of ``model_cfg`` with a 3-image shapes val split under ``tmp``, and a
    checkpoint of its initial weights: (config path, checkpoint path), for the tools' tests."""
    from detectron2.config import LazyCall as L
    from detectron2.data import build_detection_test_loader
    from omegaconf import OmegaConf

    from projects.enact.data.shapes_loader import shapes_dataset_dicts
    from projects.enact.data.transforms import build_detr_mapper

    cfg = OmegaConf.create()
    cfg.model = model_cfg
    cfg.train = {"device": "cpu"}
    cfg.dataloader = OmegaConf.create()
    cfg.dataloader.test = L(build_detection_test_loader)(
        dataset=L(shapes_dataset_dicts)(
            split="val", name_prefix=name_prefix, root=str(tmp / "data"), num_train=1, num_val=3, num_classes=4,
            image_size=(32, 128), object_size=(10, 28), max_objects=3, filter_empty=False,
        ),
        mapper=L(build_detr_mapper)(is_train=False, image_format="BGR", min_size=64, max_size=128),
        num_workers=0,
    )
    config = str(tmp / "tiny.yaml")
    LazyConfig.save(cfg, config)
    checkpoint = str(tmp / "model_final.pth")
    torch.save({"model": build(cfg.model).state_dict()}, checkpoint)
    return config, checkpoint
