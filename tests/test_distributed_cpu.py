"""Several processes on a CPU (gloo): tools/train_net.py --num-gpus 2 train.device=cpu trains a
tiny DETR + ENACT (DDP, the distributed sampler) and evaluates with COCOEvaluator gathering both
processes' predictions; the project's launch / create_ddp_model, and EnactStatsHook combining
ENACT's and ACT's statistics over the processes."""
import json
import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detection_helpers import recomputed_coco_ap

from projects.enact.engine import EnactStatsHook, combine_statistics, create_ddp_model, launch
from test_reproducibility import read_metrics, run_train_net, write_tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def test_two_cpu_processes_train_and_evaluate(tmp_path):
    config = write_tiny_config(tmp_path)
    out = tmp_path / "out"
    run_train_net(
        config, out, "train.max_iter=3", "dataloader.train.num_workers=0", datasets=tmp_path / "datasets",
        extra_args=["--num-gpus", "2", "--dist-url", "auto"], timeout=150,  # ~30 s on 2 busy cores
    )
    log = open(out / "log.txt").read()
    assert "World size: 2" in log
    assert "2 processes (backend gloo): DistributedDataParallel on cpu" in log
    assert os.path.isfile(out / "log.txt.rank1")

    metrics = read_metrics(out)
    steps = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in steps] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in steps)
    for m in steps:  # the hook's statistics over both processes' images
        assert m["enact/layer0/clusters_min"] <= m["enact/layer0/clusters_per_image"] <= m["enact/layer0/clusters_max"]
    final = metrics[-1]
    assert final["iteration"] == 3
    # the logged AP is COCOeval's on both processes' predictions, as written
    recomputed = recomputed_coco_ap(out / "coco_instances_results.json", tmp_path / "datasets")
    assert {k: final[f"bbox/{k}"] for k in recomputed} == pytest.approx(recomputed, abs=1e-6)

    # each process evaluated half of the 8 validation images; the evaluator gathered all of them
    with open(out / "coco_instances_results.json") as f:
        predictions = json.load(f)
    assert sorted({p["image_id"] for p in predictions}) == list(range(1, 9))
    assert len(predictions) == 8 * 10  # 10 queries per image
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 2 and not any(k.startswith("module.") for k in state["model"])


# ---------------------------------------------------------------- in two gloo processes
class FakeEnact(nn.Module):
    """What EnactStatsHook reads of an ENACT layer: statistics() and clustering.last_num_clusters."""

    def __init__(self, counts, compression):
        super().__init__()
        self.clustering = SimpleNamespace(last_num_clusters=torch.tensor(counts))
        self._stats = {"clusters_per_image": float(sum(counts)) / len(counts), "compression": compression}

    def statistics(self):
        return dict(self._stats)


class FakeAct(nn.Module):
    """An ACT layer: statistics(), the hash projections and (B, heads) cluster counts."""

    def __init__(self, counts):
        super().__init__()
        self.register_buffer("hash_a", torch.zeros(1))
        self.last_num_clusters = torch.tensor(counts)

    def statistics(self):
        return {"clusters_per_image": float(self.last_num_clusters.double().mean()), "compression": 2.0}


def _worker(out_dir):
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    rank = comm.get_rank()
    # DDP of a CPU module: no device_ids; gradients are averaged over the processes
    torch.manual_seed(rank)
    ddp = create_ddp_model(nn.Linear(3, 1))
    ddp(torch.full((2, 3), float(rank + 1))).sum().backward()
    grad = ddp.module.weight.grad.tolist()

    model = nn.Module()
    model.enc = nn.ModuleList([FakeEnact([4 + rank, 6 + 10 * rank], 3.0 + rank), FakeEnact([5, 5], 1.0)])
    model.act = FakeAct([[2 + rank, 8], [3, 4 - rank]])
    hook = EnactStatsHook(model, period=1)
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.after_step()
        values = {k: v for k, (v, _) in storage.latest().items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"grad": grad, "weight": ddp.module.weight.tolist(), "stats": values, "type": type(ddp).__name__}, f)


def test_launch_gloo_ddp_and_stats_hook_combine_over_processes(tmp_path):
    launch(_worker, 2, device="cpu", dist_url="auto", args=(str(tmp_path),), timeout=timedelta(seconds=60))
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["type"] == r1["type"] == "DistributedDataParallel"
    assert r0["weight"] == r1["weight"]  # rank 0's initial weights broadcast
    assert r0["grad"] == r1["grad"] == [[3.0, 3.0, 3.0]]  # mean of 2 * 1 and 2 * 2
    assert r0["stats"] == r1["stats"]
    stats = r0["stats"]
    # layer 0: rank 0 has images with 4 and 6 clusters, rank 1 with 5 and 16
    assert stats["enact/layer0/clusters_per_image"] == pytest.approx((5.0 + 10.5) / 2)
    assert stats["enact/layer0/compression"] == pytest.approx(3.5)
    assert (stats["enact/layer0/clusters_min"], stats["enact/layer0/clusters_max"]) == (4.0, 16.0)
    assert stats["enact/clusters_per_image"] == pytest.approx(((5.0 + 10.5) / 2 + 5.0) / 2)
    assert stats["act/layer0/clusters_per_image"] == pytest.approx(((2 + 8 + 3 + 4) / 4 + (3 + 8 + 3 + 3) / 4) / 2)
    assert (stats["act/layer0/clusters_min"], stats["act/layer0/clusters_max"]) == (2.0, 8.0)
    assert stats["act/compression"] == 2.0


def test_real_enact_and_act_layers_logged_in_one_process():
    from detectron2.utils.events import EventStorage

    from projects.enact import EnactAttention
    from projects.enact.modeling.act import ActAttention

    torch.manual_seed(0)
    model = nn.ModuleDict({"enact": EnactAttention(16, 2, sigma=1), "act": ActAttention(16, 2, num_hashes=2, bucket_width=1.0)})
    x = torch.randn(12, 2, 16)  # (N, B, C): not batch_first
    for layer in model.values():
        layer(x, x, x)
    hook = EnactStatsHook(model, period=1)
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=0, storage=storage)
        hook.after_step()
        stats = {k: v for k, (v, _) in storage.latest().items()}
    for prefix, layer in (("enact", model["enact"]), ("act", model["act"])):
        expected = layer.statistics()
        assert stats[f"{prefix}/layer0/clusters_per_image"] == pytest.approx(expected["clusters_per_image"])
        assert stats[f"{prefix}/compression"] == pytest.approx(expected["compression"])
        assert stats[f"{prefix}/layer0/clusters_min"] <= expected["clusters_per_image"] <= stats[f"{prefix}/layer0/clusters_max"]


def test_combine_statistics_and_single_process_ddp():
    combined = combine_statistics([{"a": 1.0, "x_min": 3.0, "x_max": 5.0}, {"a": 3.0, "x_min": 2.0, "x_max": 4.0, "b": 7.0}])
    assert combined == {"a": 2.0, "x_min": 2.0, "x_max": 5.0, "b": 7.0}
    model = nn.Linear(2, 2)
    assert create_ddp_model(model) is model  # one process: the model itself
