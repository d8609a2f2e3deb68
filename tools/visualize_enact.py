#!/usr/bin/env python
"""Pictures of what ENACT does in a trained detector, per image:

    <output>/<image>/detections.png      the input with predicted (solid) and ground-truth (dashed) boxes
    <output>/<image>/layer<i>_maps.png   per ENACT encoder layer: the self-information map h before
                                         smoothing (H x W heat map, as the paper's Fig. 3) and the
                                         clusters (runs of the row-major token order) as coloured regions
    <output>/<image>/layer<i>_signal.png the smoothed 1-D signal h~ (and h) with its curvature-sign runs
    <output>/<image>/overview.png        detections + every layer's map and clusters in one figure
    <output>/index.html                  all of them

    python tools/visualize_enact.py --config-file configs/shapes/conditional_detr_r18_shapes_enact.py \\
        --checkpoint output/shapes/conditional_detr_r18_enact/model_final.pth --split val --num-images 4 \\
        --output output/shapes/conditional_detr_r18_enact/enact_vis
    python tools/visualize_enact.py --config-file CFG --checkpoint PTH --images a.png b.jpg --output DIR

Runs on the CPU in eval mode.  The maps need a feature grid of at least 16 tokens per side: when
the config's test-time resize gives fewer, the input is resized (shortest edge 16 x the feature
stride, max size scaled in proportion; the log says so) unless ``--input-size`` is given.
Trailing ``key=value`` arguments override the config.
"""
import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("visualize_enact")

MIN_TOKENS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a LazyConfig of a detector with ENACT")
    p.add_argument("--checkpoint", required=True, help="its trained weights (model_final.pth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--split", choices=("val", "train"), help="images of the config's dataset (val: dataloader.test's)")
    p.add_argument("--num-images", type=int, default=4, help="with --split: the first K images (default 4)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--input-size", type=int, default=None,
                   help="shortest edge of the input (max size scaled in proportion); default: the config's "
                        f"test size, raised to {MIN_TOKENS} x the feature stride if its grid is smaller")
    p.add_argument("--score-threshold", type=float, default=0.5, help="predictions drawn from this score")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from projects.enact.analysis import plots, runner
    from projects.enact.benchmark.report import Progress

    cfg, model = runner.load_model(args.config_file, args.checkpoint, args.opts)
    mapper = runner.test_mapper(cfg)
    input_size = args.input_size
    if input_size is None:
        input_size = runner.auto_input_size(model, mapper, MIN_TOKENS)
        if input_size is not None:
            logger.info(
                "the config's test size (shortest edge %d) gives a feature grid of fewer than %d tokens per side "
                "at stride %d: resizing the input to shortest edge %d for the maps",
                runner.test_resize(mapper)[0], MIN_TOKENS, runner.feature_stride(model), input_size,
            )
    if input_size is not None:
        runner.set_input_size(mapper, input_size)
        logger.info("input: shortest edge %d, max size %d", *runner.test_resize(mapper))

    if args.split:
        dicts, dataset_name = runner.dataset_split(cfg, args.split)
        dicts = dicts[: args.num_images]
        classes = runner.class_names(dataset_name)
    else:
        dicts, classes = runner.image_dicts(args.images), None
    if not dicts:
        raise SystemExit("no images")
    os.makedirs(args.output, exist_ok=True)

    progress = Progress(len(dicts))
    entries, small = [], set()
    t0 = time.perf_counter()
    for record in runner.run_images(model, mapper, dicts, progress=lambda n, name: progress.update(1, name)):
        if not record.layers:
            raise SystemExit(f"{args.config_file}: no ENACT layer on a feature grid was called (is ENACT in the encoder?)")
        folder = os.path.join(args.output, record.name)
        os.makedirs(folder, exist_ok=True)
        rows, cols = int(record.layers[0].valid.any(1).sum()), int(record.layers[0].valid.any(0).sum())
        if min(rows, cols) < MIN_TOKENS:
            small.add(f"{record.name}: {rows} x {cols}")
        files = [
            plots.save_overview(os.path.join(folder, "overview.png"), record, classes, args.score_threshold),
            plots.save_detections(os.path.join(folder, "detections.png"), record, classes, args.score_threshold),
        ]
        for i in range(len(record.layers)):
            files.append(plots.save_layer_maps(os.path.join(folder, f"layer{i}_maps.png"), record, i))
            files.append(plots.save_signal(os.path.join(folder, f"layer{i}_signal.png"), record, i))
        entries.append({"name": f"{record.name}  ({record.file_name})", "files": files})
    progress.close()
    if small:
        logger.warning("feature grids under %d tokens per side (raise --input-size): %s", MIN_TOKENS, "; ".join(sorted(small)))
    index = plots.write_index(os.path.join(args.output, "index.html"), entries,
                              f"ENACT: {os.path.basename(args.config_file)}, {os.path.basename(args.checkpoint)}")
    written = [f for e in entries for f in e["files"]] + [index]
    print(f"wrote {len(written)} files for {len(entries)} images in {time.perf_counter() - t0:.1f} s:")
    for f in written:
        print("  " + f)
    print(f"open {index}")
    return written


if __name__ == "__main__":
    main()
