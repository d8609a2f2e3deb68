"""configs/detrex/*_enact.py (detrex's own configs with ENACT in the encoder), trained and
evaluated by tools/train_net.py on CPU, and detrex checkpoints through EnactCheckpointer.
Marked ``detrex``: ``make test-detrex DETREX_SRC=...``."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from detection_helpers import recomputed_coco_ap
from detrex_helpers import assert_detrex_except_results_folder, flat_config, shrink_detrex_model

pytestmark = [pytest.mark.detrex, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # ENACT config -> (detrex config, encoder key, ENACT class, sigma, other changed keys)
    "detr_r50_300ep_enact": ("projects/detr/configs/detr_r50_300ep.py", "transformer.encoder", 5, {}),
    "conditional_detr_r50_50ep_enact": (
        "projects/conditional_detr/configs/conditional_detr_r50_50ep.py", "transformer.encoder", 5, {}),
    "dab_detr_r50_50ep_enact": ("projects/dab_detr/configs/dab_detr_r50_50ep.py", "transformer.encoder", 5, {}),
    "dn_detr_r50_50ep_enact": ("projects/dn_detr/configs/dn_detr_r50_50ep.py", "transformer.encoder", 5, {}),
    "group_detr_r50_50ep_enact": ("projects/group_detr/configs/group_detr_r50_50ep.py", "transformer.encoder", 5, {}),
    "anchor_detr_r50_50ep_enact": ("projects/anchor_detr/configs/anchor_detr_r50_50ep.py", "transformer", 3, {}),
    "anchor_detr_r50_50ep_mhsa_enact": ("projects/anchor_detr/configs/anchor_detr_r50_50ep.py", "transformer", 3,
                                        {"transformer.attention_type": "nn.MultiheadAttention"}),
    "pnp_detr_r50_300ep_enact": ("projects/pnp_detr/configs/pnp_detr_r50_300ep.py", "transformer", 5, {}),
}


def load(name):
    from detectron2.config import LazyConfig

    return LazyConfig.load(str(ROOT / "configs" / "detrex" / f"{name}.py"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_is_detrex_with_an_enact_encoder(name):
    from detectron2.config import instantiate
    from projects.enact.detrex_support import detrex_config

    path, where, sigma, others = CONFIGS[name]
    cfg, base = load(name), detrex_config(path)
    ours, theirs = flat_config(cfg.model), flat_config(base.model)
    changed = {k for k in ours if k not in theirs or ours[k] != theirs[k]}
    assert set(theirs) <= set(ours)  # every model.* key where detrex has it
    assert changed == {f"{where}._target_", f"{where}.sigma", *others}
    assert ours[f"{where}.sigma"] == sigma and ours[f"{where}._target_"].__name__.startswith("Enact")
    assert all(ours[k] == v for k, v in others.items())
    assert_detrex_except_results_folder(cfg, base)
    # built tiny: exactly its 2 encoder self-attentions are ENACT
    model = instantiate(shrink_detrex_model(cfg.model))
    replaced = [n for n, m in model.named_modules() if getattr(m, "_replaced_encoder_attention", False)]
    assert len(replaced) == 2 and all(("encoder" in n) and "decoder" not in n for n in replaced)


def test_every_config_writes_its_results_under_its_own_folder():
    """The evaluator's folder is ``${train.output_dir}``: each config's own, and moved by the command
    line's train.output_dir (detrex's configs copy their folder as a string, or write nothing)."""
    from detectron2.config import LazyConfig

    folders = {}
    for path in sorted((ROOT / "configs" / "detrex").glob("*.py")):
        cfg = LazyConfig.load(str(path))
        assert cfg.dataloader.evaluator.output_dir == cfg.train.output_dir == f"./output/detrex/{path.stem}"
        folders[path.stem] = cfg.train.output_dir
        moved = LazyConfig.apply_overrides(cfg, ["train.output_dir=/elsewhere/run1"])
        assert moved.dataloader.evaluator.output_dir == "/elsewhere/run1"
    assert len(folders) >= 16 and len(set(folders.values())) == len(folders)


def test_detrex_root_is_needed_with_a_clear_message(monkeypatch):
    from projects.enact import detrex_support

    monkeypatch.setenv("DETREX_ROOT", "/nonexistent/detrex")
    with pytest.raises(RuntimeError, match="DETREX_ROOT=/nonexistent/detrex is not a detrex checkout"):
        detrex_support.detrex_config("projects/detr/configs/detr_r50_300ep.py")


def load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# detrex's DAB-DETR + ENACT config on the built-in shapes data: the data, the number of classes,
# the model size and "no pretrained weights" are the only changes, all written here
DERIVED = '''
import sys
sys.path.insert(0, {tests!r})
from detectron2.config import LazyConfig
from detection_helpers import recomputed_coco_ap
from detrex_helpers import shrink_detrex_model

_enact = LazyConfig.load({config!r})
model, optimizer, lr_multiplier, train = _enact.model, _enact.optimizer, _enact.lr_multiplier, _enact.train
dataloader = LazyConfig.load({shapes!r}).dataloader       # the built-in shapes dataset, 4 classes
shrink_detrex_model(model)                                 # R18, 2 + 2 layers, 10 queries
model.device = train.device                                # as detrex's config has it ("cuda")
model.transformer.encoder.sigma = 1                        # feature maps of 4 x 5 tokens
model.num_classes = model.criterion.num_classes = 4
train.init_checkpoint = ""                                 # no pretrained weights
'''
TINY = [
    "train.device=cpu", "train.max_iter=3", "train.log_period=1", "train.checkpointer.period=3",
    "train.eval_period=3",
    "dataloader.train.dataset.num_train=8", "dataloader.train.dataset.num_val=4",
    "dataloader.test.dataset.num_train=8", "dataloader.test.dataset.num_val=4",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
]


def test_train_net_trains_and_evaluates_detrex_dab_detr_enact_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ENACT_DATASETS", str(tmp_path / "datasets"))
    config = tmp_path / "dab_detr_enact_shapes.py"
    config.write_text(DERIVED.format(tests=str(ROOT / "tests"), config=str(ROOT / "configs/detrex/dab_detr_r50_50ep_enact.py"),
                                     shapes=str(ROOT / "configs/common/data/shapes.py")))
    train_net = load_train_net()
    out = tmp_path / "out"
    parser = train_net.default_argument_parser()
    train_net.main(parser.parse_args(["--config-file", str(config), *TINY, f"train.output_dir={out}"]))
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses)
    assert any("grad_norm" in m for m in metrics)  # detrex's train.clip_grad.enabled=True honoured
    assert any(m.get("enact/compression", 0) > 1 for m in metrics)  # ENACT's statistics logged: tokens clustered
    # COCOEvaluator's AP is COCOeval's on the predictions the run wrote
    recomputed = recomputed_coco_ap(out / "coco_instances_results.json", tmp_path / "datasets")
    assert {k: metrics[-1][f"bbox/{k}"] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)
    # evaluation alone, from the written checkpoint
    results = train_net.main(parser.parse_args(
        ["--config-file", str(config), "--eval-only", *TINY, f"train.output_dir={out}",
         f"train.init_checkpoint={out / 'model_final.pth'}"]))
    assert {k: results["bbox"][k] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)  # the same model


def test_enact_checkpointer_loads_a_detrex_checkpoint_unchanged(tmp_path):
    from detectron2.config import instantiate
    from projects.enact.checkpoint.checkpointer import EnactCheckpointer
    from projects.enact.detrex_support import detrex_config

    torch.manual_seed(0)
    detrex_model = instantiate(shrink_detrex_model(detrex_config("projects/detr/configs/detr_r50_300ep.py").model))
    state = detrex_model.state_dict()
    assert "criterion.empty_weight" in state  # a complete detrex checkpoint
    path = tmp_path / "detrex_detr.pth"
    torch.save({"model": state, "iteration": 7}, path)

    torch.manual_seed(1)
    same = instantiate(shrink_detrex_model(detrex_config("projects/detr/configs/detr_r50_300ep.py").model))
    EnactCheckpointer(same).load(str(path))
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in state.items())

    enact = instantiate(shrink_detrex_model(load("detr_r50_300ep_enact").model))
    w_prob = {k: v.clone() for k, v in enact.state_dict().items() if ".w_prob." in k}
    EnactCheckpointer(enact).load(str(path))
    loaded = enact.state_dict()
    assert set(loaded) - set(state) == set(w_prob) and len(w_prob) == 4
    assert all(torch.equal(v, loaded[k]) for k, v in state.items())
    assert all(torch.equal(v, loaded[k]) for k, v in w_prob.items())  # new: left as initialised


@pytest.mark.parametrize("name", list(CONFIGS))
def test_baseline_twin_is_detrex_config(name):
    """configs/detrex/X.py is detrex's config as it is (tools/benchmark.py pairs it with X_enact)."""
    from projects.enact.detrex_support import detrex_config

    path, _, _, others = CONFIGS[name]
    ours, theirs = flat_config(load(name.replace("_enact", "")).model), flat_config(detrex_config(path).model)
    assert ours == {**theirs, **others}


def test_benchmark_runs_a_detrex_model_with_and_without_enact(tmp_path):
    import os
    import subprocess
    import sys

    md, js, profile = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "profile"
    tiny = ["model.transformer.encoder.num_layers=1", "model.transformer.decoder.num_layers=1",
            "model.num_queries=10", "model.select_box_nums_for_evaluation=10"]
    # every flag once (--attention both and --device cuda aside: twice the time, and no GPU)
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--configs", "detrex/dab_detr_r50_50ep",
           "detrex/dab_detr_r50_50ep_enact", "--threads", "1", "--batch", "2", "--size", "96", "128",
           "--orientation", "mixed", "--dropout-mask", "bool", "--min-scale", "0.5", "--max-boxes", "2",
           "--attention", "eager", "--device", "cpu", "--seed", "1", "--profile", str(profile),
           "--repeats", "1", "--modes", "train", "encoder", "--jobs", "2", "--quiet", "--out-md", str(md),
           "--out-json", str(js), "--opts", *tiny]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(js.read_text())
    assert result["sizes"]["dab_detr_r50_50ep"] == {"batch": 2, "size": [96, 128], "padded": [128, 128],
                                                   "orientation": "mixed"}
    assert {k: result["args"][k] for k in ("dropout_mask", "min_scale", "max_boxes", "seed", "attention")} == {
        "dropout_mask": "bool", "min_scale": 0.5, "max_boxes": 2, "seed": 1, "attention": "eager"}
    models, modes = ("dab_detr_r50_50ep", "dab_detr_r50_50ep_enact"), ("train", "encoder")
    assert sorted(p.name for p in profile.iterdir()) == sorted(f"{m}_eager_{mode}.txt" for m in models for mode in modes)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["dab_detr_r50_50ep_enact"]["profile"]["train"]
    assert list(rows) == ["dab_detr_r50_50ep", "dab_detr_r50_50ep_enact"]
    for row in rows.values():
        for key in ("train_s_per_img", "encoder_ms_per_img", "train_memory_bytes", "encoder_memory_bytes"):
            assert row[key] > 0, key
    enact = rows["dab_detr_r50_50ep_enact"]
    assert len(enact["clusters_per_layer"]) == 1 and enact["compression_mean"] > 1
    assert "train_memory_gain" in enact and "train_time_ratio" in enact
