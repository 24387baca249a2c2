"""Snapshot ensembles (Huang et al. 2017): M SGDR snapshots against one cosine model, same budget.

"Train 1, get M for free": train a CIFAR-10 ResNet with SGDR for M cycles, keep the
weights at the bottom of each cycle, and average the snapshots' softmax outputs. The
comparison is a single model trained for the same number of epochs on one plain cosine
(no restarts), with the same peak LR. Both are scored once on the test set; the curve of
accuracy against the number of snapshots is the paper's figure.

Reference (Huang et al. 2017, Table 1, CIFAR-10): ResNet-110, 300 epochs (batch 64,
restart LR 0.2, M = 6 cycles of 50 epochs): single model 5.52% error, snapshot ensemble
5.32%. Their single model used the step schedule; ours uses cosine.

    python experiments/snapshot_ensembles.py --full       # the paper's setup (needs a GPU)
    python experiments/snapshot_ensembles.py              # reduced, ~12-15 min on 2 CPU cores
    python experiments/snapshot_ensembles.py --quick      # ~1-2 min, a smoke run

Writes results.json, ensemble.png, schedules.png and history.png to --out.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared recipe beside this file

import cifar

from jaxlearn import plots, runs
from jaxlearn.schedules import sgdr


@dataclasses.dataclass(frozen=True)
class Setup(cifar.Setup):
    """Data, model and budget of one mode."""

    cycles: int
    cycle_epochs: int
    seeds: int


# Huang et al.'s ResNet-110 run, on 45k/5k/10k (they trained on all 50k).
FULL = Setup(45000, 5000, None, "resnet110", 64, cycles=6, cycle_epochs=50, seeds=3)
# This shared 2-core CPU trains a ResNet-8 at ~15-50 images/s: 2 arms x 2 seeds x 3 epochs
# of 1,000 images is 12k images, ~10-15 minutes. Three one-epoch cycles give 3 snapshots.
REDUCED = Setup(1000, 1000, None, "resnet8", 64, cycles=3, cycle_epochs=1, seeds=2)
QUICK = Setup(256, 256, 256, "resnet8", 32, cycles=2, cycle_epochs=1, seeds=2)
PEAK_LR = 0.2  # Huang et al.'s restart LR for ResNets (their alpha_0 = 0.2 beat 0.1)


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/snapshot_ensembles")
    cifar.add_data_flags(parser)
    parser.add_argument("--full", action="store_true", help="the paper's setup (GPU)")
    parser.add_argument("--model", help="resnet110 (full), resnet8 (reduced), resnet20, ...")
    parser.add_argument("--cycles", type=int, help="SGDR cycles M = number of snapshots")
    parser.add_argument("--cycle-epochs", type=int, help="epochs per cycle")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, default=PEAK_LR, help="peak LR of both arms")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run both arms for every seed; return the metrics written to results.json."""
    args = parse(argv)
    started = time.time()
    mode, setup = cifar.pick_setup(
        args, ("reduced", REDUCED), QUICK, FULL, model=args.model, cycles=args.cycles,
        cycle_epochs=args.cycle_epochs, batch_size=args.batch_size, seeds=args.seeds,
    )  # fmt: skip
    seeds = list(range(setup.seeds))
    out = Path(args.out)

    splits, baseline, recipe = cifar.prepare(args, setup)

    # Same epochs, same peak LR; only the restarts differ.
    steps_per_epoch = len(recipe.loader(splits, seed=0))
    epochs = setup.cycles * setup.cycle_epochs
    arms = {
        "sgdr": sgdr(args.lr, setup.cycle_epochs * steps_per_epoch, num_cycles=setup.cycles),
        "cosine": sgdr(args.lr, epochs * steps_per_epoch, num_cycles=1),
    }
    cifar.plot_schedules(arms, epochs * steps_per_epoch, out / "schedules.png")

    records = {name: [] for name in arms}
    for seed in seeds:
        for name, schedule in arms.items():
            record, history = cifar.train_snapshots(recipe, splits, schedule, seed, epochs)
            records[name].append(record)
            if seed == seeds[0] and name == "sgdr":
                plots.plot_history(history, path=out / "history.png")
            test = record["test"]
            print(f"seed {seed} {name}: test accuracy of each snapshot {test['members']}, "
                  f"of the ensemble {test['ensemble'][-1]:.4f}")  # fmt: skip

    cosine = [r["test"]["members"][-1] for r in records["cosine"]]
    plots.plot_ensemble_curve(
        cifar.mean_curve(records["sgdr"]),
        single=float(np.mean(cosine)),
        label=f"SGDR snapshots ({len(seeds)}-seed mean)",
        path=out / "ensemble.png",
    )
    summary = {
        split: {
            "cosine_single": runs.summarize([r[split]["members"][-1] for r in records["cosine"]]),
            "sgdr_last_snapshot": runs.summarize(
                [r[split]["members"][-1] for r in records["sgdr"]]
            ),
            "sgdr_ensemble": runs.summarize([r[split]["ensemble"][-1] for r in records["sgdr"]]),
            "sgdr_ensemble_by_k": cifar.mean_curve(records["sgdr"], split).ensemble,
        }
        for split in ("valid", "test")
    }
    print(f"\ntest accuracy over {len(seeds)} seeds (mean ± std); error = 1 - accuracy")
    print(f"{'majority-class baseline':<34}{baseline['test_accuracy']:.4f}")
    for key in ("cosine_single", "sgdr_last_snapshot", "sgdr_ensemble"):
        print(f"{key:<34}{cifar.fmt(summary['test'][key])}")
    print("reference (ResNet-110, full setup): single 0.9448, snapshot ensemble 0.9468\n")

    metrics = {"baseline_majority": baseline, "summary": summary, "per_seed": records}
    config = {
        "mode": mode,
        "data": cifar.source(args),
        "sizes": splits.describe(),
        **dataclasses.asdict(setup),
        "peak_lr": args.lr,
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "schedules": {name: repr(s) for name, s in arms.items()},
        "optimizer": f"sgd momentum {cifar.MOMENTUM}, L2 weight decay {cifar.WEIGHT_DECAY}",
        "augment": "random flip + 4-px zero-pad random crop",
        "reference": "Huang et al. 2017 ResNet-110 C10 error 5.52% (single) -> 5.32% (snapshots)",
    }
    path = runs.write_results(out, config=config, metrics=metrics, seeds=seeds, started=started)
    print(f"wrote {path} and figures in {out} ({time.time() - started:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
