"""ResNet backbones for the DETR detectors, built from detectron2's ``ResNet``.

Two entry points, both plain functions of plain arguments so that a detectron2 LazyConfig can
call them through ``LazyCall``:

* ``make_resnet_stages(depth, ...)`` returns the list of stages that ``ResNet(stem, stages, ...)``
  expects (like ``ResNet.make_default_stages``, plus a ``res5_dilation`` option for DC5);
* ``build_resnet_backbone(depth, dilation, ...)`` returns the whole ``ResNet``.

A LazyConfig can use either form, e.g.::

    backbone = L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(make_resnet_stages)(depth=50, norm="FrozenBN", res5_dilation=2),
        out_features=["res5"],
        freeze_at=2,
    )
    # or simply
    backbone = L(build_resnet_backbone)(depth=50, dilation=True)

The defaults follow DETR: frozen batch norm everywhere ("FrozenBN", whose affine terms are
buffers, not parameters), the stem and res2 frozen (``freeze_at=2``: the DETR, Conditional DETR
and Anchor DETR code trains ``layer2``-``layer4`` only), the stride on the 3x3 convolution
(``stride_in_1x1=False``, the torchvision layout of the ImageNet weights DETR starts from) and
only ``res5`` returned.

DC5: ``res5_dilation=2`` removes the stride of res5 (output stride 16 instead of 32) and dilates
its 3x3 convolutions.  As in torchvision's ``replace_stride_with_dilation`` (which DETR-DC5 uses),
the first block of the stage keeps dilation 1 and the following blocks use ``res5_dilation``;
``dilate_first_block=True`` dilates every block instead, as detectron2's
``MODEL.RESNETS.RES5_DILATION`` does.  Both layouts have the same parameters.
"""

from typing import List, Sequence, Union

from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

__all__ = ["RESNET_BLOCKS_PER_STAGE", "make_resnet_stages", "build_resnet_backbone"]

# Number of residual blocks in res2..res5 for each supported depth.
RESNET_BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def make_resnet_stages(
    depth: int = 50,
    norm: str = "FrozenBN",
    stride_in_1x1: bool = False,
    res5_dilation: int = 1,
    dilate_first_block: bool = False,
) -> List[list]:
    """The four stages (res2..res5) of a ResNet of the given depth, for ``ResNet(stem, stages)``.

    Args:
        depth: 18, 34, 50, 101 or 152 (DETR uses 50 and 101).
        norm: normalisation of every convolution, see ``detectron2.layers.get_norm``.
        stride_in_1x1: put the stride of a bottleneck on its 1x1 (MSRA/caffe weights) rather
            than its 3x3 convolution (torchvision weights, DETR's default).
        res5_dilation: 1 (output stride 32) or 2 (DC5: output stride 16).
        dilate_first_block: also dilate the first block of res5 (detectron2 layout), see the
            module docstring.
    """
    if depth not in RESNET_BLOCKS_PER_STAGE:
        raise ValueError(
            f"ResNet depth must be one of {sorted(RESNET_BLOCKS_PER_STAGE)}, got {depth}"
        )
    if res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
    bottleneck = depth >= 50
    if res5_dilation != 1 and not bottleneck:
        raise ValueError(f"res5_dilation={res5_dilation} needs a bottleneck ResNet (depth >= 50)")

    if bottleneck:
        in_channels, out_channels = (64, 256, 512, 1024), (256, 512, 1024, 2048)
    else:
        in_channels, out_channels = (64, 64, 128, 256), (64, 128, 256, 512)
    stages = []
    for idx, num_blocks in enumerate(RESNET_BLOCKS_PER_STAGE[depth]):
        first_stride = 1 if idx == 0 else 2
        kwargs = {"norm": norm}
        if bottleneck:
            kwargs.update(bottleneck_channels=out_channels[idx] // 4, stride_in_1x1=stride_in_1x1)
        if idx == 3 and res5_dilation != 1:
            # DC5: keep res5 at the resolution of res4 and enlarge the receptive field instead.
            first_stride = 1
            first_dilation = res5_dilation if dilate_first_block else 1
            kwargs["dilation_per_block"] = [first_dilation] + [res5_dilation] * (num_blocks - 1)
        stages.append(
            ResNet.make_stage(
                block_class=BottleneckBlock if bottleneck else BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels[idx],
                out_channels=out_channels[idx],
                **kwargs,
            )
        )
    return stages


def build_resnet_backbone(
    depth: int = 50,
    dilation: Union[bool, int] = False,
    freeze_at: int = 2,
    norm: str = "FrozenBN",
    out_features: Sequence[str] = ("res5",),
    stride_in_1x1: bool = False,
    dilate_first_block: bool = False,
) -> ResNet:
    """A detectron2 ``ResNet`` configured as DETR's backbone.

    Args:
        depth: ResNet depth (50 or 101 for DETR; 18 and 34 also work, e.g. for small tests).
        dilation: ``True`` (or 2) for the DC5 variant (``res5_dilation=2``).
        freeze_at: number of leading stages frozen (1 = the stem, 2 = the stem and res2, DETR's
            choice), see ``ResNet.freeze``.
        norm: normalisation, "FrozenBN" by default.
        out_features: names of the returned feature maps.
        stride_in_1x1, dilate_first_block: see :func:`make_resnet_stages`.

    Returns:
        a ``ResNet`` whose forward maps (B, 3, H, W) images to ``{"res5": (B, C, H', W')}`` with
        C = 2048 (depth >= 50) or 512, and H' = ceil(H / 32) (or / 16 with dilation).
    """
    if isinstance(dilation, bool):
        res5_dilation = 2 if dilation else 1
    else:
        res5_dilation = int(dilation)
    stem = BasicStem(in_channels=3, out_channels=64, norm=norm)
    stages = make_resnet_stages(
        depth=depth,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        res5_dilation=res5_dilation,
        dilate_first_block=dilate_first_block,
    )
    return ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at)
