"""Same config, train.seed and thread count -> the same losses and AP: tools/train_net.py run
twice (separate processes) on a tiny DETR + ENACT, metrics.json and the predictions compared
exactly; and periodic evaluation does not change what is trained."""
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A self-contained tiny config (the demo configs change; these tests need a few-second run):
# DETR + ENACT, R18 to res4, d = 32, 1 + 1 layers, dropout 0.1 (so that training draws from
# torch's generator), 8 + 8 shapes images of 64-96 px generated on first use.
TINY_CONFIG = '''
import os

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from projects.enact import EnactAttention
from projects.enact.data.shapes_loader import shapes_dataset_dicts
from projects.enact.data.transforms import build_detr_mapper
from projects.enact.engine.schedule import step_lr_multiplier

_CONFIGS = {configs!r}
model = LazyConfig.load(os.path.join(_CONFIGS, "common/models/detr_r50.py"), "model")
LazyConfig.load(os.path.join(_CONFIGS, "common/shrink_model.py"), "shrink_model")(
    model, embed_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, num_queries=10,
    in_features="res4", norm="BN", freeze_at=0, dropout=0.1, num_classes=4, select_box_nums_for_evaluation=10,
)
model.transformer.encoder.attention = L(EnactAttention)(
    embed_dim=32, num_heads=4, attn_drop=0.1, proj_drop=0.1, sigma=2
)

_SHAPES = dict(name_prefix="enact_tiny", num_train=8, num_val=8, num_classes=4, image_size=(64, 96),
               object_size=(12, 40), max_objects=3)
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(shapes_dataset_dicts)(split="train", **_SHAPES),
    mapper=L(build_detr_mapper)(is_train=True, image_format="BGR", min_sizes=(64, 80, 96), max_size=128,
                                crop_pre_sizes=(64, 80), crop_size=(48, 80)),
    total_batch_size=2,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(shapes_dataset_dicts)(split="val", filter_empty=False, **_SHAPES),
    mapper=L(build_detr_mapper)(is_train=False, image_format="BGR", min_size=80, max_size=128),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="enact_tiny_val", output_dir="${{train.output_dir}}")

optimizer = LazyConfig.load(os.path.join(_CONFIGS, "common/optim.py"), "AdamW")
optimizer.lr = 1e-3
optimizer.params.lr_factor_func = None
train = LazyConfig.load(os.path.join(_CONFIGS, "common/train.py"), "train")
train.update(device="cpu", max_iter=4, eval_period=0, log_period=1, seed=7, output_dir="./output/tiny")
train.checkpointer.period = 100
lr_multiplier = L(step_lr_multiplier)(max_iter="${{train.max_iter}}", drop_fraction=0.5)
'''

def is_time(key):  # time, data_time, rank_data_time, eta_seconds: wall clock, not results
    return "time" in key or key == "eta_seconds"


def write_tiny_config(directory) -> str:
    path = os.path.join(str(directory), "tiny_enact_config.py")
    with open(path, "w") as f:
        f.write(TINY_CONFIG.format(configs=os.path.join(ROOT, "configs")))
    return path


def run_train_net(config, output_dir, *opts, datasets, threads=1, timeout=240, extra_args=()):
    """tools/train_net.py in a subprocess with ``threads`` intra-op threads; returns seconds."""
    env = dict(os.environ, ENACT_DATASETS=str(datasets), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config, *extra_args,
           *opts, f"train.output_dir={output_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return time.perf_counter() - t0


def read_metrics(path):
    with open(os.path.join(str(path), "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def without_times(records):
    return [{k: v for k, v in r.items() if not is_time(k)} for r in records]


def training_records(records):
    return [{k: v for k, v in r.items() if not is_time(k) and not k.startswith("bbox/")}
            for r in records if "total_loss" in r]


def test_same_seed_same_losses_and_ap(tmp_path):
    config = write_tiny_config(tmp_path)
    datasets = tmp_path / "datasets"
    opts = ["train.eval_period=2"]
    run_train_net(config, tmp_path / "a", *opts, datasets=datasets)
    run_train_net(config, tmp_path / "b", *opts, datasets=datasets)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")

    losses = [r["total_loss"] for r in a if "total_loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert [r["iteration"] for r in a if "bbox/AP" in r] == [1, 4]  # periodic (after 2 steps) and final
    assert without_times(a) == without_times(b)  # every loss, grad norm, lr, ENACT statistic and AP, exactly
    assert any("enact/compression" in r for r in a)
    with open(tmp_path / "a" / "coco_instances_results.json") as fa, open(tmp_path / "b" / "coco_instances_results.json") as fb:
        preds_a, preds_b = json.load(fa), json.load(fb)
    assert preds_a and preds_a == preds_b  # every box and score
    wa = torch.load(tmp_path / "a" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # without the periodic evaluation the training is the same (evaluation keeps the RNG states)
    run_train_net(config, tmp_path / "c", "train.eval_period=0", datasets=datasets)
    c = read_metrics(tmp_path / "c")
    assert training_records(c) == training_records(a)
    assert c[-1]["bbox/AP"] == a[-1]["bbox/AP"] and c[-1]["iteration"] == 4
