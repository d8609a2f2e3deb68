#!/usr/bin/env python
"""How well a Sparse DETR encoder's token selection matches what the decoder looks at, over a
dataset split: per query ratio rho, the mean (and std over images) of

* dam_overlap   |S & T| / k, T the top k tokens of the decoder cross-attention map (the
                scorer's training target), S the tokens the scorer selected;
* dam_mass      the DAM's mass on S over its mass on T (1: S captures all that k tokens can);
* dam_top_share the DAM's mass on T over its total (how concentrated the decoder's attention is;
                k / n for a uniform map);
* in_box_share  the share of S inside ground-truth boxes, against box_token_share, the share of
                all valid tokens inside them (what a random selection would give);
* norm_ratio    the mean L2 norm of the memory's unselected valid tokens (the encoder's input,
                passed through) over that of its selected ones (normalised by the encoder's
                LayerNorms): how far apart the two populations the decoder reads are in scale.

    python tools/sparse_stats.py --config-file configs/shapes/conditional_detr_r18_shapes_sparse_enact.py \\
        --checkpoint output/shapes/conditional_detr_r18_sparse_enact/model_final.pth \\
        --output output/shapes/conditional_detr_r18_sparse_enact/sparse_stats --query-ratios 0.1 0.3

writes ``<output>/sparse_stats.json`` (summary per rho + per-image values).  The model runs in
eval mode on the CPU at the config's test-time input size; the DAM is the sum over all queries,
heads and decoder layers (:func:`projects.enact.modeling.sparse_selection.selection_statistics`).
A scorer trained on the objectness target computes no DAM: only the box shares are reported.
``key=value`` arguments override the config.
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("sparse_stats")

STATS = ("selected_share", "dam_overlap", "dam_mass", "dam_top_share", "in_box_share", "box_token_share", "norm_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a LazyConfig whose encoder is sparse (SparseTransformerEncoder)")
    p.add_argument("--checkpoint", required=True, help="its trained weights")
    p.add_argument("--split", choices=("val", "train"), default="val", help="val: dataloader.test's dataset")
    p.add_argument("--num-images", type=int, default=None, help="the first K images (default: all)")
    p.add_argument("--query-ratios", type=float, nargs="+", default=None,
                   help="rho values to measure (default: the config's encoder.query_ratio)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("opts", nargs="*", help="config overrides key=value (anywhere on the line)")
    # key=value overrides may follow a list option (--query-ratios 0.1 0.3 key=value): take them out first
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in overrides])
    args.opts = list(args.opts) + overrides
    return args


def normalised_targets(dicts, mapped):
    """Per image {"boxes": (n, 4) cxcywh normalised by the resized, unpadded image}."""
    import torch

    from projects.enact.analysis.runner import _ground_truth
    from projects.enact.modeling.box_ops import box_xyxy_to_cxcywh

    targets = []
    for d, m in zip(dicts, mapped):
        h, w = m["image"].shape[-2:]
        xyxy = torch.as_tensor(_ground_truth(d, (h, w))[0], dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append({"boxes": box_xyxy_to_cxcywh(xyxy / scale)})
    return targets


def measure(model, mapper, dicts, batch_size, progress=None):
    """Per image, the :func:`selection_statistics` of one eval-mode pass at the encoder's
    current rho: a list of {name: float}."""
    import torch

    from projects.enact.modeling.sparse_selection import selection_statistics

    rows = []
    memory = []  # the encoder's output of the current batch, (N, B, C)
    hook = model.transformer.encoder.register_forward_hook(lambda m, args, out: memory.append(out[0]))
    try:
        for start in range(0, len(dicts), batch_size):
            chunk = dicts[start:start + batch_size]
            mapped = [mapper(dict(d)) for d in chunk]
            memory.clear()
            with torch.no_grad():
                images = model.preprocess_image([{"image": m["image"]} for m in mapped])
                src, mask, pos = model.encode_images(images)
                sparse = model.run_transformer(src, mask, pos, return_sparse=True)[-1]
                stats = selection_statistics(sparse, normalised_targets(chunk, mapped))
                stats["norm_ratio"] = norm_ratio(memory[-1], sparse.selection)
            rows.extend({k: float(v[b]) for k, v in stats.items()} for b in range(len(chunk)))
            if progress is not None:
                progress(len(chunk))
    finally:
        hook.remove()
    return rows


def norm_ratio(memory, selection):
    """Per image, mean L2 norm of the unselected valid tokens of ``memory`` (N, B, C) over that
    of the selected ones (nan where either set is empty).  (B,) float64."""
    import torch

    norms = memory.norm(dim=-1).t().double()  # (B, N)
    chosen = selection.token_mask()
    rest = selection.valid & ~chosen

    def mean(m):
        return (norms * m).sum(1) / m.sum(1).clamp(min=1)

    ratio = mean(rest) / mean(chosen)
    return torch.where(rest.any(1) & chosen.any(1), ratio, torch.full_like(ratio, float("nan")))


def summarize(rows):
    import numpy as np

    out = {}
    for name in STATS:
        values = np.array([r[name] for r in rows if name in r and not np.isnan(r[name])])
        if values.size:
            out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}
    return out


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from projects.enact.analysis import runner
    from projects.enact.benchmark.report import Progress

    cfg, model = runner.load_model(args.config_file, args.checkpoint, args.opts)
    encoder = getattr(getattr(model, "transformer", None), "encoder", None)
    if not getattr(model, "sparse_encoder", False):
        raise SystemExit(f"{args.config_file}: the encoder ({type(encoder).__name__}) is not a sparse encoder "
                         "(model.transformer.encoder._target_ = SparseTransformerEncoder)")
    if getattr(encoder, "scorer_target", "dam") != "dam":
        logger.warning("the scorer learns the objectness target: no DAM is computed, "
                       "dam_overlap / dam_mass / dam_top_share are not measured")
    mapper = runner.test_mapper(cfg)
    dicts, _ = runner.dataset_split(cfg, args.split)
    dicts = dicts[: args.num_images] if args.num_images is not None else dicts
    if not dicts:
        raise SystemExit("no images")
    ratios = args.query_ratios or [encoder.query_ratio]

    t0 = time.perf_counter()
    progress = Progress(len(dicts) * len(ratios), min_interval=5.0)
    result = {"config_file": args.config_file, "checkpoint": args.checkpoint, "split": args.split,
              "images": len(dicts), "query_ratios": {}}
    for rho in ratios:
        encoder.query_ratio = rho  # checked by the encoder at its call
        rows = measure(model, mapper, dicts, args.batch_size, lambda n: progress.update(n, f"rho {rho}"))
        result["query_ratios"][str(rho)] = {"summary": summarize(rows), "per_image": rows}
    progress.close()

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "sparse_stats.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(dicts)} {args.split} images in {time.perf_counter() - t0:.1f} s (mean +- std over images)")
    print("rho   " + "  ".join(f"{n:>16}" for n in STATS))
    for rho, entry in result["query_ratios"].items():
        s = entry["summary"]
        cells = [f"{s[n]['mean']:.3f} +- {s[n]['std']:.3f}" if n in s else "-" for n in STATS]
        print(f"{float(rho):<5.2f} " + "  ".join(f"{c:>16}" for c in cells))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
