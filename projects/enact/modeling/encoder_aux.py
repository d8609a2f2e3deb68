"""Sparse DETR's encoder auxiliary loss (Roh et al., ICLR 2022, Sec. 3.3): detection heads on the
tokens every sparse encoder layer updated, matched to the ground truth and trained with the
decoder's losses, so that the selected tokens carry object information from the first layer on.

For encoder layer l and its selected tokens y_l (K, B, C) (``TokenSelection.layer_tokens``),
each token t with centre (cx_t, cy_t) on the feature map (normalised by its image's valid
region) predicts::

    logits_t = class_embed(y_t)                                        (num_logits,)
    box_t    = sigmoid(bbox_embed(y_t) + logit([cx_t, cy_t, s, s]))   cxcywh, s = proposal_size

like a two-stage proposal anchored at the token (the last layer of ``bbox_embed`` starts at 0:
every token first proposes an s x s box on itself).  The heads are shared by the encoder layers.
The outputs are dicts as the decoder's, plus ``pred_valid`` (B, K) bool marking the filled
slots (an image has k_b <= K selected tokens): the matcher never matches an empty slot and the
class loss ignores it.  The criterion names layer l's losses ``{name}_enc_{l}`` (weighted as
``name``).
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

from .heads import MLP, inverse_sigmoid
from .sparse_selection import TokenSelection, token_centres

__all__ = ["EncoderAuxHeads"]


class EncoderAuxHeads(nn.Module):
    """Class and box heads for the selected tokens of every sparse encoder layer.

    Args:
        embed_dim: token width C.
        num_logits: class logits per token (the decoder head's: K + 1 with DETR's softmax, K with
            the focal loss of Conditional / Anchor DETR, whose ``init_heads`` also sets this
            head's class bias to the prior).
        proposal_size: s, the width and height (normalised) of the box a token proposes before
            training (Deformable DETR's two-stage proposals on its finest level: 0.05).
    """

    def __init__(self, embed_dim: int, num_logits: int, proposal_size: float = 0.05):
        super().__init__()
        if not 0.0 < proposal_size < 1.0:
            raise ValueError(f"proposal_size must be in (0, 1), got {proposal_size}")
        self.proposal_size = float(proposal_size)
        self.class_embed = nn.Linear(embed_dim, num_logits)
        self.bbox_embed = MLP(embed_dim, embed_dim, 4, num_layers=3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def proposals(self, selection: TokenSelection, shape: Tuple[int, int]) -> torch.Tensor:
        """The logit of every slot's proposal box [cx, cy, s, s] (B, K, 4) float32."""
        height, width = shape
        cx, cy = token_centres(selection.valid, shape)  # (B, W), (B, H)
        index = selection.index.clamp(max=height * width - 1)  # (B, K); empty slots: any token
        centre = torch.stack((cx.gather(1, index % width), cy.gather(1, index // width)), dim=-1)  # (B, K, 2)
        size = centre.new_full(centre.shape, self.proposal_size)
        return inverse_sigmoid(torch.cat((centre, size), dim=-1))

    def forward(self, selection: TokenSelection, shape: Tuple[int, int]) -> List[Dict[str, torch.Tensor]]:
        """One criterion outputs dict per encoder layer: pred_logits (B, K, num_logits),
        pred_boxes (B, K, 4) normalised cxcywh, pred_valid (B, K) bool."""
        if not selection.layer_tokens:
            raise ValueError("the selection has no layer_tokens: call the sparse encoder with return_selection=True")
        anchor = self.proposals(selection, shape)  # (B, K, 4)
        outputs = []
        for tokens in selection.layer_tokens:  # (K, B, C)
            tokens = tokens.transpose(0, 1)  # (B, K, C)
            boxes = (self.bbox_embed(tokens) + anchor.to(tokens.dtype)).sigmoid()
            outputs.append({"pred_logits": self.class_embed(tokens), "pred_boxes": boxes,
                            "pred_valid": selection.slots})
        return outputs
