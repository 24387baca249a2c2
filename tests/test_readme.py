"""The README's examples run as written: the schedule example, and the folder tour."""

import numpy as np
from conftest import readme_code, write_cats_dogs


def test_readme_schedule_example_runs(capsys):
    exec(compile(readme_code("A schedule you can trust"), "README.md", "exec"), {})
    ends, loss = capsys.readouterr().out.split("\n")[:2]
    assert ends == "[1099, 3099, 7099]"
    assert float(loss) < 1e-6


def test_readme_folder_tour_runs(tmp_path, monkeypatch, capsys):
    code = readme_code("Training on your own folder")
    root = write_cats_dogs(tmp_path, monkeypatch, per_class=8, held_per_class=1)
    # The README's folder, sizes and model -> 16 colour images at 16 px and a small MLP:
    # 10 labelled (2 steps of 4 an epoch), 6 to validate, the same calls in the same order.
    for old, new in (
        ('"../shared/data/cats_and_dogs"', repr(str(root / "data" / "cats_and_dogs"))),
        ('"train", 64)', '"train", 16, progress=False)'),
        ("carve(pets, 650,", "carve(pets, 10,"),
        ('get_model("cnn_small",', 'get_model("mlp",'),
        ("train.labels, 64,", "train.labels, 4,"),
        ("valid.labels, 64,", "valid.labels, 4,"),
        ("epochs=7,", "epochs=7, progress=False,"),
    ):
        assert old in code, old
        code = code.replace(old, new)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    valley = float(capsys.readouterr().out.split("lr=")[1].split(",")[0])
    assert 1e-7 < valley < 10.0
    # SGDR cycles of 1, 2 and 4 epochs: a snapshot at the end of each, all of them inside
    # the 7 epochs, and one evaluation per epoch.
    assert len(scope["capture"].snapshots) == 3
    assert len(scope["history"]["eval_accuracy"]) == 7
    probs, valid = scope["probs"], scope["valid"]
    assert probs.shape == (len(valid.labels), 2) == (6, 2)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
