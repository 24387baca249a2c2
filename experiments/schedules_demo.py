"""Print and plot jaxlearn's schedules: what each one does, step by step.

A run of 7 "epochs" of 100 steps: SGDR with 1-, 2- and 4-epoch cycles (cycle_mult 2, as in
Loshchilov & Hutter and fast.ai's `cycle_len=1, cycle_mult=2`), fastai 0.7's CosAnneal,
cosine with warmup, 1cycle and its momentum, the ResNet step schedule and a constant.
Prints each schedule's value at the steps that matter (start, warmup end, cycle ends
and restarts, last step) and writes `schedules.png`, `momentum.png` and `results.json` under --out.

    python experiments/schedules_demo.py [--out runs/schedules_demo] [--quick]

It takes a few seconds either way; --quick is accepted for symmetry with the other
experiments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxlearn import plots
from jaxlearn import schedules as S

STEPS_PER_EPOCH = 100
EPOCHS = 7  # 1 + 2 + 4: three SGDR cycles with cycle_mult = 2
TOTAL = STEPS_PER_EPOCH * EPOCHS
PEAK = 0.1  # Radek's max LR for ResNet-20 on CIFAR-10


def build() -> tuple[dict, dict]:
    """(learning-rate schedules, momentum schedules), by name."""
    lrs = {
        "sgdr": S.sgdr(PEAK, STEPS_PER_EPOCH, cycle_mult=2, num_cycles=3),
        "sgdr_warmup_decay": S.sgdr(
            PEAK, STEPS_PER_EPOCH, 2, cycle_decay=0.5, min_lr=1e-3, warmup_steps=20, num_cycles=3
        ),
        "fastai_cos_anneal": S.fastai_cos_anneal(PEAK, STEPS_PER_EPOCH, cycle_mult=2),
        "cosine_warmup": S.cosine_warmup(PEAK, TOTAL, warmup_steps=50),
        "one_cycle": S.one_cycle(PEAK, TOTAL),
        "step_decay": S.step_decay(PEAK, [TOTAL // 2, TOTAL * 3 // 4]),
        "constant": S.constant(PEAK),
    }
    moms = {"one_cycle_momentum": S.one_cycle_momentum(TOTAL)}
    return lrs, moms


def key_steps(lrs: dict) -> list[int]:
    """Start, warmup end, each cycle end and the step after it, the last step."""
    steps = {0, 20, TOTAL - 1}
    for end in lrs["sgdr"].cycle_ends():
        steps |= {end, end + 1}
    return sorted(s for s in steps if s < TOTAL)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/schedules_demo"))
    parser.add_argument("--quick", action="store_true", help="accepted; the demo is quick")
    args = parser.parse_args(argv)

    lrs, moms = build()
    steps = key_steps(lrs)
    table = {name: [float(f(t)) for t in steps] for name, f in {**lrs, **moms}.items()}
    width = max(map(len, table))
    print(f"{'step':<{width}}" + "".join(f"{t:>11d}" for t in steps))
    for name, row in table.items():
        print(f"{name:<{width}}" + "".join(f"{v:>11.3g}" for v in row))
    print("sgdr cycle ends:", lrs["sgdr"].cycle_ends())

    args.out.mkdir(parents=True, exist_ok=True)
    ax = None
    for name, f in lrs.items():
        ax = plots.plot_schedule(f, TOTAL, ax=ax, label=name).axes[0]
    ax.set_ylabel("learning rate")
    ax.figure.savefig(args.out / "schedules.png", dpi=120)
    momentum = moms["one_cycle_momentum"]
    plots.plot_schedule(momentum, TOTAL, label="one_cycle_momentum", path=args.out / "momentum.png")

    results = {
        "steps_per_epoch": STEPS_PER_EPOCH,
        "total_steps": TOTAL,
        "key_steps": steps,
        "values": table,
        "sgdr_cycle_ends": lrs["sgdr"].cycle_ends(),
        "lr_curves": {name: np.asarray(f(np.arange(TOTAL))).tolist() for name, f in lrs.items()},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote schedules.png, momentum.png and results.json to {args.out}")
    return results


if __name__ == "__main__":
    main()
