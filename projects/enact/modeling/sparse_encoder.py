"""Sparse DETR's encoder query sparsification (Roh et al., ICLR 2022) for the dense (MHSA) encoder
of DETR, Conditional DETR and Anchor DETR, alone or with ENACT's clustered keys and values.

:class:`SparseTransformerEncoder` is a :class:`~.transformer.TransformerEncoder` (same layers,
same parameter names, same call ``encoder(src, pos, mask)`` -> memory (N, B, C)) plus a scoring
network ``scorer``; a config swaps the encoder class and sets ``query_ratio`` (rho)::

    model.transformer.encoder._target_ = SparseTransformerEncoder
    model.transformer.encoder.query_ratio = 0.3

For a batch with valid tokens n_b in image b (``mask`` True = padding)::

    s = scorer(src)                                   (B, N) one score per input token
    k_b = ceil(rho * n_b)                             rho = self.query_ratio, read at every call
    S_b = the k_b valid tokens of image b with the highest s (ties: lower index first)
    per layer l, with x the current tokens (N, B, C) (x = src before the first layer):
        y   = norm1(attention(query=x[S], key=x, value=x, query_pos=pos[S], key_pos=pos,
                              key_padding_mask=mask))            only the selected queries,
        y   = norm2(y + dropout2(FFN(y)))                          all valid tokens as keys
        x[S] = y                                     the other tokens are not touched
    memory = x

so a token outside S_b leaves the encoder bit-identical to its input and a pad is never
selected (pads also leave unchanged).  The attention is the layer's own module, called with a
query shorter than its keys: ``MultiheadAttention`` attends to every valid token,
``EnactAttention`` clusters all valid tokens (key = value = x, its shared self-attention path)
and the k_b queries attend to the M_b clusters: rho N x M instead of N x N.  With rho = 1 every
valid token is selected and the encoder computes the dense encoder's function on the valid
tokens.  The selection is gathered with a padded index (B, K), K = max_b k_b (one host sync per
call, to read K), and written back with a scatter whose empty slots go to a discarded extra row:
no Python loop over images, and an image's selection does not depend on the rest of the batch
(a stable sort ranks each row by itself).

The scoring network (:class:`TokenScorer`) reads the encoder's input tokens plus their
positional embedding, ``src + pos`` (``scorer_reads_pos``), detached (``detach_scorer_input``):
``loss_dam`` trains the scorer and nothing else.  Both defaults are measured choices
(docs/sparse_detr.md): the scorer then selects closer to the DAM (overlap 0.63 against 0.39 for
``src`` with loss_dam reaching the backbone) at no cost in detection loss.  The selection is an
index (``torch.sort`` of detached scores), so **no gradient reaches the scorer through the
memory**: the scorer learns only from ``loss_dam`` (:mod:`.sparse_selection`): BCE of its scores against the top k_b tokens of the
decoder cross-attention map (DAM: the weights of all queries, heads and decoder layers on each
memory token, summed, without gradient), mean over valid tokens, counted once.  The paper's
alternative, ``scorer_target="objectness"`` (OS), trains the scorer on the tokens whose centre
lies inside a ground-truth box instead (``loss_os``; the decoders then compute no map).

How the scores and the selection reach the losses (design)
----------------------------------------------------------
No per-call state is kept on any module; everything travels in return values.

* ``encoder(src, pos, mask)`` returns the memory tensor as every encoder does;
  ``encoder(src, pos, mask, return_selection=True)`` returns a :class:`SparseEncoderOutput`
  ``(memory, selection)``, whose :class:`~.sparse_selection.TokenSelection` holds the scores
  (with their graph), the valid-token mask, the padded index, its slot mask and k_b.  The class
  attribute ``returns_selection = True`` tells callers that the keyword exists.
* ``Transformer.forward(..., return_sparse=True)`` (DETR's and Conditional DETR's) calls the
  encoder so, asks its decoder for the DAM (``return_attention_map=True``: each cross-attention
  recomputes its weights from its own q and k without gradient) and returns a third (fourth
  for Conditional DETR) value, :class:`~.sparse_selection.SparseOutputs` ``(selection, dam)``
  (None for a dense encoder).
* ``DETR.run_transformer`` asks for it when the encoder is sparse (in training, or with
  ``return_sparse=True``) and returns it
  as an extra value; ``DETR.forward`` puts it into the criterion's outputs as
  ``outputs["sparse"]``; ``SetCriterion`` adds ``outputs["sparse"].losses(targets)``
  (``loss_dam``, or ``loss_os`` for the objectness target) once, not per decoder layer,
  weighted by ``weight_dict["loss_dam"]`` / ``["loss_os"]`` (no weight: dropped, and the scorer
  gets no gradient).
* Statistics tools call the encoder with ``return_selection=True`` (or the transformer with
  ``return_sparse=True``) the same way; :func:`~.sparse_selection.selection_statistics` measures
  a selection against the DAM and the ground-truth boxes.

Anchor DETR (MHSA) does the same: ``AnchorDETRTransformer.forward(..., return_sparse=True)``,
its row-column cross-attention's DAM being the product of its row and column weights per pixel.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from .sparse_selection import (  # noqa: F401  (re-exported)
    SparseOutputs,
    TokenSelection,
    attention_map,
    check_query_ratio,
    check_scorer_target,
    dam_loss,
    dam_target,
    objectness_target,
    select_tokens,
    selection_statistics,
)
from .transformer import TransformerEncoder

__all__ = [
    "SparseEncoderOutput",
    "SparseOutputs",
    "SparseTransformerEncoder",
    "TokenScorer",
    "TokenSelection",
    "attention_map",
    "check_query_ratio",
    "dam_loss",
    "dam_target",
    "gather_tokens",
    "objectness_target",
    "scatter_tokens",
    "select_tokens",
    "selection_statistics",
]


class SparseEncoderOutput(NamedTuple):
    memory: torch.Tensor  # (N, B, C)
    selection: TokenSelection


class TokenScorer(nn.Module):
    """The scoring network: a per-token MLP, LayerNorm(C) -> Linear(C, H) -> GELU ->
    Linear(H, H/2) -> GELU -> Linear(H/2, 1) (H = ``hidden_dim``, default C).  (N, B, C) -> (N, B).
    Per token, so an image's scores do not depend on its batch."""

    def __init__(self, embed_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden = embed_dim if hidden_dim is None else hidden_dim
        if hidden < 2:
            raise ValueError(f"hidden_dim must be >= 2, got {hidden}")
        self.mlp = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens).squeeze(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, B, C), index (B, K) with N for an empty slot -> (K, B, C) (empty slots: token N - 1)."""
    idx = index.clamp(max=x.shape[0] - 1).t()  # (K, B)
    return torch.gather(x, 0, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (N, B, C) with ``values`` (K, B, C) written at ``index`` (B, K); empty slots (index N)
    go to a discarded extra row.  Every other token of x is copied bit for bit."""
    n, b, c = x.shape
    extended = torch.cat((x, x.new_zeros(1, b, c)), dim=0)  # (N + 1, B, C)
    idx = index.t()[..., None].expand(-1, -1, c)  # (K, B, C)
    return extended.scatter(0, idx, values.to(x.dtype))[:n]


class SparseTransformerEncoder(TransformerEncoder):
    """:class:`TransformerEncoder` whose layers update only the top ``query_ratio`` of each
    image's valid tokens, chosen once by ``scorer`` (see the module docstring).

    Args:
        attention, num_layers, embed_dim, ffn_dim, dropout, activation, num_heads: as
            :class:`TransformerEncoder` (same layers and parameter names: a dense encoder's
            state dict loads with only ``scorer.*`` missing).
        query_ratio: rho in (0, 1]; an attribute read (and checked) at every call, so it may be
            changed between calls (e.g. a lower rho at inference).
        scorer_hidden_dim: hidden width of the :class:`TokenScorer` (default ``embed_dim``).
        detach_scorer_input: score ``src.detach()``, so that ``loss_dam`` trains the scorer only
            (default; measured against letting it reach the backbone in docs/sparse_detr.md).
        scorer_reads_pos: score ``src + pos`` (content and position; default) instead of ``src``.
        scorer_target: what the scorer learns: "dam" (Sparse DETR: the top rho of the decoder
            cross-attention map, ``loss_dam``) or "objectness" (the paper's OS alternative: the
            tokens inside ground-truth boxes, ``loss_os``; the decoders then compute no map).
    """

    returns_selection = True  # forward(..., return_selection=True) gives a SparseEncoderOutput

    def __init__(
        self,
        attention: Optional[nn.Module] = None,
        num_layers: int = 6,
        embed_dim: int = 256,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        num_heads: int = 8,
        query_ratio: float = 0.3,
        scorer_hidden_dim: Optional[int] = None,
        detach_scorer_input: bool = True,
        scorer_target: str = "dam",
        scorer_reads_pos: bool = True,
    ):
        super().__init__(attention, num_layers, embed_dim, ffn_dim, dropout, activation, num_heads)
        self.query_ratio = check_query_ratio(query_ratio)
        self.detach_scorer_input = bool(detach_scorer_input)
        self.scorer_reads_pos = bool(scorer_reads_pos)
        self.scorer_target = check_scorer_target(scorer_target)
        self.scorer = TokenScorer(embed_dim, scorer_hidden_dim)

    def extra_repr(self) -> str:
        return (f"query_ratio={self.query_ratio}, detach_scorer_input={self.detach_scorer_input}, "
                f"scorer_reads_pos={self.scorer_reads_pos}, scorer_target={self.scorer_target!r}")

    def select(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
               pos: Optional[torch.Tensor] = None) -> TokenSelection:
        """Scores src (N, B, C) (+ pos with ``scorer_reads_pos``) and selects each image's top
        rho valid tokens."""
        rho = check_query_ratio(self.query_ratio)
        tokens = src if not self.scorer_reads_pos or pos is None else src + pos
        scores = self.scorer(tokens.detach() if self.detach_scorer_input else tokens).transpose(0, 1)  # (B, N)
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else ~mask
        return select_tokens(scores, valid, rho)

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        return_selection: bool = False,
    ):
        """src, pos (N, B, C); mask (B, N) bool, True = padding.  Returns the memory (N, B, C),
        or a :class:`SparseEncoderOutput` (memory, selection) with ``return_selection``."""
        selection = self.select(src, mask, pos)
        index = selection.index
        query_pos = None if pos is None else gather_tokens(pos, index)  # (K, B, C)
        x = src
        layer_tokens = []
        for layer in self.layers:
            y = layer(x, pos, mask, query=gather_tokens(x, index), query_pos=query_pos)  # (K, B, C)
            layer_tokens.append(y)
            x = scatter_tokens(x, index, y)
        if not return_selection:
            return x
        return SparseEncoderOutput(x, selection._replace(layer_tokens=tuple(layer_tokens)))
