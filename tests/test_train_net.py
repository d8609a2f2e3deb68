"""tools/train_net.py end to end: train a tiny config on generated shapes files, evaluate with
COCOEvaluator, resume from a checkpoint with the same iteration and optimizer state."""
import copy
import importlib.util
import json
import os

import pytest
import torch
from detection_helpers import recomputed_coco_ap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes", "detr_r18_shapes_enact.py")


def load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "dataloader.train.dataset.num_train=8", "dataloader.train.dataset.num_val=4",
    "dataloader.test.dataset.num_train=8", "dataloader.test.dataset.num_val=4",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "model.backbone.depth=18", "model.transformer.encoder.num_layers=1", "model.transformer.decoder.num_layers=1",
    "train.log_period=1", "train.checkpointer.period=2",
]


@pytest.fixture()
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("ENACT_DATASETS", str(tmp_path / "datasets"))
    train_net = load_train_net()

    def _run(*opts, resume=False, eval_only=False, output="out"):
        argv = ["--config-file", CONFIG] + (["--resume"] if resume else []) + (["--eval-only"] if eval_only else [])
        args = train_net.default_argument_parser().parse_args(argv + TINY + [f"train.output_dir={tmp_path / output}", *opts])
        return train_net.main(args)

    return train_net, _run, tmp_path


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_then_evaluate_with_coco_evaluator(run):
    _, _run, tmp = run
    _run("train.max_iter=3")
    out = tmp / "out"
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    metrics = read_metrics(out / "metrics.json")
    losses = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses)
    assert any("enact/compression" in m and m["enact/compression"] > 1 for m in metrics)  # tokens clustered
    final = metrics[-1]
    # the logged AP is COCOeval's on the predictions the run wrote
    recomputed = recomputed_coco_ap(out / "coco_instances_results.json", tmp / "datasets")
    assert {k: final[f"bbox/{k}"] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)
    # --eval-only on the written checkpoint gives the same evaluation
    results = _run(f"train.init_checkpoint={out / 'model_final.pth'}", eval_only=True, output="eval")
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert results["bbox"]["AP"] == pytest.approx(final["bbox/AP"], abs=1e-6)


def test_fast_dev_run_trains_20_iterations_and_evaluates_8_images(run):
    """detrex's train.fast_dev_run.enabled=True, honoured as detrex's train_net does (20 iterations,
    an evaluation every 10, a log line every iteration; it wins over the command line's values),
    with evaluations on the first 8 test images only."""
    _, _run, tmp = run
    _run("train.fast_dev_run.enabled=True", "train.max_iter=1000", "train.eval_period=1000", "train.log_period=7",
         "train.checkpointer.period=1000", "dataloader.train.dataset.num_val=12", "dataloader.test.dataset.num_val=12")
    out = tmp / "out"
    metrics = read_metrics(out / "metrics.json")
    assert [m["iteration"] for m in metrics if "total_loss" in m] == list(range(20))
    assert [m["iteration"] for m in metrics if "bbox/AP" in m] == [9, 20]  # the last: logged after the last step
    with open(out / "coco_instances_results.json") as f:
        images = {r["image_id"] for r in json.load(f)}
    assert 0 < len(images) <= 8 and len(images) < 12
    log = (out / "log.txt").read_text()
    assert "train.fast_dev_run.enabled=True: train.max_iter=20, train.eval_period=10, train.log_period=1, " \
           "evaluation on the first 8 test images" in log


def test_resume_continues_from_checkpoint_iteration_and_optimizer_state(run, monkeypatch):
    train_net, _run, tmp = run
    _run("train.max_iter=2")  # "killed" after its checkpoint at iteration 1
    saved = torch.load(tmp / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 1

    seen = {}
    original = train_net.DetrTrainer.train

    def spy(self, start_iter, max_iter):
        seen["start_iter"] = start_iter
        seen["optimizer"] = copy.deepcopy(self.optimizer.state_dict())  # tensors change in place later
        seen["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original(self, start_iter, max_iter)

    monkeypatch.setattr(train_net.DetrTrainer, "train", spy)
    _run("train.max_iter=4", resume=True)
    assert seen["start_iter"] == 2
    for key, value in saved["model"].items():
        assert torch.equal(seen["model"][key], value), key
    saved_state, resumed_state = saved["trainer"]["optimizer"]["state"], seen["optimizer"]["state"]
    assert saved_state.keys() == resumed_state.keys() and len(saved_state) > 0
    for idx in saved_state:
        for name, value in saved_state[idx].items():
            assert torch.equal(torch.as_tensor(resumed_state[idx][name]), torch.as_tensor(value)), (idx, name)
    iterations = [m["iteration"] for m in read_metrics(tmp / "out" / "metrics.json") if "total_loss" in m]
    assert iterations == [0, 1, 2, 3]


def test_missing_coco_files_and_cuda_are_reported(run, tmp_path, monkeypatch):
    train_net, _run, _ = run
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    coco_cfg = os.path.join(ROOT, "configs", "detr_r50_300ep.py")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", coco_cfg, "train.device=cpu", f"train.output_dir={tmp_path / 'coco'}"]
    )
    with pytest.raises(FileNotFoundError, match="coco_2017_train"):
        train_net.main(args)
    if not torch.cuda.is_available():
        args = train_net.default_argument_parser().parse_args(
            ["--config-file", coco_cfg, f"train.output_dir={tmp_path / 'coco'}"]
        )
        with pytest.raises(RuntimeError, match="train.device=cpu"):
            train_net.main(args)
