"""tools/sparse_stats.py end to end on a tiny sparse DETR + ENACT checkpoint and a 3-image shapes
split: at rho = 1 every valid token is selected, so the selection is the DAM's best (overlap and
mass 1) and the in-box share is the box token share; a dense config is refused by name."""
import json

import pytest
import torch

from detection_helpers import load_tool, save_tiny_run, sparse, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_run(tmp, with_sparse=True):
    cfg = tiny_config("detr_r50_300ep_enact", in_features="res4", num_classes=4)
    cfg.transformer.encoder.attention.sigma = 1
    return save_tiny_run(tmp, sparse(cfg) if with_sparse else cfg, "sparse_tiny")


def test_sparse_stats_tool(tmp_path, capsys):
    config, checkpoint = tiny_run(tmp_path)
    out = tmp_path / "stats"
    result = load_tool("sparse_stats").main(["--config-file", config, "--checkpoint", checkpoint, "--batch-size", "2",
                               "--query-ratios", "0.3", "1.0", "--output", str(out)])
    saved = json.loads((out / "sparse_stats.json").read_text())
    assert saved["images"] == 3 and set(saved["query_ratios"]) == {"0.3", "1.0"}
    full = result["query_ratios"]["1.0"]
    for row in full["per_image"]:
        assert row["selected_share"] == 1.0 and row["dam_overlap"] == 1.0
        assert row["dam_mass"] == pytest.approx(1.0) and row["dam_top_share"] == pytest.approx(1.0)
        assert row["in_box_share"] == pytest.approx(row["box_token_share"])
    assert any(r["box_token_share"] > 0 for r in full["per_image"])  # the boxes cover tokens
    assert all(r["norm_ratio"] != r["norm_ratio"] for r in full["per_image"])  # nothing unselected: nan
    assert "norm_ratio" not in full["summary"]
    part = result["query_ratios"]["0.3"]["per_image"]
    assert all(0.3 <= r["selected_share"] < 0.3 + 1 / 8 and 0 <= r["dam_overlap"] <= 1 for r in part)
    assert all(r["dam_top_share"] >= r["selected_share"] - 1e-9 for r in part)  # the best k hold >= k / n
    assert all(r["norm_ratio"] > 0 for r in part)
    assert "dam_overlap" in capsys.readouterr().out


def test_overrides_may_follow_the_list_of_ratios():
    args = load_tool("sparse_stats").parse_args(["--config-file", "c.py", "--checkpoint", "m.pth", "--output", "o",
                                   "--query-ratios", "0.1", "0.3", "model.transformer.encoder.scorer_reads_pos=False"])
    assert args.query_ratios == [0.1, 0.3] and args.opts == ["model.transformer.encoder.scorer_reads_pos=False"]


def test_sparse_stats_refuses_a_dense_encoder(tmp_path):
    config, checkpoint = tiny_run(tmp_path, with_sparse=False)
    with pytest.raises(SystemExit, match="not a sparse encoder"):
        load_tool("sparse_stats").main(["--config-file", config, "--checkpoint", checkpoint, "--output", str(tmp_path / "x")])


def test_norm_ratio_hand_computed():
    """Tokens of norms 1, 2, 3, 6 (the last a pad); tokens 0 and 1 selected: (3) / (1.5) = 2."""
    from projects.enact.modeling.sparse_selection import top_tokens

    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 6.0]])[:, None, :]  # (N, B, C)
    valid = torch.tensor([[True, True, True, False]])
    sel = top_tokens(torch.tensor([[5.0, 4.0, 0.0, 9.0]]), valid, torch.tensor([2]))
    assert load_tool("sparse_stats").norm_ratio(memory, sel).tolist() == [2.0]
