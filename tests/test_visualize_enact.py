"""ENACT's pictures and statistics: the capture of the per-layer intermediates, the statistics on
a hand-made case (a padded image, boxes whose answer is known exactly), and the two tools
(tools/visualize_enact.py, tools/enact_stats.py) end to end on a tiny checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

from detection_helpers import build, infer, load_tool, save_tiny_run, tiny_config, two_image_batch
from projects.enact.analysis import capture_enact, image_layer_stats, inside_boxes, summarize
from projects.enact.modeling.enact import EnactClustering

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model_config():
    """The tiny DETR + ENACT of the tests, reading res4 (stride 16) so that small inputs give grids."""
    cfg = tiny_config("detr_r50_300ep_enact", in_features="res4", num_classes=4)
    cfg.transformer.encoder.attention.sigma = 1
    return cfg


# ---------------------------------------------------------------------- capture
def test_capture_records_every_layer_on_a_padded_batch_and_changes_nothing():
    model = build(tiny_model_config())
    batch = two_image_batch()  # 96 x 128 and 64 x 96: the second is padded
    plain = infer(model, batch)
    with capture_enact(model) as cap:
        captured = infer(model, batch)
    for a, b in zip(plain, captured):  # the hooks change no output
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    clusterings = [m for m in model.modules() if isinstance(m, EnactClustering)]
    assert all(not m._trace_hooks for m in clusterings)  # removed after the block
    assert [l.name for l in cap.layers] == [f"transformer.encoder.layers.{i}.self_attn.clustering" for i in range(2)]
    assert cap.input_size == (96, 128)
    for layer, module in zip(cap.layers, clusterings):
        grid = cap.grid_of(layer)
        assert grid == (6, 8) and cap.cell_size(grid) == (16.0, 16.0)
        valid = layer.valid.reshape(2, *grid)
        assert valid[0].all()
        expected = torch.zeros(grid, dtype=torch.bool)
        expected[:4, :6] = True  # 64 x 96 at stride 16, top-left
        assert torch.equal(valid[1], expected)
        assert (layer.cluster_ids[~layer.valid] == -1).all() and (layer.smoothed[~layer.valid] == 0).all()
        assert torch.equal(layer.cluster_ids.max(1).values + 1, module.last_num_clusters)
        assert (layer.information[layer.valid] > 0).all()


def test_capture_needs_enact():
    model = build(tiny_config("detr_r50_300ep"))
    with pytest.raises(ValueError, match="no EnactClustering"):
        with capture_enact(model):
            pass


# ---------------------------------------------------------------------- statistics, by hand
def hand_made():
    """A 4 x 6 grid of 10 x 20 px cells whose last row and column are padding (valid: 3 x 5).
    Centres: y = 5, 15, 25, (35); x = 10, 30, 50, 70, 90, (110).  Valid h = 1 + 5 i + j (sum
    120), pads 1000 (must not count).  Box A (20, 0, 60, 20) holds (0,1) (0,2) (1,1) (1,2); box C
    (40, 10, 65, 30) holds (1,2) (2,2); box B (95, 0, 120, 40) only pad cells: 5 tokens inside,
    h = 2 + 3 + 7 + 8 + 13 = 33.  Clusters: runs 3, 3, 4, 2, 3 of the valid sequence."""
    valid = np.zeros((4, 6), dtype=bool)
    valid[:3, :5] = True
    i, j = np.mgrid[:4, :6]
    h = np.where(valid, 1.0 + 5 * i + j, 1000.0)
    ids = np.full((4, 6), -1)
    ids[valid] = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]
    boxes = [(20, 0, 60, 20), (95, 0, 120, 40), (40, 10, 65, 30)]
    return h, valid, ids, (10.0, 20.0), boxes


def test_image_layer_stats_hand_made_padded_image():
    h, valid, ids, cell, boxes = hand_made()
    s = image_layer_stats(h, valid, ids, cell, boxes)
    assert (s["tokens"], s["clusters"], s["tokens_in_boxes"]) == (15, 5, 5)
    assert s["compression"] == 3.0 and s["mean_cluster_length"] == 3.0
    assert s["information"] == 120.0 and s["information_in_boxes"] == 33.0
    assert s["info_share"] == pytest.approx(33 / 120) and s["token_share"] == pytest.approx(1 / 3)
    inside = inside_boxes((4, 6), cell, boxes)
    assert inside[0, 5] and inside[1, 5] and inside[2, 5] and inside[3, 5]  # box B: pad cells only
    assert inside.sum() == 9 and (inside & valid).sum() == 5
    # closed intervals: a centre on a box's corner is inside
    assert inside_boxes((4, 6), cell, [(0, 0, 10, 5)]).sum() == 1
    # no box: no share (but clusters still count)
    empty = image_layer_stats(h, valid, ids, cell, [])
    assert empty["info_share"] is None and empty["token_share"] is None and empty["clusters"] == 5
    # uniform mode crops tokens out of every cluster: N / M and the cluster length differ
    cropped = ids.copy()
    cropped[0, 0] = -1
    s = image_layer_stats(h, valid, cropped, cell, boxes)
    assert s["compression"] == 3.0 and s["mean_cluster_length"] == 14 / 5
    with pytest.raises(ValueError, match="valid"):
        image_layer_stats(h, np.zeros_like(valid), ids, cell, boxes)


def test_summarize_hand_made():
    h, valid, ids, cell, boxes = hand_made()
    first = image_layer_stats(h, valid, ids, cell, boxes)
    ids2 = np.where(valid, 0, -1)
    ids2[1:3][valid[1:3]] = [1] * 5 + [2] * 5
    second = image_layer_stats(h, valid, ids2, cell, [])  # 3 clusters, no box
    uniform = image_layer_stats(np.where(valid, 1.0, 7.0), valid, ids2, cell, boxes)  # h uniform: shares equal
    summary = summarize([[first, second], [second, uniform]], ["a", "b"])
    assert [s["module"] for s in summary] == ["a", "b"]
    layer0, layer1 = summary
    assert layer0["clusters_per_image"] == {"mean": 4.0, "std": 1.0, "min": 3.0, "max": 5.0}
    assert layer0["compression"] == pytest.approx(4.0)  # mean of 15/5 and 15/3
    assert layer0["images_with_boxes"] == 1
    assert layer0["info_share"]["mean"] == pytest.approx(0.275) and layer0["token_share"]["mean"] == pytest.approx(1 / 3)
    assert layer0["enrichment"] == pytest.approx(0.825) and layer0["info_share_pooled"] == pytest.approx(0.275)
    assert layer1["info_share"]["mean"] == pytest.approx(1 / 3) and layer1["enrichment"] == pytest.approx(1.0)
    assert layer1["clusters_per_image"]["mean"] == 3.0
    assert "info_share" not in summarize([[second]])[0]


# ---------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny DETR + ENACT config (yaml) with a 3-image shapes val split, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("vis")
    config, checkpoint = save_tiny_run(tmp, tiny_model_config(), "vis_tiny")
    return tmp, config, checkpoint


def test_visualize_tool_writes_its_files(tiny_run, capsys):
    tmp, config, checkpoint = tiny_run
    tool = load_tool("visualize_enact")
    out = tmp / "vis"
    written = tool.main(["--config-file", config, "--checkpoint", checkpoint, "--split", "val", "--num-images", "2",
                         "--output", str(out)])
    per_image = ["overview.png", "detections.png", "layer0_maps.png", "layer0_signal.png", "layer1_maps.png", "layer1_signal.png"]
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    expected = [str(out / f / n) for f in folders for n in per_image] + [str(out / "index.html")]
    assert sorted(written) == sorted(expected)
    for f in expected[:-1]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    index = (out / "index.html").read_text()
    assert all(f"{f}/{n}" in index for f in folders for n in per_image)
    printed = capsys.readouterr().out
    assert "wrote 13 files for 2 images" in printed and str(out / "index.html") in printed

    # image files, at an explicit input size
    image = sorted((tmp / "data").rglob("*.png"))[0]
    written = tool.main(["--config-file", config, "--checkpoint", checkpoint, "--images", str(image),
                         "--output", str(tmp / "files"), "--input-size", "96", "--score-threshold", "0"])
    assert len(written) == 7 and all(os.path.isfile(f) for f in written)


def test_visualize_input_size_gives_a_16_token_grid(tiny_run):
    from projects.enact.analysis import runner

    _, config, checkpoint = tiny_run
    cfg, model = runner.load_model(config, checkpoint)
    mapper = runner.test_mapper(cfg)
    assert runner.test_resize(mapper) == (64, 128) and runner.feature_stride(model) == 16
    size = runner.auto_input_size(model, mapper, 16)
    assert size == 256
    runner.set_input_size(mapper, size)
    assert runner.test_resize(mapper) == (256, 512)
    dicts, name = runner.dataset_split(cfg, "val")
    assert name == "vis_tiny_val" and runner.class_names(name) == ["square", "circle", "triangle", "cross"]
    (record,) = runner.run_images(model, mapper, dicts[:1])
    rows, cols = record.layers[0].valid.shape
    assert min(rows, cols) >= 16 and record.layers[0].valid.all()
    H, W = record.image.shape[:2]
    assert min(H, W) == 256 and record.cell == (H / rows, W / cols)
    # ground truth scaled with the image, as detectron2's ResizeTransform scales coordinates
    d = dicts[0]
    sy, sx = H / d["height"], W / d["width"]
    x, y, w, h = d["annotations"][0]["bbox"]  # XYWH_ABS
    assert record.gt_boxes[0] == pytest.approx([x * sx, y * sy, (x + w) * sx, (y + h) * sy])


def test_enact_stats_tool_on_a_padded_batch(tiny_run, capsys):
    """Batches of 2: the first is padded; the JSON, its summary and the plot are written."""
    tmp, config, checkpoint = tiny_run
    tool = load_tool("enact_stats")
    out = tmp / "stats"
    result = tool.main(["--config-file", config, "--checkpoint", checkpoint, "--split", "val", "--batch-size", "2",
                        "--output", str(out)])
    with open(out / "enact_stats.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["images"] == 3 and len(saved["per_image"]) == 3 and len(saved["layers"]) == 2
    for layer in saved["layers"]:
        c = layer["clusters_per_image"]
        assert 1 <= c["min"] <= c["mean"] <= c["max"]
        assert layer["compression"] > 1 and layer["mean_cluster_length"] > 1
        assert layer["images_with_boxes"] == 3
        assert 0 < layer["info_share"]["mean"] < 1 and 0 < layer["token_share"]["mean"] < 1
    assert (out / "enact_stats.png").read_bytes()[:4] == b"\x89PNG"
    assert "info share in boxes" in capsys.readouterr().out
    # the first batch is padded (its images have 6 x 4 and 5 x 4 token grids): each image counts
    # its own valid tokens, as it does alone
    tokens = [[l["tokens"] for l in image["layers"]] for image in saved["per_image"]]
    assert tokens[0] != tokens[1]
    alone = tool.main(["--config-file", config, "--checkpoint", checkpoint, "--output", str(tmp / "stats1")])
    assert [[l["tokens"] for l in image["layers"]] for image in alone["per_image"]] == tokens
