"""Train-step throughput: jaxlearn's jitted step against PyTorch (CPU) on the same model.

CIFAR ResNet-18 (3x3 stem, no max-pool, option-B shortcuts, 11.2M params) and
ResNet-20 (option-A shortcuts, 0.27M params), batch 128, 32x32x3, fp32, SGD
momentum 0.9 with L2 weight decay 5e-4, for several XLA CPU flag sets
(`VARIANTS`). XLA reads XLA_FLAGS once, when jax starts, so each (model,
variant) runs in its own subprocess. These machines are shared and loaded, so
inside that subprocess the JAX step and the PyTorch channels_last step
alternate (jax, torch, jax, torch, ...): both see the same load and their ratio
is fair even when the absolute numbers are not. Compilation is timed
separately; then `--warmup` steps of each, then the medians of `--steps` timed
steps, each blocked on (`jax.block_until_ready`). The first and last losses
are recorded so a flag that changes the numerics shows up. XLA_FLAGS from the
environment are prepended to every variant's flags. Writes one JSON.

    python benchmarks/bench_train_step.py                      # every variant, both models
    python benchmarks/bench_train_step.py --quick              # smoke run: batch 16, 2 steps
    python benchmarks/bench_train_step.py --variants default,eigen_conv --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from jaxlearn.models import CifarResNet
from jaxlearn.models.layers import batch_norm, conv, head
from jaxlearn.models.resnet import BasicBlock
from jaxlearn.parallel import data_mesh, replicate, shard_batch
from jaxlearn.state import TrainState
from jaxlearn.steps import make_train_step


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (kuangliu/pytorch-cifar): 3x3 stem, no max-pool."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(batch_norm(train, name="bn1")(conv(64, 3, name="conv1")(x)))
        for i in range(4):
            for j in range(2):
                x = BasicBlock(planes=64 * 2**i, stride=2 if i and not j else 1)(x, train)
        return head(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class TorchBlock(torch.nn.Module):
    """BasicBlock; shortcut 'conv' (option B) or 'pad' (option A)."""

    def __init__(self, cin, planes, stride, shortcut):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.down, self.pad = None, 0
        if stride != 1 or cin != planes:
            if shortcut == "conv":
                self.down = torch.nn.Sequential(
                    torch.nn.Conv2d(cin, planes, 1, stride, bias=False),
                    torch.nn.BatchNorm2d(planes),
                )
            else:
                self.pad, self.stride = planes - cin, stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.down is not None:
            x = self.down(x)
        elif self.pad:
            x = x[:, :, :: self.stride, :: self.stride]
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + x)


class TorchResNet(torch.nn.Module):
    """CIFAR ResNets in torch: `widths` per stage, `blocks` per stage, shortcut kind."""

    def __init__(self, widths, blocks, shortcut, num_classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(TorchBlock(cin, w, 2 if i and not j else 1, shortcut))
                cin = w
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# XLA CPU flag sets to compare, names from jaxlib 0.10.2 (xla/debug_options_flags.cc). Its
# default already sends convolutions, dots and reductions to YNNPACK (XNNPACK's successor):
# a dump of the compiled step shows `__ynn_fusion`s, and `-individual_convolution` leaves the
# fusion types INDIVIDUAL_DOT and REDUCE. Tried and left out: `--xla_cpu_use_onednn=true`
# (SIGILL while compiling on AMD EPYC Zen 3) and
# `--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY` (same program).
VARIANTS = {
    "default": "",
    # Convolutions back on XLA's Eigen kernels (the pre-YNNPACK path).
    "eigen_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    # Elementwise ops (BatchNorm arithmetic, ReLU) fused into YNNPACK subgraphs too.
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    # Eigen ops on one thread: less synchronisation when the cores are oversubscribed.
    "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
    # LLVM fast math for XLA's own fused kernels (ignores NaN/inf semantics: not a default).
    "fast_math": "--xla_cpu_enable_fast_math=true",
}

MODELS = {
    "resnet18_cifar": (CifarResNet18, lambda: TorchResNet((64, 128, 256, 512), 2, "conv")),
    "resnet20": (lambda: CifarResNet(20), lambda: TorchResNet((16, 32, 64), 3, "pad")),
}


def _timed(run_step):
    t = time.perf_counter()
    run_step()
    return time.perf_counter() - t


def interleaved_step_times(runners, warmup, steps):
    """Step times of each runner, the runners alternating step by step.

    Args:
      runners: name -> zero-argument function that runs one blocking step.
      warmup: untimed steps of each runner first.
      steps: timed steps of each runner.

    Returns:
      name -> list of `steps` wall times in seconds.
    """
    for _ in range(warmup):
        for run_step in runners.values():
            run_step()
    times = {name: [] for name in runners}
    for _ in range(steps):
        for name, run_step in runners.items():
            times[name].append(_timed(run_step))
    return times


def jax_runner(make_model, images, labels, compute_dtype=None):
    """jaxlearn's jitted, donating train step, compiled ahead of time.

    Returns:
      (compile seconds, run_step, losses): `run_step()` takes one step and
      appends its loss to `losses`.
    """
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(make_model(), tx, jax.random.key(0), images[:1])
    step = make_train_step(learning_rate=0.1, weight_decay=5e-4, compute_dtype=compute_dtype)
    mesh = data_mesh()
    batch = shard_batch({"image": images, "label": labels}, mesh)
    state = replicate(state, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    holder, losses = [state], []

    def run_step():
        holder[0], metrics = compiled(holder[0], batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))

    return compile_s, run_step, losses


def torch_runner(make_model, images, labels, channels_last):
    """An eager PyTorch step (forward, CE, backward, SGD momentum + weight decay)."""
    torch.manual_seed(0)
    model = make_model().train()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def run_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return run_step


def _bf16_note():
    if has_bf16_hardware():
        return "measured: jax_bf16 rows (bf16 compute, f32 params)"
    return "skipped: no AVX512-BF16/AMX on this CPU, bf16 matmuls would be emulated"


def has_bf16_hardware():
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (else bf16 matmuls are emulated)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return " avx512_bf16" in text or " amx_bf16" in text


def worker(model_name, batch, warmup, steps, with_nchw):
    """One (model, variant) measurement in this process; XLA_FLAGS were set by the parent."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    make_jax, make_torch = MODELS[model_name]
    load_start = os.getloadavg()
    compile_s, jax_step, losses = jax_runner(make_jax, images, labels)
    runners = {
        "jax_fp32": jax_step,
        "torch_channels_last": torch_runner(make_torch, images, labels, True),
    }
    if with_nchw:
        runners["torch_nchw"] = torch_runner(make_torch, images, labels, False)
    if has_bf16_hardware():
        runners["jax_bf16"] = jax_runner(make_jax, images, labels, jnp.bfloat16)[1]
    times = interleaved_step_times(runners, warmup, steps)
    row = {"compile_s": compile_s, "first_loss": losses[0], "last_loss": losses[-1]}
    for name, ts in times.items():
        row[name] = {"step_s": statistics.median(ts), "images_per_s": batch / statistics.median(ts)}
        row[name]["step_times_s"] = ts
    row["ratio_jax_over_torch_channels_last"] = (
        row["jax_fp32"]["images_per_s"] / row["torch_channels_last"]["images_per_s"]
    )
    row["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return row


def run_variant(args, model_name, flags, with_nchw):
    """Run `worker` in a subprocess with `flags` appended to XLA_FLAGS; its result dict."""
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in (os.environ.get("XLA_FLAGS"), flags) if f))
    cmd = [sys.executable, __file__, "--worker", model_name, "--batch", str(args.batch)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--with-nchw"] if with_nchw else []
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - t
    if proc.returncode:
        return {"xla_flags": env["XLA_FLAGS"], "error": proc.stderr[-2000:], "wall_s": wall_s}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"xla_flags": env["XLA_FLAGS"], **row, "wall_s": wall_s}


def _summary(model_name, variant, row):
    if "error" in row:
        return f"{model_name} {variant}: failed: {row['error'][-300:]}"
    return (
        f"{model_name} {variant:14s} jax {row['jax_fp32']['images_per_s']:6.1f} img/s "
        f"(compile {row['compile_s']:5.1f} s) torch channels_last "
        f"{row['torch_channels_last']['images_per_s']:6.1f} ratio "
        f"{row['ratio_jax_over_torch_channels_last']:.2f} loss "
        f"{row['first_loss']:.5f}->{row['last_loss']:.5f} load {row['load_average']['end'][0]:.1f}"
    )


def machine_info():
    """CPU model, core count, relevant ISA flags, library versions."""
    flags = set()
    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":")[1].split())
            if line.startswith("model name"):
                model = line.split(":")[1].strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags_base": os.environ.get("XLA_FLAGS", ""),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 1 warm-up, 2 timed steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--tag", default="variants", help="label of this run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    parser.add_argument(
        "--merge", action="store_true", help="add to the results already in --out (same machine)"
    )
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--with-nchw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.steps = 16, 1, 2
    if args.worker:
        row = worker(args.worker, args.batch, args.warmup, args.steps, args.with_nchw)
        print(json.dumps(row))
        return
    models, variants = args.models.split(","), args.variants.split(",")
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown --models/--variants {unknown}; known {list(MODELS)}, {list(VARIANTS)}"
        )
    out = Path(args.out)
    run = {
        "tag": args.tag,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "with_nchw")},
        "load_average_at_start": os.getloadavg(),
    }
    record = {"machine": machine_info(), "bf16": _bf16_note(), "runs": [], "results": {}}
    if args.merge and out.exists():
        record = json.loads(out.read_text())
    record["runs"].append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for model_name in models:
        rows = record["results"].setdefault(model_name, {})
        for i, variant in enumerate(variants):
            row = run_variant(args, model_name, VARIANTS[variant], i == 0)
            rows[variant] = {"run": len(record["runs"]) - 1, **row}
            print(_summary(model_name, variant, row), flush=True)
            # Written after every variant, so an interrupted run keeps what it measured.
            run["load_average_at_end"] = os.getloadavg()
            run["wall_s"] = time.perf_counter() - t0
            out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
