#!/usr/bin/env python
"""How well ACT approximates a trained model's encoder self-attention: choose r, compare L.

Runs a trained baseline (full multi-head attention encoder) on ``--images`` images and, at every
encoder layer, feeds the layer's own attention input to ActAttention (same weights, the layer's
seeded projections) for every (L, r) of the grid; reports the relative error of the attention
output (the residual and W_o's bias removed), ||ACT - full||_F / ||full||_F over the valid tokens of all images,
and the prototypes per image and head (mean over layers), next to the tokens per image.
The paper chose r this way (on 1000 training images) and used r = 8 at head dim 32.

    python tools/act_error.py --config-file configs/shapes/detr_r18_shapes.py \
        --checkpoint /tmp/act_base/model_final.pth --split train --images 64 \
        --hashes 16 20 24 32 --widths 1 2 4 8
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.enact.modeling.act import ActAttention  # noqa: E402
from projects.enact.modeling.encoder_adapter import encoder_self_attentions, find_encoder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="the baseline's LazyConfig")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="train: dataloader.train's images (the paper), val: dataloader.test's; both read by the "
                        "test mapper")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--hashes", type=int, nargs="+", default=[16, 20, 24, 32])
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here too")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from detectron2.config import LazyConfig, instantiate

    from projects.enact.checkpoint.checkpointer import EnactCheckpointer

    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    cfg.train.device = "cpu"
    if "device" in cfg.model:  # detrex's models take their device
        cfg.model.device = "cpu"
    model = instantiate(cfg.model).eval()
    EnactCheckpointer(model).load(args.checkpoint)
    test = cfg.dataloader.test
    if "split" in test.dataset:  # the shapes dataset
        test.dataset.split = args.split
    elif args.split == "train":  # other datasets (detrex's COCO): dataloader.train's, read as the test loader reads
        test.dataset = cfg.dataloader.train.dataset
    loader = instantiate(test)
    # the encoder's self-attentions: the project's layers[i].self_attn, detrex's layers[i].attentions[j]
    layers = encoder_self_attentions(find_encoder(model))
    clustered = ("clustering", "hash_a")  # ENACT's or ACT's attention: not the full attention to compare with
    if not layers or any(not hasattr(full, "attn") or any(hasattr(full, a) for a in clustered) for full in layers):
        raise SystemExit(f"act_error: {args.config_file}: its encoder self-attentions are "
                         f"{sorted({type(m).__name__ for m in layers}) or 'not found'}; a full multi-head attention "
                         "encoder (the project's or detrex's MultiheadAttention) is needed")
    captured = [[] for _ in layers]  # per layer: the kwargs of each call

    def hook(index):
        def fn(module, a, kw, out):
            captured[index].append((a, kw, out))

        return fn

    handles = [full.register_forward_hook(hook(i), with_kwargs=True) for i, full in enumerate(layers)]
    seen = 0
    with torch.no_grad():
        for batch in loader:
            model(batch)
            seen += len(batch)
            if seen >= args.images:
                break
    for h in handles:
        h.remove()

    rows = []
    with torch.no_grad():
        for num_hashes in args.hashes:
            for width in args.widths:
                err_num = err_den = 0.0
                clusters, tokens, count = 0.0, 0.0, 0
                for index, full in enumerate(layers):
                    act = ActAttention(full.embed_dim, full.num_heads, num_hashes=num_hashes, bucket_width=width, seed=args.seed)
                    act.load_state_dict(full.state_dict(), strict=False)
                    act.set_layer_index(index)
                    act.eval()
                    for a, kw, out in captured[index]:
                        query = kw.get("query", a[0] if a else None)
                        identity = kw.get("identity", a[3] if len(a) > 3 else None)  # detrex: positional
                        identity = query if identity is None else identity
                        y = act(*a, **kw)
                        mask = kw.get("key_padding_mask")
                        valid = torch.ones(out.shape[:2], dtype=torch.bool) if mask is None else ~mask.T  # (N, B)
                        bias = full.attn.out_proj.bias  # removed too: the error of W_o (attention)
                        d_full, d_act = (out - identity - bias)[valid], (y - identity - bias)[valid]
                        err_num += float((d_act - d_full).square().sum())
                        err_den += float(d_full.square().sum())
                        clusters += float(act.last_num_clusters.double().mean(1).sum())
                        tokens += float(act.last_num_tokens.double().sum())
                        count += act.last_num_clusters.shape[0]
                row = {
                    "L": num_hashes, "r": width, "rel_error": (err_num / err_den) ** 0.5,
                    "clusters_per_image": clusters / count, "tokens_per_image": tokens / count,
                    "images": seen, "layers": len(layers),
                }
                rows.append(row)
                print(
                    f"L={num_hashes:3d} r={width:6.3g}  rel.error {row['rel_error']:.4f}  "
                    f"prototypes/image {row['clusters_per_image']:.1f} of {row['tokens_per_image']:.1f} tokens",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
