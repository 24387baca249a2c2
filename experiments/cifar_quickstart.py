"""CIFAR quickstart: LR finder, SGDR with snapshots, and the snapshot ensemble, from scratch.

The fast.ai loop in three moves, on real data, with a network trained from random
weights (the main job, experiments/quickstart.py, does the same from pretrained
weights on dogs vs cats):

1. the LR range test (Smith 2015) picks the peak learning rate (fast.ai's 'valley' rule);
2. SGDR (Loshchilov & Hutter 2017) trains a CIFAR ResNet for a few cosine cycles, and
   the weights at the bottom of each cycle are kept (snapshot capture: the schedule
   itself says where its cycles end);
3. the snapshots, averaged as an ensemble (Huang et al. 2017, "Train 1, get M for
   free"), are scored against the single final model on the test set, once.

    python experiments/cifar_quickstart.py            # ~5-8 min on 2 CPU cores
    python experiments/cifar_quickstart.py --quick    # ~20 s: 256 images, 2 short cycles
    python experiments/cifar_quickstart.py --tfds cifar10          # online users
    python experiments/cifar_quickstart.py --folder ROOT           # any ROOT/{train,test}/CLASS/*

Writes results.json, lr_find.png, history.png, schedule.png and ensemble.png to --out.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared recipe beside this file

import cifar

from jaxlearn import ensemble, plots, runs
from jaxlearn.lr_finder import lr_find
from jaxlearn.schedules import sgdr


@dataclasses.dataclass(frozen=True)
class Budget(cifar.Setup):
    """How much data and compute a mode spends."""

    finder_steps: int
    cycles: int


# Default: 8k training images seen (4 one-epoch cycles of 2,000 images) by a ResNet-8
# (78k parameters), which trains at ~40-50 images/s on this 2-core CPU: ~5 minutes.
# A 1-epoch cycle restarts as often as Radek's fastest arm; 4 cycles give 4 snapshots.
DEFAULT = Budget(
    train=2000, valid=1000, test=None, finder_steps=60, model="resnet8", batch_size=64, cycles=4
)
QUICK = Budget(
    train=256, valid=256, test=256, finder_steps=20, model="resnet8", batch_size=32, cycles=2
)
FINDER_RANGE = (1e-3, 10.0)  # 4 decades: the loss is flat at 1e-3 and explodes before 10
# fast.ai smooths with beta 0.98, a ~50-step memory: over a 60-step sweep the smoothed
# curve lags by a decade and 'valley' lands 10x too low (0.013 here, where the raw loss
# bottoms out near 0.3). beta 0.9 remembers ~10 steps.
FINDER_BETA = 0.9


def parse(argv):
    parser = runs.experiment_parser(__doc__.splitlines()[0], default_out="runs/cifar_quickstart")
    cifar.add_data_flags(parser)
    parser.add_argument("--model", help="resnet8 (default), resnet20, ..., cnn_small, mlp")
    parser.add_argument("--cycles", type=int, help="SGDR cycles = snapshots")
    parser.add_argument("--cycle-epochs", type=int, default=1, help="epochs per cycle")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak LR (default: the LR finder's valley)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart; return the metrics written to results.json."""
    args = parse(argv)
    started = time.time()
    mode, budget = cifar.pick_setup(
        args, ("default", DEFAULT), QUICK, model=args.model, batch_size=args.batch_size,
        cycles=args.cycles,
    )  # fmt: skip
    cycles = budget.cycles
    seeds = list(range(args.seeds or 1))
    out = Path(args.out)

    # --- data: a validation set carved from train; the test split is scored once, at the end.
    splits, baseline, recipe = cifar.prepare(args, budget)

    # --- 1. LR range test: one step per LR, 1e-3 .. 10, on a throwaway copy of the model
    # trained with its own optimizer (SGD, momentum 0.9), the sweep setting the rate.
    finder = lr_find(
        recipe.state(cifar.sgd(1.0), seed=0),
        recipe.train_step,
        recipe.loader(splits, seed=0),
        start_lr=FINDER_RANGE[0],
        end_lr=FINDER_RANGE[1],
        num_steps=budget.finder_steps,
        beta=FINDER_BETA,
    )
    valley = finder.suggestions["valley"]
    # Radek's max LR for ResNet-20 is 0.1: the fallback when the curve cannot be read.
    peak_lr = args.lr or valley.lr or 0.1
    print(f"LR finder ({finder.stopped}): valley {valley.lr} -> peak LR {peak_lr:.3g}")
    plots.plot_lr_find(finder, path=out / "lr_find.png")

    # --- 2. SGDR: `cycles` cosine cycles, a snapshot at the bottom of each.
    steps_per_epoch = len(recipe.loader(splits, seed=0))
    schedule = sgdr(peak_lr, args.cycle_epochs * steps_per_epoch, num_cycles=cycles)
    total_steps = cycles * args.cycle_epochs * steps_per_epoch
    plots.plot_schedule(schedule, total_steps, label="SGDR", path=out / "schedule.png")

    per_seed = []
    for seed in seeds:
        # --- 3. the snapshot ensemble against the final model (= the last snapshot).
        record, history = cifar.train_snapshots(
            recipe, splits, schedule, seed, epochs=cycles * args.cycle_epochs
        )
        if seed == seeds[0]:
            plots.plot_history(history, path=out / "history.png")
        test = record["test"]
        print(f"seed {seed}: test single {test['members'][-1]:.4f}, "
              f"ensemble {test['ensemble'][-1]:.4f}")  # fmt: skip
        per_seed.append(record)
    plots.plot_ensemble_curve(cifar.mean_curve(per_seed), path=out / "ensemble.png")

    summary = {
        split: {
            "single_final": runs.summarize([r[split]["members"][-1] for r in per_seed]),
            "ensemble": runs.summarize([r[split]["ensemble"][-1] for r in per_seed]),
        }
        for split in ("valid", "test")
    }
    print_table(baseline, summary, len(seeds))
    metrics = {
        "baseline_majority": baseline,
        "lr_finder": {
            "stopped": finder.stopped,
            "suggestions": {k: s._asdict() for k, s in finder.suggestions.items()},
            "peak_lr": peak_lr,
        },
        "summary": summary,
        "per_seed": per_seed,
    }
    config = {
        "data": cifar.source(args),
        "sizes": splits.describe(),
        "mode": mode,
        **dataclasses.asdict(budget),
        "schedule": f"sgdr(peak_lr={peak_lr:.4g}, cycle_steps={schedule.cycle_steps}, "
        f"num_cycles={cycles})",
        "cycle_epochs": args.cycle_epochs,
        "steps_per_epoch": steps_per_epoch,
        "snapshot_steps": ensemble.snapshot_steps(schedule),
        "optimizer": f"sgd momentum {cifar.MOMENTUM}, L2 weight decay {cifar.WEIGHT_DECAY}",
        "augment": "random flip + 4-px zero-pad random crop",
        "lr_finder": {"range": FINDER_RANGE, "steps": budget.finder_steps, "beta": FINDER_BETA},
    }
    path = runs.write_results(out, config=config, metrics=metrics, seeds=seeds, started=started)
    print(f"wrote {path} and figures in {out} ({time.time() - started:.0f} s)")
    return metrics


def print_table(baseline: dict, summary: dict, n_seeds: int) -> None:
    """The summary table: accuracy of the baseline, the final model and the ensemble."""
    rows = [("majority-class baseline", baseline["valid_accuracy"], baseline["test_accuracy"])]
    for key, name in (("single_final", "single final model"), ("ensemble", "snapshot ensemble")):
        rows.append((name, summary["valid"][key], summary["test"][key]))
    print(f"\n{'accuracy (' + str(n_seeds) + ' seed(s))':<28}{'valid':>18}{'test':>18}")
    for name, valid, test in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else cifar.fmt(v) for v in (valid, test)]
        print(f"{name:<28}{cells[0]:>18}{cells[1]:>18}")
    print()


if __name__ == "__main__":
    main()
