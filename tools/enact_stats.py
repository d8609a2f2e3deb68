#!/usr/bin/env python
"""ENACT's clustering statistics over a dataset split, per encoder layer: clusters per image
(mean / min / max), N/M, mean cluster length, and the share of the information mass (h before
smoothing, valid tokens only) inside the ground-truth boxes against the share of the tokens
inside them (a token is inside when its cell centre, in input pixels after the test-time resize,
lies in a box) -- a number for the paper's claim that self-information tracks objects.

    python tools/enact_stats.py --config-file configs/shapes/conditional_detr_r18_shapes_enact.py \\
        --checkpoint output/shapes/conditional_detr_r18_enact/model_final.pth --split val \\
        --output output/shapes/conditional_detr_r18_enact/enact_stats

writes ``<output>/enact_stats.json`` (summary per layer + per-image values) and
``<output>/enact_stats.png``.  CPU, eval mode, the config's test-time input size unless
``--input-size``; ``--batch-size`` > 1 batches (and pads) images as a training batch would,
the statistics use each image's valid tokens only.  Trailing ``key=value`` override the config.
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("enact_stats")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a LazyConfig of a detector with ENACT")
    p.add_argument("--checkpoint", required=True, help="its trained weights")
    p.add_argument("--split", choices=("val", "train"), default="val", help="val: dataloader.test's dataset")
    p.add_argument("--num-images", type=int, default=None, help="the first K images (default: all)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--input-size", type=int, default=None, help="shortest edge of the input (default: the config's test size)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return p.parse_args(argv)


def collect(records):
    """Per image: its name and its :func:`image_layer_stats` per layer; the layers' module names."""
    from projects.enact.analysis.stats import image_layer_stats

    names, per_image, layer_names = [], [], None
    for record in records:
        if not record.layers:
            raise SystemExit("no ENACT layer on a feature grid was called (is ENACT in the encoder?)")
        layer_names = layer_names or [l.name for l in record.layers]
        names.append(record.name)
        per_image.append([
            image_layer_stats(l.information, l.valid, l.cluster_ids, record.cell, record.gt_boxes) for l in record.layers
        ])
    return names, per_image, layer_names


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from projects.enact.analysis import plots, runner
    from projects.enact.analysis.stats import summarize
    from projects.enact.benchmark.report import Progress

    cfg, model = runner.load_model(args.config_file, args.checkpoint, args.opts)
    mapper = runner.test_mapper(cfg, args.input_size)
    dicts, _ = runner.dataset_split(cfg, args.split)
    if args.num_images is not None:
        dicts = dicts[: args.num_images]
    if not dicts:
        raise SystemExit("no images")
    resize = runner.test_resize(mapper)
    logger.info("%d %s images, input %s", len(dicts), args.split,
                "as the mapper resizes" if resize is None else f"shortest edge {resize[0]}, max size {resize[1]}")

    t0 = time.perf_counter()
    progress = Progress(len(dicts), min_interval=5.0)
    records = runner.run_images(model, mapper, dicts, args.batch_size, progress=lambda n, name: progress.update(1, name))
    names, per_image, layer_names = collect(records)
    progress.close()
    summary = summarize(per_image, layer_names)

    os.makedirs(args.output, exist_ok=True)
    result = {
        "config_file": args.config_file,
        "checkpoint": args.checkpoint,
        "split": args.split,
        "images": len(names),
        "input": None if resize is None else {"shortest_edge": resize[0], "max_size": resize[1]},
        "batch_size": args.batch_size,
        "layers": summary,
        "per_image": [{"name": n, "layers": rows} for n, rows in zip(names, per_image)],
    }
    json_path = os.path.join(args.output, "enact_stats.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    png_path = plots.save_stats_plot(os.path.join(args.output, "enact_stats.png"), summary, per_image)

    print(f"{len(names)} images in {time.perf_counter() - t0:.1f} s")
    print("layer  clusters/image mean [min, max]   N/M  cluster length  info share in boxes  token share  ratio")
    for s in summary:
        c = s["clusters_per_image"]
        share = "-"
        if s.get("info_share"):
            share = f"{s['info_share']['mean']:.3f} +- {s['info_share']['std']:.3f}      {s['token_share']['mean']:.3f}   {s['enrichment']:6.2f}"
        span = f"[{c['min']:.0f}, {c['max']:.0f}]"
        print(f"{s['layer']:5d}  {c['mean']:10.1f} {span:<12} {s['compression']:9.2f}  "
              f"{s['mean_cluster_length']:14.2f}  {share}")
    print(f"wrote {json_path}\nwrote {png_path}")
    return result


if __name__ == "__main__":
    main()
