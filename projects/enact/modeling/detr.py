"""DETR (Carion et al., 2020) as a detectron2 meta-architecture, with a swappable encoder
self-attention (standard multi-head attention or ENACT).

Pipeline, for a batch of B images padded to (H, W)::

    images (B, 3, H, W) --backbone--> res5 (B, 2048, H/32, W/32) --1x1 conv--> src (B, C, h, w)
    padding mask (B, H, W) --nearest--> mask (B, h, w) --sine--> pos (B, C, h, w)
    transformer(src, mask, queries (Q, C), pos) -> hs (L, B, Q, C)
    class head: Linear(C, K + 1) -> logits (L, B, Q, K + 1)   (last class = "no object")
    box head:   3-layer MLP + sigmoid -> boxes (L, B, Q, 4), normalised cxcywh

Training returns the weighted set-prediction losses of the last decoder layer and, with
``aux_loss``, of every intermediate one (suffix ``_{i}``).  Inference returns, per image, the
``select_box_nums_for_evaluation`` best queries (score = max softmax probability over the real
classes) as detectron2 ``Instances`` in the coordinates of the requested output size.

Ground truth: ``Instances.gt_boxes`` are absolute xyxy boxes in the coordinates of the input
image tensor.  Boxes are clipped to the image and boxes left empty (zero width or height, or
non-finite) are dropped before matching: they cannot be predicted by a sigmoid head and would make
the GIoU undefined.  An image without boxes is valid (all its queries learn "no object").

``DETR.forward`` runs overridable steps (``encode_images`` -> ``run_transformer`` -> ``predict``
-> losses or ``postprocess``); :class:`ReferencePointDETR` is the sigmoid-head variant with boxes
relative to reference points that Conditional DETR and Anchor DETR build on.
"""

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .act import act_branch, act_twins, mtkd_loss
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .encoder_aux import EncoderAuxHeads
from .heads import MLP, inverse_sigmoid

__all__ = [
    "MLP",
    "inverse_sigmoid",
    "DETR",
    "ReferencePointDETR",
]

# detectron2's default statistics (BGR, 0-255), i.e. MODEL.PIXEL_MEAN / MODEL.PIXEL_STD.
DEFAULT_PIXEL_MEAN = (103.530, 116.280, 123.675)
DEFAULT_PIXEL_STD = (57.375, 57.120, 58.395)

_AUX_SUFFIX = re.compile(r"(_enc)?_\d+$")  # decoder layer i: _{i}; encoder layer l: _enc_{l}


class DETR(nn.Module):
    """DETR detector (detectron2 meta-architecture interface).

    Args:
        backbone: module mapping (B, 3, H, W) to a dict of feature maps containing ``in_features``.
        position_embedding: module mapping a padding mask (B, h, w) to (B, embed_dim, h, w),
            e.g. ``PositionEmbeddingSine(embed_dim // 2)``.
        transformer: :class:`Transformer` (its encoder holds the swappable attention).
        num_classes: number of object classes (without "no object").
        num_queries: number of object queries Q.
        in_features: name of the backbone output fed to the transformer.
        in_channels: channels of that feature map.
        embed_dim: transformer width C.
        criterion: :class:`SetCriterion`; its ``weight_dict`` weights the returned losses.  May be
            ``None`` for an inference-only model.
        aux_loss: also supervise the intermediate decoder layers.
        pixel_mean, pixel_std: per-channel normalisation of the input images, in the channel
            order of the inputs (detectron2's BGR defaults when ``None``).
        mtkd_attention: an ``ActAttention`` prototype turns on ACT's multi-task knowledge
            distillation (MTKD, Eq. 7 of the ACT paper) in training: the same features also go
            through the encoder with ACT in place of its (full) attention, shared weights, and the
            losses get ``loss_mtkd = mtkd_weight * |B_act - B_full.detach()|^2`` (last decoder
            layer's boxes, summed over coordinates, mean over queries).  Inference is unchanged
            (the full branch); evaluate the ACT branch with the ``_act`` config.
        mtkd_weight: the weight of ``loss_mtkd`` (the paper: 1).
        encoder_aux_loss: with a sparse encoder (Sparse DETR), also supervise the tokens every
            encoder layer updated with detection heads of their own (:mod:`.encoder_aux`), the
            losses ``{name}_enc_{l}`` weighted as ``name``.  Off by default: on the shapes recipe it
            cost 4.7 AP over 2 seeds (docs/sparse_detr.md, "The encoder auxiliary loss").
        device: device the model is moved to.
        select_box_nums_for_evaluation: detections kept per image at inference (at most Q).
    """

    sigmoid_classes = False  # K + 1 softmax logits per query, the last "no object"

    def __init__(
        self,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: nn.Module,
        num_classes: int = 80,
        num_queries: int = 100,
        in_features: str = "res5",
        in_channels: int = 2048,
        embed_dim: int = 256,
        criterion: Optional[nn.Module] = None,
        aux_loss: bool = True,
        pixel_mean: Optional[Sequence[float]] = None,
        pixel_std: Optional[Sequence[float]] = None,
        device: str = "cpu",
        select_box_nums_for_evaluation: int = 100,
        mtkd_attention: Optional[nn.Module] = None,
        mtkd_weight: float = 1.0,
        encoder_aux_loss: bool = False,
    ):
        super().__init__()
        if num_classes < 1 or num_queries < 1:
            raise ValueError(
                f"num_classes ({num_classes}) and num_queries ({num_queries}) must be >= 1"
            )
        if select_box_nums_for_evaluation < 1:
            raise ValueError(
                f"select_box_nums_for_evaluation must be >= 1, got {select_box_nums_for_evaluation}"
            )
        if hasattr(backbone, "output_shape"):
            shapes = backbone.output_shape()
            if in_features not in shapes:
                raise ValueError(f"backbone has no output {in_features!r}; it has {sorted(shapes)}")
            if shapes[in_features].channels != in_channels:
                raise ValueError(
                    f"backbone output {in_features!r} has {shapes[in_features].channels} channels, "
                    f"in_channels={in_channels}"
                )
        t_dim = getattr(transformer, "embed_dim", embed_dim)
        if t_dim != embed_dim:
            raise ValueError(f"transformer width ({t_dim}) differs from embed_dim ({embed_dim})")

        self.backbone = backbone
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.in_features = in_features
        self.embed_dim = embed_dim
        self.criterion = criterion
        self.aux_loss = aux_loss
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.mtkd_weight = float(mtkd_weight)
        # per-layer ACT twins of the encoder attention (projection buffers only), or None
        self.mtkd_act = None if mtkd_attention is None else act_twins(transformer.encoder, mtkd_attention)

        self.input_proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        self.class_embed = nn.Linear(embed_dim, num_classes + 1)
        self.bbox_embed = MLP(embed_dim, embed_dim, 4, num_layers=3)
        self.encoder_aux = None  # Sparse DETR's encoder auxiliary heads
        if encoder_aux_loss:
            if not self.sparse_encoder:
                raise ValueError(
                    "encoder_aux_loss=True needs a sparse encoder (e.g. SparseTransformerEncoder, "
                    f"model.transformer.encoder._target_); the encoder is {type(getattr(transformer, 'encoder', None)).__name__}"
                )
            num_logits = num_classes if self.sigmoid_classes else num_classes + 1
            self.encoder_aux = EncoderAuxHeads(embed_dim, num_logits)

        pixel_mean = DEFAULT_PIXEL_MEAN if pixel_mean is None else pixel_mean
        pixel_std = DEFAULT_PIXEL_STD if pixel_std is None else pixel_std
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(
                f"pixel_mean ({len(pixel_mean)}) and pixel_std ({len(pixel_std)}) differ in length"
            )
        self.register_buffer(
            "pixel_mean",
            torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "pixel_std",
            torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1),
            persistent=False,
        )
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, batched_inputs) -> None:
        if isinstance(batched_inputs, dict) or not isinstance(batched_inputs, (list, tuple)):
            raise TypeError(
                "batched_inputs must be a list of dicts (one per image), got "
                f"{type(batched_inputs).__name__}"
            )
        if len(batched_inputs) == 0:
            raise ValueError("batched_inputs is empty")
        channels = self.pixel_mean.shape[0]
        for i, x in enumerate(batched_inputs):
            if not isinstance(x, dict):
                raise TypeError(f"batched_inputs[{i}] must be a dict, got {type(x).__name__}")
            if "image" not in x:
                raise KeyError(
                    f"batched_inputs[{i}] has no 'image' key (a (C, H, W) tensor); "
                    f"keys: {sorted(map(str, x))}"
                )
            image = x["image"]
            if (
                not isinstance(image, torch.Tensor)
                or image.dim() != 3
                or image.shape[0] != channels
            ):
                shape = (
                    tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                )
                raise ValueError(
                    f"batched_inputs[{i}]['image'] must be a ({channels}, H, W) tensor, got {shape}"
                )
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"batched_inputs[{i}]['image'] is empty: {tuple(image.shape)}")

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise the images and pad them (with zeros, after normalisation) into one batch."""
        images = [
            (x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean)
            / self.pixel_std
            for x in batched_inputs
        ]
        return ImageList.from_tensors(images)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """(B, H, W) bool at the padded image resolution, True on padding."""
        b, _, h, w = images.tensor.shape
        mask = torch.ones((b, h, w), dtype=torch.bool, device=images.tensor.device)
        for i, (img_h, img_w) in enumerate(images.image_sizes):
            mask[i, :img_h, :img_w] = False
        return mask

    def prepare_targets(
        self, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict[str, torch.Tensor]]:
        """Instances -> [{"labels": (n,) int64, "boxes": (n, 4) cxcywh normalised by (w, h)}].

        Boxes are clipped to the (unpadded) image and empty boxes dropped (see module docstring).
        """
        targets = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            if "instances" not in x:
                raise ValueError(
                    f"training needs ground truth: batched_inputs[{i}] has no 'instances' key "
                    "(an Instances with gt_boxes and gt_classes; use an empty Instances for an "
                    "image without objects)"
                )
            inst = x["instances"]
            if not isinstance(inst, Instances):
                raise ValueError(
                    f"batched_inputs[{i}]['instances'] must be a detectron2 Instances, "
                    f"got {type(inst).__name__}"
                )
            fields = inst.get_fields()
            if fields and not ("gt_boxes" in fields and "gt_classes" in fields):
                raise ValueError(
                    f"batched_inputs[{i}]['instances'] needs fields gt_boxes and gt_classes, "
                    f"has {sorted(fields)}"
                )
            if not fields:  # an Instances without any field: no objects
                boxes = torch.zeros((0, 4), dtype=torch.float32, device=self.device)
                labels = torch.zeros((0,), dtype=torch.int64, device=self.device)
            else:
                gt = fields["gt_boxes"]
                xyxy = (gt.tensor if isinstance(gt, Boxes) else torch.as_tensor(gt)).reshape(-1, 4)
                xyxy = xyxy.to(self.device, torch.float32)  # (n, 4) absolute
                finite = torch.isfinite(xyxy).all(dim=1)
                xyxy = torch.stack(
                    (
                        xyxy[:, 0].clamp(0, w),
                        xyxy[:, 1].clamp(0, h),
                        xyxy[:, 2].clamp(0, w),
                        xyxy[:, 3].clamp(0, h),
                    ),
                    dim=1,
                )  # clipped to the image
                keep = finite & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # (n,)
                labels = torch.as_tensor(fields["gt_classes"]).to(self.device, torch.int64)[keep]
                if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                    raise ValueError(
                        f"batched_inputs[{i}]: gt_classes must be in [0, {self.num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]"
                    )
                scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
                boxes = box_xyxy_to_cxcywh(xyxy[keep] / scale)  # (n', 4) normalised cxcywh
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts with "image" (C, H, W) tensor; for training also
                "instances" (Instances with gt_boxes, gt_classes); optionally "height"/"width",
                the output resolution at inference.

        Returns:
            training: dict of weighted losses; inference: ``[{"instances": Instances}]`` with
            pred_boxes (absolute xyxy in height x width), scores, pred_classes.

        The steps, for subclasses to override: :meth:`encode_images`, :meth:`run_transformer`,
        :meth:`predict`, then :meth:`weight_losses` of the criterion's losses (training) or
        :meth:`postprocess` (inference).
        """
        self._check_inputs(batched_inputs)
        if self.training and self.criterion is None:
            raise ValueError(
                f"{type(self).__name__} was built without a criterion; it can only run in eval mode"
            )
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images) if self.training else None

        src, mask, pos = self.encode_images(images)  # (B, C, h, w), (B, h, w), (B, C, h, w)
        hs, reference, *sparse = self.run_transformer(src, mask, pos)  # (L, B, Q, C), (B, Q, 2) or None
        outputs = self.predict(hs, reference)
        if sparse and sparse[0] is not None:  # a sparse encoder's selection and DAM: loss_dam
            outputs["sparse"] = sparse[0]
            if self.encoder_aux is not None:  # heads on every encoder layer's selected tokens
                outputs["encoder_aux_outputs"] = self.encoder_aux(sparse[0].selection, sparse[0].shape)

        if self.training:
            losses = self.weight_losses(self.criterion(outputs, targets))
            if self.mtkd_act is not None:  # MTKD: the ACT branch on the same features
                with act_branch(self.transformer.encoder, self.mtkd_act):
                    act_outputs = self.predict(*self.run_transformer(src, mask, pos)[:2])
                losses["loss_mtkd"] = self.mtkd_weight * mtkd_loss(act_outputs["pred_boxes"], outputs["pred_boxes"])
            return losses
        return self.postprocess(batched_inputs, outputs, images)

    def encode_images(
        self, images: ImageList
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The backbone feature map projected to the transformer width, src (B, C, h, w); the
        padding mask at its resolution, mask (B, h, w); its positional embedding pos (B, C, h, w)
        (``None`` for a model without ``position_embedding``)."""
        mask = self.padding_mask(images)  # (B, H, W)
        features = self.backbone(images.tensor)[self.in_features]  # (B, C_in, h, w)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].bool()  # (B, h, w)
        pos = None if self.position_embedding is None else self.position_embedding(mask)
        src = self.input_proj(features)  # (B, C, h, w)
        return src, mask, pos

    def run_transformer(
        self, src: torch.Tensor, mask: torch.Tensor, pos: Optional[torch.Tensor], return_sparse: Optional[bool] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The decoder outputs hs (L, B, Q, C) and the queries' reference points (B, Q, 2)
        (``None``: DETR has none); with a sparse encoder and ``return_sparse`` (default: in
        training) also its :class:`~.sparse_selection.SparseOutputs` (the criterion's
        ``loss_dam``; the statistics tools ask for it in eval mode)."""
        if self.want_sparse(return_sparse):
            hs, _, sparse = self.transformer(src, mask, self.query_embed.weight, pos, return_sparse=True)
            return hs, None, sparse
        hs, _ = self.transformer(src, mask, self.query_embed.weight, pos)  # (L, B, Q, C)
        return hs, None

    def want_sparse(self, return_sparse: Optional[bool]) -> bool:
        """Whether :meth:`run_transformer` returns a sparse encoder's outputs (None: in training)."""
        return self.sparse_encoder and (self.training if return_sparse is None else bool(return_sparse))

    @property
    def sparse_encoder(self) -> bool:
        """Whether the encoder is Sparse DETR's (it returns its token selection on request)."""
        return bool(getattr(getattr(self.transformer, "encoder", None), "returns_selection", False))

    def predict(self, hs: torch.Tensor, reference: Optional[torch.Tensor] = None) -> Dict:
        """hs (L, B, Q, C) -> the criterion's outputs dict (see :meth:`head_outputs`)."""
        logits = self.class_embed(hs)  # (L, B, Q, K + 1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4) cxcywh in [0, 1]
        return self.head_outputs(logits, boxes)

    def head_outputs(self, logits: torch.Tensor, boxes: torch.Tensor) -> Dict:
        """Per-layer logits (L, B, Q, K') and boxes (L, B, Q, 4) -> ``{"pred_logits",
        "pred_boxes"}`` of the last layer, with ``aux_outputs`` (the same for the first L - 1
        layers) when ``aux_loss``."""
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])
            ]
        return outputs

    def postprocess(
        self, batched_inputs: List[Dict], outputs: Dict, images: ImageList
    ) -> List[Dict[str, Instances]]:
        """:meth:`inference` on the last layer's outputs, rescaled to each image's requested
        "height" x "width" (the input size by default)."""
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        processed = []
        for x, result, (h, w) in zip(batched_inputs, results, images.image_sizes):
            height, width = x.get("height", h), x.get("width", w)
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def weight_losses(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``losses[k] * weight_dict[k]``; an auxiliary loss ``{name}_{i}`` missing from the
        weight dict takes the weight of ``name``.  Losses without a weight are dropped (they are
        not meant to be optimised)."""
        weight_dict = self.criterion.weight_dict
        weighted = {}
        for k, v in losses.items():
            weight = weight_dict.get(k, weight_dict.get(_AUX_SUFFIX.sub("", k)))
            if weight is not None:
                weighted[k] = v * weight
        return weighted

    @torch.no_grad()
    def inference(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes) -> List[Instances]:
        """logits (B, Q, K + 1), boxes (B, Q, 4) normalised cxcywh -> B Instances in input-image
        coordinates, the ``select_box_nums_for_evaluation`` highest-scoring queries each."""
        probs = logits.softmax(-1)[..., :-1]  # (B, Q, K): drop "no object"
        scores, labels = probs.max(-1)  # (B, Q)
        k = min(self.select_box_nums_for_evaluation, scores.shape[1])
        results = []
        for score, label, box, image_size in zip(scores, labels, boxes, image_sizes):
            top_score, top_idx = score.topk(k)  # (k,)
            results.append(_detections(box, top_idx, top_score, label[top_idx], image_size))
        return results


def _detections(
    boxes: torch.Tensor,
    query: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_size: Tuple[int, int],
) -> Instances:
    """One image's detections: the boxes (Q, 4), normalised cxcywh, of the queries ``query``
    (k,) with their scores and labels (k,), as Instances in (h, w) = ``image_size`` coordinates
    (absolute xyxy, clipped to the image)."""
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
    result = Instances((h, w))
    result.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes[query]) * scale)  # (k, 4) absolute
    result.pred_boxes.clip((h, w))
    result.scores = scores
    result.pred_classes = labels
    return result


class ReferencePointDETR(DETR):
    """Base of Conditional DETR and Anchor DETR: a sigmoid class head over the K classes (focal
    loss, no "no object" logit) and boxes predicted relative to per-query reference points.

    Subclasses build the heads and call :meth:`init_heads`; their :meth:`run_transformer`
    returns the reference points (B, Q, 2) as (x, y) in [0, 1].
    """

    sigmoid_classes = True  # K sigmoid logits per query (focal loss), no "no object" logit

    def init_heads(self, prior_prob: float) -> None:
        """Class logits start at the prior probability ``prior_prob``; the last layer of the box
        head starts at zero, i.e. every query first predicts a box of half the image size
        centred on its reference point."""
        prior_bias = -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(self.class_embed.bias, prior_bias)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if self.encoder_aux is not None:  # the encoder heads' K sigmoid logits start at the same prior
            nn.init.constant_(self.encoder_aux.class_embed.bias, prior_bias)

    def predict(self, hs: torch.Tensor, reference: torch.Tensor) -> Dict:
        """hs (L, B, Q, C), reference (B, Q, 2) -> the criterion's outputs dict: pred_logits
        (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh, aux_outputs of the first L - 1 layers.

        Boxes: ``sigmoid(MLP(h) + [inverse_sigmoid(reference), 0, 0])``, centre offsets on the
        inverse sigmoid of the reference point, width and height predicted directly."""
        logits = self.class_embed(hs)  # (L, B, Q, K)
        delta = self.bbox_embed(hs)  # (L, B, Q, 4)
        offset = F.pad(inverse_sigmoid(reference), (0, 2))  # (B, Q, 4): centre only
        boxes = (delta + offset).sigmoid()  # (L, B, Q, 4)
        return self.head_outputs(logits, boxes)

    @torch.no_grad()
    def inference(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes) -> List[Instances]:
        """logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh -> B Instances in input-image
        coordinates: the ``select_box_nums_for_evaluation`` best (query, class) pairs by sigmoid
        probability, over all queries and classes (a query may appear with several classes)."""
        num_classes = logits.shape[-1]
        probs = logits.sigmoid().flatten(1)  # (B, Q * K)
        k = min(self.select_box_nums_for_evaluation, probs.shape[1])
        results = []
        for prob, box, image_size in zip(probs, boxes, image_sizes):
            score, idx = prob.topk(k)  # (k,), sorted
            query = torch.div(idx, num_classes, rounding_mode="floor")  # (k,)
            results.append(_detections(box, query, score, idx % num_classes, image_size))
        return results
