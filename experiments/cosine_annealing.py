"""Cosine annealing evaluated, after Radek Osmulski: (A) the race to 85%, (B) 182 epochs of SGDR.

Radek's setup ("How to train your neural network - evaluation of cosine annealing"):
ResNet-20 (option-A shortcuts), CIFAR-10 45k/5k/10k, random flip + 4-px zero-pad crop,
batch 128, SGD momentum 0.9, weight decay 1e-4, max LR 0.1.

(A) The race: epochs until the validation accuracy first reaches 85%, per arm and seed.
    His arms: a constant LR against cosine annealing restarting every epoch (fastai 0.7's
    CosAnneal, reproduced exactly by `schedules.fastai_cos_anneal`); reference medians
    30.5 and 21 epochs over 20 runs. Added here: one-cycle and cosine with a one-epoch
    warmup, both annealing over the race's budget.
(B) 182 epochs of SGDR with 7- and 14-epoch cycles; the epoch with the best validation
    accuracy is the model scored on the test set. Reference median test accuracy 0.9096
    (cycle 7) and 0.9109 (cycle 14) over 10 runs; the ResNet paper has 91.25%.

    python experiments/cosine_annealing.py --full           # Radek's setup (GPU)
    python experiments/cosine_annealing.py                  # reduced (~15 min, 2 CPU cores)
    python experiments/cosine_annealing.py --quick          # a smoke run
    python experiments/cosine_annealing.py --full --part long --seeds 10

Writes results.json, race.png, long.png (validation accuracy per epoch) and
schedules.png to --out.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared recipe beside this file

import cifar

from jaxlearn import loop, plots, runs
from jaxlearn import schedules as S

PEAK_LR = 0.1  # Radek's max LR


@dataclasses.dataclass(frozen=True)
class Setup(cifar.Setup):
    """Data, model and budgets of one mode."""

    race_seeds: int
    threshold: float  # validation accuracy that ends the race
    race_epochs: int  # most epochs an arm may take; one-cycle and warmup anneal over them
    long_seeds: int
    long_epochs: int
    long_cycles: tuple[int, ...]  # SGDR cycle lengths of (B), in epochs


FULL = Setup(45000, 5000, None, "resnet20", 128, race_seeds=20, threshold=0.85, race_epochs=60,
             long_seeds=10, long_epochs=182, long_cycles=(7, 14))  # fmt: skip
# Reduced for this shared 2-core CPU, where a ResNet-8 trains at ~15-50 images/s: 1,000
# training images, a 20% bar within 3 epochs for (A) (4 arms x 2 seeds <= 24k images),
# and 4 epochs with 1- and 2-epoch cycles for (B) (2 arms x 2 seeds = 16k images).
REDUCED = Setup(1000, 1000, None, "resnet8", 128, race_seeds=2, threshold=0.20, race_epochs=3,
                long_seeds=2, long_epochs=4, long_cycles=(1, 2))  # fmt: skip
# --quick trains every arm once: with 2 seeds its 12 trainings took 18.5 s of a 23.5 s run
# (cProfile, compiled programs cached; mostly ResNet-8 steps running), with 1 seed the run
# takes 13 s. More seeds only repeat the same code.
QUICK = Setup(256, 256, 256, "resnet8", 32, race_seeds=1, threshold=0.15, race_epochs=2,
              long_seeds=1, long_epochs=2, long_cycles=(1, 2))  # fmt: skip


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/cosine_annealing")
    cifar.add_data_flags(parser)
    parser.add_argument("--full", action="store_true", help="Radek's full setup (GPU)")
    parser.add_argument("--part", choices=("race", "long", "both"), default="both")
    parser.add_argument("--model", help="resnet20 (full), resnet8 (reduced), ...")
    parser.add_argument("--batch-size", type=int, help="images per step (128 as Radek)")
    parser.add_argument("--threshold", type=float, help="validation accuracy ending the race")
    parser.add_argument("--race-epochs", type=int, help="most epochs per race run")
    parser.add_argument("--long-epochs", type=int, help="epochs of (B)")
    return parser.parse_args(argv)


def race_arms(steps_per_epoch: int, epochs: int) -> dict:
    """The schedules of (A), all peaking at 0.1."""
    total = epochs * steps_per_epoch
    return {
        "constant": S.constant(PEAK_LR),
        # fastai 0.7 `learner.fit(0.1, n, cycle_len=1)`: a restart every epoch.
        "sgdr_every_epoch": S.fastai_cos_anneal(PEAK_LR, steps_per_epoch),
        "one_cycle": S.one_cycle(PEAK_LR, total),
        # One epoch of warmup (Goyal et al. 2017 use 5 of 90), at most half of a short race.
        "cosine_warmup": S.cosine_warmup(
            PEAK_LR, total, warmup_steps=min(steps_per_epoch, total // 2)
        ),
    }


def race(recipe, splits, setup: Setup, seeds: list[int], out: Path) -> dict:
    """(A): epochs to reach `setup.threshold` validation accuracy, per arm and seed."""
    steps_per_epoch = len(recipe.loader(splits, seed=0))
    arms = race_arms(steps_per_epoch, setup.race_epochs)
    cifar.plot_schedules(arms, setup.race_epochs * steps_per_epoch, out / "race_schedules.png")
    results, curves = {}, {}
    for name, schedule in arms.items():
        epochs_to, curves[name] = [], []
        for seed in seeds:
            stop = loop.StopAtMetric("eval_accuracy", setup.threshold)
            _, history = recipe.fit(splits, schedule, seed, setup.race_epochs, callbacks=[stop])
            # Not reached within the budget counts as infinitely slow (it ranks last).
            epochs_to.append(np.inf if stop.reached_epoch is None else stop.reached_epoch + 1)
            curves[name].append(history["eval_accuracy"])
            print(f"race {name} seed {seed}: {epochs_to[-1]} epochs to {setup.threshold}")
        reached = np.isfinite(epochs_to)
        results[name] = {
            "epochs_to_threshold": epochs_to,
            "median": float(np.median(epochs_to)),
            "min": float(np.min(epochs_to)),
            "max": float(np.max(epochs_to)),
            "reached": int(reached.sum()),
            "valid_accuracy_per_epoch": curves[name],
        }
    plots.plot_metric_curves(
        curves, ylabel="validation accuracy", threshold=setup.threshold, path=out / "race.png"
    )
    return results


def long_runs(recipe, splits, setup: Setup, seeds: list[int], out: Path) -> dict:
    """(B): SGDR with each cycle length; the best-validation epoch is scored on test."""
    steps_per_epoch = len(recipe.loader(splits, seed=0))
    arms = {
        f"sgdr_cycle_{c}": S.fastai_cos_anneal(PEAK_LR, c * steps_per_epoch)
        for c in setup.long_cycles
    }
    cifar.plot_schedules(arms, setup.long_epochs * steps_per_epoch, out / "long_schedules.png")
    results, curves = {}, {}
    for name, schedule in arms.items():
        rows, curves[name] = [], []
        for seed in seeds:
            best = cifar.KeepBest()
            _, history = recipe.fit(splits, schedule, seed, setup.long_epochs, callbacks=[best])
            test = float(recipe.accuracy([best.best], splits.test).members[0])
            rows.append({"seed": seed, "best_epoch": best.best_epoch,
                         "valid_accuracy": best.best_accuracy, "test_accuracy": test})  # fmt: skip
            curves[name].append(history["eval_accuracy"])
            print(f"long {name} seed {seed}: best epoch {best.best_epoch}, test {test:.4f}")
        tests = [r["test_accuracy"] for r in rows]
        results[name] = {
            "runs": rows,
            "test_accuracy": runs.summarize(tests),
            "test_accuracy_median": float(np.median(tests)),
            "valid_accuracy_per_epoch": curves[name],
        }
    plots.plot_metric_curves(curves, ylabel="validation accuracy", path=out / "long.png")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the parts asked for; return the metrics written to results.json."""
    args = parse(argv)
    started = time.time()
    mode, setup = cifar.pick_setup(
        args, ("reduced", REDUCED), QUICK, FULL, threshold=args.threshold,
        race_epochs=args.race_epochs, long_epochs=args.long_epochs, model=args.model,
        batch_size=args.batch_size, race_seeds=args.seeds, long_seeds=args.seeds,
    )  # fmt: skip
    out = Path(args.out)

    splits, baseline, recipe = cifar.prepare(args, setup)

    metrics = {"baseline_majority": baseline}
    seeds = list(range(max(setup.race_seeds, setup.long_seeds)))
    if args.part in ("race", "both"):
        metrics["race"] = race(recipe, splits, setup, seeds[: setup.race_seeds], out)
    if args.part in ("long", "both"):
        metrics["long"] = long_runs(recipe, splits, setup, seeds[: setup.long_seeds], out)
    print_summary(metrics, setup)

    config = {
        "mode": mode,
        "part": args.part,
        "data": cifar.source(args),
        "sizes": splits.describe(),
        **dataclasses.asdict(setup),
        "peak_lr": PEAK_LR,
        "steps_per_epoch": len(recipe.loader(splits, seed=0)),
        "optimizer": f"sgd momentum {cifar.MOMENTUM}, L2 weight decay {cifar.WEIGHT_DECAY}",
        "augment": "random flip + 4-px zero-pad random crop",
        "reference": "Radek: (A) median 30.5 (constant) vs 21 (cosine every epoch) epochs to "
        "85%, 20 runs; (B) median test 0.9096 (cycle 7), 0.9109 (cycle 14), 10 runs",
    }
    path = runs.write_results(out, config=config, metrics=metrics, seeds=seeds, started=started)
    print(f"wrote {path} and figures in {out} ({time.time() - started:.0f} s)")
    return metrics


def print_summary(metrics: dict, setup: Setup) -> None:
    """Median epochs per race arm, and test accuracy per cycle length."""
    if "race" in metrics:
        print(
            f"\n(A) epochs to {setup.threshold:.0%} validation accuracy (inf: not within "
            f"{setup.race_epochs}); reference medians 30.5 constant, 21 every-epoch SGDR"
        )
        for name, r in metrics["race"].items():
            print(f"  {name:<18} median {r['median']:>5}  range [{r['min']}, {r['max']}]  "
                  f"reached {r['reached']}/{len(r['epochs_to_threshold'])}")  # fmt: skip
    if "long" in metrics:
        print(f"\n(B) {setup.long_epochs} epochs, best-validation checkpoint, test accuracy; "
              "reference medians 0.9096 (cycle 7), 0.9109 (cycle 14)")  # fmt: skip
        for name, r in metrics["long"].items():
            print(f"  {name:<18} median {r['test_accuracy_median']:.4f}  "
                  f"mean ± std {cifar.fmt(r['test_accuracy'])}")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
