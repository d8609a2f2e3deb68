"""Using ENACT inside detrex's own models and configs.

detrex is a dependency used from its checkout: its ``detrex`` package must be importable (built
in place, see ``make test-detrex``) and its ``projects/`` folder (not an installed package; the
model code of DETR, DAB-DETR, ...) is found in the checkout root, which is

1. ``$DETREX_ROOT`` if set, else
2. the folder above the imported ``detrex`` package, if it holds ``projects/``.

:func:`detrex_root` puts that root on ``sys.path`` (``projects`` is a namespace package, so
detrex's ``projects.dab_detr`` and this ``projects.enact`` import together) and raises a
``RuntimeError`` saying what to set when it cannot find it.

The ENACT encoders for configs are subclasses of detrex's encoder classes, created on first
access (``from projects.enact.detrex_support import EnactDabDetrTransformerEncoder``); each takes
the detrex class's arguments plus ``sigma``, ``mode``, ``backend`` and ``attn_implementation``, so
a detrex config switches to ENACT with two lines and keeps all its keys::

    model.transformer.encoder._target_ = EnactDabDetrTransformerEncoder
    model.transformer.encoder.sigma = 5

ACT (the comparator, :func:`~projects.enact.modeling.act_adapter.act_encoder`) has the same
classes named ``Act...`` (``ActDetrTransformerEncoder``, ...; ``DETREX_ACT_ENCODERS``), taking
``num_hashes``, ``bucket_width``, ``seed`` and ``attn_implementation`` instead; Anchor DETR's only
with its ``nn.MultiheadAttention`` encoder (ACT has no RCDA form: a clear error otherwise).
Anchor DETR and PnP-DETR build their encoder inside the transformer, so their classes subclass the
transformer (``EnactAnchorDETRTransformer``, ``EnactPnPDetrTransformer``; the latter also hands its
encoder the sampled tokens in raster order, see :mod:`projects.enact.modeling.pnp`).  Bad ENACT /
ACT arguments are refused under the class's name before detrex's constructor runs.
"""
import importlib
import os
import sys
from pathlib import Path

from .modeling.act_adapter import check_act_options, replace_with_act
from .modeling.enact_adapter import check_enact_options, replace_with_enact
from .modeling.pnp import is_token_sampler_transformer, use_raster_order

__all__ = ["DETREX_ACT_ENCODERS", "DETREX_ENCODERS", "detrex_config", "detrex_root"]

HOW_TO = ("set DETREX_ROOT to a detrex checkout (git clone https://github.com/IDEA-Research/detrex) whose "
          "extension is built in place, or run `make test-detrex DETREX_SRC=<checkout or archive>`")


def detrex_root() -> Path:
    """detrex's checkout root (holding ``projects/`` and ``detrex/``), put on ``sys.path``."""
    root = os.environ.get("DETREX_ROOT")
    if root:
        root = Path(root).resolve()
        if not (root / "projects").is_dir() or not (root / "detrex").is_dir():
            raise RuntimeError(f"DETREX_ROOT={root} is not a detrex checkout (no projects/ and detrex/ in it); {HOW_TO}")
    else:
        try:
            import detrex
        except ImportError as e:
            raise RuntimeError(f"detrex is not importable ({e}); {HOW_TO}") from e
        root = Path(detrex.__file__).resolve().parent.parent
        if not (root / "projects").is_dir():
            raise RuntimeError(f"detrex imported from {root} has no projects/ folder beside it; {HOW_TO}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def detrex_config(relative_path: str):
    """``LazyConfig.load`` of a detrex config, e.g. ``projects/detr/configs/detr_r50_300ep.py``."""
    from detectron2.config import LazyConfig

    path = detrex_root() / relative_path
    if not path.is_file():
        raise RuntimeError(f"detrex config {path} not found; {HOW_TO}")
    return LazyConfig.load(str(path))


# name -> (detrex module, base class, default sigma); the encoder's self-attentions are replaced
DETREX_ENCODERS = {
    "EnactDetrTransformerEncoder": ("projects.detr.modeling.transformer", "DetrTransformerEncoder", 5),
    "EnactConditionalDetrTransformerEncoder": (
        "projects.conditional_detr.modeling.conditional_transformer", "ConditionalDetrTransformerEncoder", 5),
    "EnactDabDetrTransformerEncoder": ("projects.dab_detr.modeling.dab_transformer", "DabDetrTransformerEncoder", 5),
    "EnactDNDetrTransformerEncoder": ("projects.dn_detr.modeling.dn_transformers", "DNDetrTransformerEncoder", 5),
    "EnactGroupDetrTransformerEncoder": (
        "projects.group_detr.modeling.group_detr_transformer", "GroupDetrTransformerEncoder", 5),
    # Anchor DETR builds its encoder inside the transformer: the transformer is subclassed
    "EnactAnchorDETRTransformer": (
        "projects.anchor_detr.modeling.anchor_detr_transformer", "AnchorDETRTransformer", 3),
    # PnP-DETR: the transformer, whose sampler then hands the encoder its sampled tokens in raster
    # order (projects/enact/modeling/pnp.py; the pooled background tokens are not clustered)
    "EnactPnPDetrTransformer": ("projects.pnp_detr.modeling.transformer", "PnPDetrTransformer", 5),
}
# ACT in the same encoders: Act... -> the Enact... entry above (its default sigma unused)
DETREX_ACT_ENCODERS = {"Act" + name[len("Enact"):]: name for name in DETREX_ENCODERS}


def _encoder_of(module):
    """The part whose self-attentions a class replaces: Anchor DETR's ``encoder_layers``, a
    transformer's ``encoder`` (PnP-DETR), else the encoder class itself."""
    for attr in ("encoder_layers", "encoder"):
        part = getattr(module, attr, None)
        if part is not None:
            return part
    return module


def _make_encoder_class(name: str):
    module_name, base_name, default_sigma = DETREX_ENCODERS[DETREX_ACT_ENCODERS.get(name, name)]
    detrex_root()
    base = getattr(importlib.import_module(module_name), base_name)
    if name in DETREX_ACT_ENCODERS:
        return _make_act_class(name, base)

    def __init__(self, *args, sigma: int = default_sigma, mode: str = "segments", backend: str = "auto",
                 attn_implementation: str = "sdpa", **kwargs):
        check_enact_options(name, sigma, mode, backend, attn_implementation)
        base.__init__(self, *args, **kwargs)
        replace_with_enact(_encoder_of(self), sigma, mode, backend, name, attn_implementation=attn_implementation)
        if is_token_sampler_transformer(self):
            use_raster_order(self)

    doc = (f"detrex's ``{base_name}`` with ENACT in its encoder self-attentions (``sigma`` default "
           f"{default_sigma}, ``mode``, ``backend``, ``attn_implementation``); other arguments as detrex's.")
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc})


def _make_act_class(name: str, base: type):
    def __init__(self, *args, num_hashes: int = 32, bucket_width: float = 8.0, seed: int = 0,
                 attn_implementation: str = "sdpa", **kwargs):
        check_act_options(name, num_hashes, bucket_width, seed, attn_implementation)
        base.__init__(self, *args, **kwargs)
        replace_with_act(_encoder_of(self), num_hashes, bucket_width, seed, name,
                         attn_implementation=attn_implementation)

    doc = (f"detrex's ``{base.__name__}`` with ACT in its encoder self-attentions (``num_hashes`` default 32, "
           "``bucket_width`` 8.0, ``seed`` 0, ``attn_implementation``; layer k's hash projections drawn from seed "
           "and k); other arguments as detrex's.")
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc})


def __getattr__(name: str):
    if name in DETREX_ENCODERS or name in DETREX_ACT_ENCODERS:
        cls = _make_encoder_class(name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
