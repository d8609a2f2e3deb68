"""The project's tools on configs/detrex/ configs (marked ``detrex``: ``make test-detrex DETREX_SRC=...``).

A COCO-format folder of 3 small images is registered as detectron2's ``coco_2017_val`` /
``coco_2017_train`` (what ``DETECTRON2_DATASETS`` does for a user); the configs are
configs/detrex/ files made tiny (``detrex_helpers.TINY_DETREX_CONFIG``: R18, 2 + 2 layers, test
images at 128 px; dataloader and evaluator stay detrex's) with a checkpoint of their random
weights.  Each tool runs once per flag on one detrex config and its outputs are read back.
tools/benchmark.py is exercised in test_detrex_configs.py.
"""
import json
import logging
from pathlib import Path

import pytest
import torch

from detrex_helpers import tiny_detrex_config, write_tiny_coco

pytestmark = [pytest.mark.detrex, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """coco_2017_{train,val} re-registered on a tiny COCO folder for the module, then restored."""
    from projects.enact.data.coco import _builtin_root, register_coco

    root = write_tiny_coco(str(tmp_path_factory.mktemp("datasets")))
    register_coco(root=root)
    yield root
    register_coco(root=_builtin_root())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (tiny config path, checkpoint of its random weights) for a few configs/detrex/ files."""
    from detectron2.config import LazyConfig, instantiate

    folder = tmp_path_factory.mktemp("configs")
    out = {}
    for name in ("dab_detr_r50_50ep_enact", "dab_detr_r50_50ep", "conditional_detr_r50_50ep_enact", "detr_r50_300ep"):
        path = tiny_detrex_config(ROOT / "configs" / "detrex" / f"{name}.py", folder)
        torch.manual_seed(0)
        model = instantiate(LazyConfig.load(path).model)
        checkpoint = folder / f"{name}.pth"
        torch.save({"model": model.state_dict()}, checkpoint)
        out[name] = (path, str(checkpoint))
    return out


def test_two_configs_keep_their_own_results(coco, tiny, tmp_path, monkeypatch):
    """ENACT and baseline twin evaluated one after the other from the same folder: each results
    file stays where its config puts it (they had shared ./output/dab_detr_r50_50ep), and
    train.output_dir=... moves the evaluator's files with it."""
    monkeypatch.chdir(tmp_path)
    train_net = tool("train_net")
    parser = train_net.argument_parser()
    written = {}
    for name in ("dab_detr_r50_50ep_enact", "dab_detr_r50_50ep"):
        path, checkpoint = tiny[name]
        train_net.main(parser.parse_args(["--config-file", path, "--eval-only", f"train.init_checkpoint={checkpoint}"]))
        results = tmp_path / "output" / "detrex" / name / "coco_instances_results.json"
        written[name] = results.read_bytes()
    for name, data in written.items():
        results = tmp_path / "output" / "detrex" / name / "coco_instances_results.json"
        assert results.read_bytes() == data  # not overwritten by the other config
        assert {r["image_id"] for r in json.loads(data)} == {1, 2, 3}
    assert written["dab_detr_r50_50ep_enact"] != written["dab_detr_r50_50ep"]
    assert not (tmp_path / "output" / "dab_detr_r50_50ep").exists()
    path, checkpoint = tiny["dab_detr_r50_50ep"]
    train_net.main(parser.parse_args(["--config-file", path, "--eval-only", f"train.init_checkpoint={checkpoint}",
                                      f"train.output_dir={tmp_path / 'moved'}"]))
    assert (tmp_path / "moved" / "coco_instances_results.json").read_bytes() == written["dab_detr_r50_50ep"]


def test_visualize_enact_on_a_detrex_config(coco, tiny, tmp_path, caplog):
    path, checkpoint = tiny["dab_detr_r50_50ep_enact"]
    visualize = tool("visualize_enact")
    # --split / --num-images / --input-size / --score-threshold: detrex's mapper resized to 160 px
    with caplog.at_level(logging.INFO, logger="visualize_enact"):
        written = visualize.main(["--config-file", path, "--checkpoint", checkpoint, "--split", "val",
                                  "--num-images", "1", "--input-size", "160", "--score-threshold", "0.0",
                                  "--output", str(tmp_path / "vis")])
    assert "input: shortest edge 160, max size 250" in caplog.text
    folder = tmp_path / "vis" / "0000_000001"
    names = ["overview.png", "detections.png", "layer0_maps.png", "layer0_signal.png", "layer1_maps.png",
             "layer1_signal.png"]
    assert sorted(written) == sorted([str(folder / n) for n in names] + [str(tmp_path / "vis" / "index.html")])
    assert all((folder / n).stat().st_size > 1000 for n in names)
    assert "000001.png" in (tmp_path / "vis" / "index.html").read_text()
    # --images without --input-size: the 128 px test size gives a 4 x 5 grid, so the input is resized
    # to 16 tokens x stride 32 per side, as docs/detrex.md says (trailing key=value: an override)
    caplog.clear()
    image = Path(coco) / "coco" / "val2017" / "000002.png"
    with caplog.at_level(logging.INFO, logger="visualize_enact"):
        written = visualize.main(["--config-file", path, "--checkpoint", checkpoint, "--images", str(image),
                                  "--output", str(tmp_path / "vis2"), "model.select_box_nums_for_evaluation=5"])
    assert "resizing the input to shortest edge 512" in caplog.text
    assert "feature grids under 16 tokens" not in caplog.text
    assert len(written) == 7 and (tmp_path / "vis2" / "0000_000002" / "layer1_maps.png").is_file()


def test_enact_stats_on_a_detrex_config(coco, tiny, tmp_path):
    path, checkpoint = tiny["conditional_detr_r50_50ep_enact"]
    result = tool("enact_stats").main([
        "--config-file", path, "--checkpoint", checkpoint, "--split", "val", "--num-images", "3",
        "--input-size", "192", "--batch-size", "2", "--output", str(tmp_path / "stats"),
        "model.transformer.encoder.sigma=1"])
    saved = json.loads((tmp_path / "stats" / "enact_stats.json").read_text())
    assert (tmp_path / "stats" / "enact_stats.png").stat().st_size > 1000
    assert saved["images"] == 3 and saved["batch_size"] == 2 and saved["split"] == "val"
    assert saved["input"] == {"shortest_edge": 192, "max_size": 300}
    assert len(saved["layers"]) == 2 and len(saved["per_image"]) == 3
    for layer in saved["layers"]:
        c = layer["clusters_per_image"]
        assert 1 <= c["min"] <= c["mean"] <= c["max"] and layer["compression"] > 1
        assert 0 <= layer["info_share"]["mean"] <= 1 and 0 < layer["token_share"]["mean"] < 1  # boxes on the grid
    assert result["layers"] == saved["layers"]


def test_act_error_on_a_detrex_config(coco, tiny, tmp_path, capsys):
    path, checkpoint = tiny["detr_r50_300ep"]
    rows = tool("act_error").main([
        "--config-file", path, "--checkpoint", checkpoint, "--split", "train", "--images", "2",
        "--hashes", "4", "8", "--widths", "1", "1e-6", "--seed", "1", "--json", str(tmp_path / "act.json"),
        "model.transformer.encoder.num_layers=1"])
    assert json.loads((tmp_path / "act.json").read_text()) == rows
    assert [(r["L"], r["r"]) for r in rows] == [(4, 1.0), (4, 1e-6), (8, 1.0), (8, 1e-6)]
    assert all(r["images"] == 2 and r["layers"] == 1 for r in rows)
    for r in rows:
        assert 1 <= r["clusters_per_image"] <= r["tokens_per_image"]
        if r["r"] == 1e-6:  # every query its own cluster: ACT is the full attention
            assert r["rel_error"] < 1e-5 and r["clusters_per_image"] == r["tokens_per_image"]
        else:
            assert 0 < r["rel_error"] < 2
    assert "L=  8 r=     1  rel.error" in capsys.readouterr().out


def test_act_error_refuses_an_encoder_without_full_attention(coco, tiny):
    path, checkpoint = tiny["dab_detr_r50_50ep_enact"]
    with pytest.raises(SystemExit) as e:
        tool("act_error").main(["--config-file", path, "--checkpoint", checkpoint, "--images", "1"])
    assert str(e.value) == (f"act_error: {path}: its encoder self-attentions are ['EnactAttention']; a full "
                            "multi-head attention encoder (the project's or detrex's MultiheadAttention) is needed")


def test_analyze_model_on_a_detrex_pair(tmp_path):
    md, js = tmp_path / "analyze.md", tmp_path / "analyze.json"
    result = tool("analyze_model").main([
        "--configs", "detrex/detr_r50_300ep", "configs/detrex/detr_r50_300ep_enact.py", "--size", "64", "96",
        "--batch", "2", "--attention", "eager", "--device", "cpu", "--threads", "1", "--seed", "1",
        "--out-md", str(md), "--out-json", str(js),
        "--opts", "model.transformer.encoder.num_layers=1", "model.transformer.decoder.num_layers=1"])
    assert json.loads(js.read_text()) == json.loads(json.dumps(result))
    base, enact = result["rows"]
    assert (base["model"], enact["model"]) == ("detr_r50_300ep", "detr_r50_300ep_enact")
    assert enact["params"] - base["params"] == 257  # one encoder layer's w_prob: Linear(256, 1)
    # --attention sets the project's attentions (ENACT's); detrex's own MultiheadAttention has no such switch
    assert (base["attention"], enact["attention"]) == ("n/a", "eager") and base["batch"] == 2 and base["size"] == [64, 96]
    assert 0 < enact["encoder_flops"] < enact["flops"] and 0 < base["encoder_flops"] < base["flops"]
    assert len(enact["clusters_per_layer"]) == 1 and "clusters_per_layer" not in base
    text = md.read_text()
    assert "| detr_r50_300ep_enact | eager |" in text and "(+257)" in text
