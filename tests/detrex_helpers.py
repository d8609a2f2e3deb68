"""Shared pieces of the tests against real detrex (marked ``detrex``): tiny detrex models built
from detrex's own configs, and images.  Importing this module does not import detrex."""
import torch

# detrex config of each model covered (relative to the detrex checkout) and its attention_type
DETREX_MODELS = {
    "detr": ("projects/detr/configs/detr_r50_300ep.py", None),
    "conditional_detr": ("projects/conditional_detr/configs/conditional_detr_r50_50ep.py", None),
    "dab_detr": ("projects/dab_detr/configs/dab_detr_r50_50ep.py", None),
    "dn_detr": ("projects/dn_detr/configs/dn_detr_r50_50ep.py", None),
    "group_detr": ("projects/group_detr/configs/group_detr_r50_50ep.py", None),
    "anchor_detr_rcda": ("projects/anchor_detr/configs/anchor_detr_r50_50ep.py", "RCDA"),
    "anchor_detr_mhsa": ("projects/anchor_detr/configs/anchor_detr_r50_50ep.py", "nn.MultiheadAttention"),
    "pnp_detr": ("projects/pnp_detr/configs/pnp_detr_r50_300ep.py", None),
}


def shrink_detrex_model(model, layers: int = 2, queries: int = 10, ffn: int = 64, backbone: bool = True):
    """A detrex model config made tiny in place: R18 backbone without pretrained weights and with
    nothing frozen (``backbone=False``: the config's, e.g. a dilated R50 for DC5), ``layers`` encoder
    and decoder layers, small FFNs, ``queries`` queries, CPU."""
    model.device = "cpu"
    if not backbone:
        pass
    elif "stages" in model.backbone:  # detrex's ResNet
        stages = model.backbone.stages
        stages.depth = 18
        stages.pop("stride_in_1x1", None)
        model.backbone.freeze_at = 0
        model.in_channels = 512
    else:  # Anchor DETR's TorchvisionResNet (built without pretrained weights)
        model.backbone.name = "resnet18"
        model.in_channels = 512
    tr = model.transformer
    if "encoder" in tr:
        for part in (tr.encoder, tr.decoder):
            part.num_layers = layers
            part.feedforward_dim = ffn
    else:  # Anchor DETR
        tr.num_encoder_layers = tr.num_decoder_layers = layers
        tr.dim_feedforward = ffn
        tr.num_query_position = queries
    for key in ("num_queries", "select_box_nums_for_evaluation"):
        if key in model:
            model[key] = queries
    if "group_nums" in model:
        model.group_nums = 2
    return model


def perturb_heads(model, seed: int = 0, scale: float = 0.05):
    """Move the prediction heads and query embeddings away from their (often zero) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name and not name.startswith("backbone"):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def padded_images(seed: int = 0):
    """Two images of different sizes (detectron2 pads them into one batch)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, 96, 128), generator=g).float(), "height": 96, "width": 128},
        {"image": torch.randint(0, 256, (3, 128, 80), generator=g).float(), "height": 128, "width": 80},
    ]


def prediction_diff(original, model, images) -> float:
    """Largest difference of the two models' eval predictions on ``images``: scores, and boxes
    relative to the image size; the predicted classes must be equal."""
    with torch.no_grad():
        ref, out = original(images), model(images)
    diff = 0.0
    for r, o, img in zip(ref, out, images):
        r, o = r["instances"], o["instances"]
        assert torch.equal(r.pred_classes, o.pred_classes)
        size = torch.tensor([img["width"], img["height"]] * 2, dtype=torch.float32)
        diff = max(diff, (r.scores - o.scores).abs().max().item(),
                   ((r.pred_boxes.tensor - o.pred_boxes.tensor) / size).abs().max().item())
    return diff


def flat_config(node, prefix: str = "") -> dict:
    """A (Lazy)config tree as {"a.b.c": value}."""
    from omegaconf import OmegaConf

    out = {}
    for key, value in node.items():
        if isinstance(value, dict) or OmegaConf.is_dict(value):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_detrex_except_results_folder(cfg, base):
    """``cfg``'s dataloader, optimizer and lr_multiplier equal detrex's config ``base``'s, except
    the evaluator's folder, which is ``${train.output_dir}`` (an interpolation: it follows the
    command line's train.output_dir), where detrex copies a string or writes nothing."""
    from omegaconf import OmegaConf

    ours, theirs = OmegaConf.to_container(cfg.dataloader), OmegaConf.to_container(base.dataloader)
    assert ours["evaluator"].pop("output_dir") == "${train.output_dir}"
    theirs["evaluator"].pop("output_dir", None)
    assert ours == theirs
    for part in ("optimizer", "lr_multiplier"):
        assert OmegaConf.to_yaml(cfg[part]) == OmegaConf.to_yaml(base[part]), part


def write_tiny_coco(root, images: int = 3, splits=("val2017", "train2017")):
    """A COCO-format folder as detectron2's builtin registration expects it under
    ``$DETECTRON2_DATASETS`` (``root/coco/{split}/*.png``, ``root/coco/annotations/instances_{split}.json``,
    the 80 COCO categories with their ids): ``images`` small images of filled rectangles, two
    objects each (a person and a car).  Returns ``root``."""
    import json
    import os

    import numpy as np
    from PIL import Image
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "coco", "annotations"), exist_ok=True)
    for split in splits:
        folder = os.path.join(root, "coco", split)
        os.makedirs(folder, exist_ok=True)
        entries, annotations = [], []
        for i in range(images):
            h, w = (96, 128) if i % 2 == 0 else (128, 96)
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            for j, (x, y, bw, bh, cat) in enumerate([(8, 10, w // 3, h // 2, 1), (w // 2, h // 3, w // 3, h // 2, 3)]):
                pixels[y:y + bh, x:x + bw] = (200, 80 * j, 40)
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                    "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
            Image.fromarray(pixels).save(os.path.join(folder, f"{i + 1:06d}.png"))
            entries.append({"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": h, "width": w})
        with open(os.path.join(root, "coco", "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": entries, "annotations": annotations, "categories": categories}, f)
    return root


# a configs/detrex/ config made tiny for the tools and train_net: its model shrunk (R18, 2 + 2
# layers, 10 queries), test images resized to 128 px; dataloader and evaluator stay detrex's
TINY_DETREX_CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from detectron2.config import LazyConfig
from detrex_helpers import shrink_detrex_model

_cfg = LazyConfig.load({config!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _cfg[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train"))
shrink_detrex_model(model)
model.device = train.device = "cpu"
train.init_checkpoint = ""
dataloader.test.mapper.augmentation[0].short_edge_length = 128
dataloader.test.mapper.augmentation[0].max_size = 200
dataloader.test.num_workers = 0
'''


def tiny_detrex_config(path, folder, sigma=None):
    """Writes ``TINY_DETREX_CONFIG`` of ``path`` (a configs/detrex/ file) into ``folder``; returns
    the new file's path (named as ``path``)."""
    from pathlib import Path

    text = TINY_DETREX_CONFIG.format(tests=str(Path(__file__).parent), config=str(path))
    if sigma is not None:
        text += f"model.transformer.encoder.sigma = {sigma}\n"
    out = Path(folder) / Path(path).name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return str(out)
