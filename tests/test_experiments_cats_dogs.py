"""Smoke test of experiments/cats_dogs_scratch.py on tiny image folders written here."""

import json

import cats_dogs_scratch as cats_dogs
import jax
import numpy as np
import pytest
from conftest import write_cats_dogs
from PIL import Image


@pytest.fixture
def data(tmp_path, monkeypatch):
    return write_cats_dogs(tmp_path, monkeypatch, per_class=30, held_per_class=8)


def test_quick_ablation_reports_on_the_eval_dir(data):
    out = data / "out"
    # One seed: each seed of the four arms costs the suite ~4 s.
    argv = ["--quick", "--data", str(data / "data"), "--out", str(out),
            "--eval-dir", str(data / "held" / "validation"), "--n-train", "32",
            "--n-valid", "16", "--seeds", "1"]  # fmt: skip
    cats_dogs.main(argv)
    record = json.loads((out / "results.json").read_text())
    metrics = record["metrics"]
    assert metrics["reported_on"] == "eval_dir" and metrics["report_size"] == 16
    # Stratified: 16 + 16 labelled, 8 + 8 validation, the other 12 the unlabelled pool.
    assert record["config"]["split_sizes"] == [32, 16, 12]
    assert metrics["majority_class_accuracy"] == 0.5  # a 16-16 tie goes to class 0
    ablation = metrics["ablation"]
    assert list(ablation) == ["baseline", "+tta", "+augmentation", "+mixup", "+ema",
                              "+pseudo-labels", "+pseudo-labels +tta",
                              "final: mixup, progressive resizing", "final (+tta)",
                              "final, tested 1.125x larger",
                              "final, tested 1.125x larger (+tta)"]  # fmt: skip
    for row in ablation.values():
        assert len(row["values"]) == 1 and all(0 <= v <= 1 for v in row["values"])
        assert row["mean"] == pytest.approx(np.mean(row["values"]))
    # Each row of the table comes from the eval-dir scores of its arm, not the validation ones.
    per_seed = metrics["per_seed"]
    assert ablation["final (+tta)"]["values"] == [r["eval_dir_tta"] for r in per_seed["final"]]
    assert ablation["+pseudo-labels +tta"]["values"] == [
        r["ema_eval_dir_tta"] for r in per_seed["pseudo"]
    ]
    assert ablation["+ema"]["values"] == [r["ema_eval_dir_plain"] for r in per_seed["mixup"]]
    assert ablation["baseline"]["values"] == [r["eval_dir_plain"] for r in per_seed["baseline"]]
    # The student saw at most the 12 pool images, balanced: an even count.
    assert all(r["pseudo_labelled"] in (0, 2, 4, 6, 8, 10, 12) for r in per_seed["pseudo"])
    assert set(metrics["seconds_per_seed"]) == set(cats_dogs.ARMS)
    # The final arm trains through its stages (32 px, then 48 px; 2 steps an epoch) and is
    # scored on the held-out images stored at 48 px.
    assert record["config"]["final_stages"] == [[32, 1], [48, 1]]
    assert [r["scored_px"] for r in per_seed["final"]] == [48]
    # And on the same held-out images stored at 54 px (48 x 1.125), normalised as trained.
    assert record["config"]["final_test_px"] == 54
    assert [r["upsized_px"] for r in per_seed["final"]] == [54]
    assert ablation["final, tested 1.125x larger (+tta)"]["values"] == [
        r["upsized_eval_dir_tta"] for r in per_seed["final"]
    ]
    assert [r["scored_px"] for r in per_seed["augment"]] == [32]
    # The final arm trains the network its widths describe, not the other arms' cnn_small.
    widths = cats_dogs.QUICK["final_widths"]
    net = cats_dogs.get_model("cnn_small", 2, widths=widths)
    params = jax.eval_shape(net.init, jax.random.key(0), np.zeros((1, 48, 48, 3)))["params"]
    assert record["config"]["final_model"] == {
        "name": "cnn_small",
        "widths": list(widths),
        "parameters": sum(map(np.size, jax.tree.leaves(params))),
    }
    assert len(widths) == 5
    assert len(record["config"]["final_normalize"][0]) == 3
    # Colour alone separates the classes: augmentation-free training must learn it.
    assert np.mean(ablation["baseline"]["values"]) > 0.75
    for arm in cats_dogs.ARMS:
        assert (out / f"history_{arm}.png").stat().st_size > 1000


def test_arms_runs_only_the_chosen_arms(data):
    out = data / "some"
    argv = ["--quick", "--data", str(data / "data"), "--out", str(out), "--n-train", "32",
            "--n-valid", "16", "--seeds", "1", "--arms", "baseline",
            "--final-stages", "24:1,40:2"]  # fmt: skip
    metrics = cats_dogs.main(argv)
    assert list(metrics["ablation"]) == ["baseline", "+tta"]
    assert list(metrics["per_seed"]) == ["baseline"]
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["arms"] == ["baseline"]
    assert config["final_stages"] == [[24, 1], [40, 2]]  # the flag replaces the mode's stages


def test_quick_snapshots_compare_m_cycles_with_one_cosine_of_the_same_steps(data):
    out = data / "snap"
    argv = ["--quick", "--part", "snapshots", "--data", str(data / "data"), "--out", str(out),
            "--n-train", "32", "--n-valid", "16", "--seeds", "1", "--cycles", "3,1",
            "--snapshot-epochs", "3"]  # fmt: skip
    metrics = cats_dogs.main(argv)
    # 32 images, batch 16: 2 steps an epoch, 6 in all for both M = 1 and M = 3 (3 x 2 steps).
    assert metrics["total_steps"] == 6
    single, sgdr = metrics["per_seed"]["M1"][0], metrics["per_seed"]["M3"][0]
    assert (single["cycle_steps"], sgdr["cycle_steps"]) == (6, 2)
    assert len(sgdr["plain_members"]) == len(sgdr["tta_ensemble"]) == 3  # a snapshot a cycle
    assert len(single["plain_members"]) == 1  # its final model
    plain = metrics["summary"]["plain"]
    assert plain["single"]["values"] == [single["plain_members"][-1]]
    assert plain["M3"]["ensemble"]["values"] == [sgdr["plain_ensemble"][-1]]
    assert plain["M3"]["ensemble_minus_single"]["mean"] == pytest.approx(
        sgdr["plain_ensemble"][-1] - single["plain_members"][-1]
    )
    assert plain["M3"]["ensemble_by_k"] == sgdr["plain_ensemble"]  # one seed: its own curve
    for name in ("snapshots_M3.png", "snapshots_M3_tta.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize(
    "flags, match",
    [(["--cycles", "2,4"], "need 1"), (["--cycles", "1"], "need 1"),
     (["--cycles", "1,x"], "expected numbers"),
     (["--cycles", "1,3", "--snapshot-epochs", "4"], "must each divide"),
     (["--arms", "pseudo"], "pseudo needs mixup"), (["--arms", "final,horse"], "unknown arms"),
     (["--final-stages", "64"], "SIZE:EPOCHS"), (["--final-stages", "64:10,128:0"], "SIZE:EPOCHS"),
     (["--final-stages", "8:10"], "SIZE:EPOCHS"), (["--final-stages", "64:x"], "SIZE:EPOCHS"),
     (["--final-widths", "32,x"], "channels per stage"),
     (["--final-widths", "32,0"], "channels per stage")],
)  # fmt: skip
def test_bad_cycles_arms_or_stages_are_refused(data, flags, match, capsys):
    argv = ["--quick", "--part", "snapshots", "--data", str(data / "data"), "--out",
            str(data / "o"), *flags]  # fmt: skip
    if match == "must each divide":
        with pytest.raises(ValueError, match=match):
            cats_dogs.main(argv)
    else:
        with pytest.raises(SystemExit):
            cats_dogs.main(argv)
        assert match in capsys.readouterr().err
    assert not (data / "o").exists()


def test_the_pool_is_disjoint_and_carries_no_labels():
    rng = np.random.default_rng(0)
    data = cats_dogs.ImageArrays(rng.integers(0, 255, (60, 4, 4, 3), np.uint8),
                                 np.repeat([0, 1], 30), ("cats", "dogs"))  # fmt: skip
    cfg = dict(n_train=20, n_valid=10)
    train, valid, pool = cats_dogs.split(data, cfg, seed=0)
    assert isinstance(pool, np.ndarray) and pool.shape == (30, 4, 4, 3)
    seen = {img.tobytes() for img in np.concatenate([train.images, valid.images, pool])}
    assert len(seen) == 60  # every image once: disjoint and complete


def test_eval_dir_with_a_foreign_class_is_rejected(data):
    (data / "held" / "validation" / "horses").mkdir()
    Image.new("RGB", (8, 8)).save(data / "held" / "validation" / "horses" / "0.png")
    with pytest.raises(ValueError, match="horses"):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                        "--eval-dir", str(data / "held" / "validation")])  # fmt: skip


def test_missing_eval_dir_is_a_file_not_found(data):
    with pytest.raises(FileNotFoundError, match="eval-dir"):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"),
                        "--eval-dir", str(data / "nowhere")])  # fmt: skip


@pytest.mark.parametrize(
    "flag",
    [["--size", "8"], ["--epochs", "0"], ["--seeds", "0"], ["--snapshot-epochs", "0"],
     ["--final-stages", "32:1,16:1"],  # 16 px: below the final network's 5 stages' 32 px
     ["--final-stages", "16:1", "--final-widths", "8,8,8,8,8"]],
)  # fmt: skip
def test_bad_size_epochs_or_seeds_are_rejected_before_any_work(data, flag):
    with pytest.raises(ValueError, match=f"{flag[0]} must be >= "):
        cats_dogs.main(["--quick", "--data", str(data / "data"), "--out", str(data / "o"), *flag])
    assert not (data / "o").exists()
