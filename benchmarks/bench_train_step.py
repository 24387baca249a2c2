"""Train-step throughput: jaxlearn's jitted step against PyTorch (CPU) on the same model.

Side by side in one run (these machines are shared, so the ratio means more
than either number): CIFAR ResNet-18 (3x3 stem, no max-pool, option-B
shortcuts, 11.2M params) and ResNet-20 (option-A shortcuts, 0.27M params), batch
128, 32x32x3, fp32, SGD momentum 0.9 with L2 weight decay 5e-4. Compilation is
timed separately; then `--warmup` steps, then the median of `--steps` timed
steps, each blocked on (`jax.block_until_ready`). Writes JSON with machine info.

    python benchmarks/bench_train_step.py            # full: batch 128, 20 timed steps
    python benchmarks/bench_train_step.py --quick    # smoke run: batch 16, 2 steps
    XLA_FLAGS=... python benchmarks/bench_train_step.py --tag flags-x   # try XLA flags
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


MODELS = {
    "resnet18_cifar": (CifarResNet18, lambda: TorchResNet((64, 128, 256, 512), 2, "conv")),
    "resnet20": (lambda: CifarResNet(20), lambda: TorchResNet((16, 32, 64), 3, "pad")),
}


def _median_step_time(run_step, warmup, steps):
    for _ in range(warmup):
        run_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench_jax(make_model, images, labels, warmup, steps, compute_dtype=None):
    """Compile time and median step time of jaxlearn's jitted, donating train step."""
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(make_model(), tx, jax.random.key(0), images[:1])
    step = make_train_step(learning_rate=0.1, weight_decay=5e-4, compute_dtype=compute_dtype)
    mesh = data_mesh()
    batch = shard_batch({"image": images, "label": labels}, mesh)
    state = replicate(state, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    holder = [state]

    def run_step():
        holder[0], metrics = compiled(holder[0], batch)
        jax.block_until_ready(metrics)

    median, times = _median_step_time(run_step, warmup, steps)
    return {"compile_s": compile_s, "step_s": median, "step_times_s": times}


def bench_torch(make_model, images, labels, warmup, steps, channels_last):
    """Median step time of an eager PyTorch step (forward, CE, backward, SGD)."""
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

    median, times = _median_step_time(run_step, warmup, steps)
    return {"step_s": median, "step_times_s": times}


def machine_info():
    """CPU model, core count, relevant ISA flags, library versions, load average."""
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
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average_at_start": os.getloadavg(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [str(d) for d in jax.devices()],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 1 warm-up, 2 timed steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tag", default="default", help="label of this configuration")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.steps = 16, 1, 2
    info = machine_info()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.int32)
    results = {}
    for name in args.models.split(","):
        make_jax, make_torch = MODELS[name]
        row = {"jax_fp32": bench_jax(make_jax, images, labels, args.warmup, args.steps)}
        if info["avx512_bf16"] or info["amx_bf16"]:
            row["jax_bf16"] = bench_jax(
                make_jax, images, labels, args.warmup, args.steps, compute_dtype=jnp.bfloat16
            )
        else:
            row["jax_bf16"] = {"skipped": "CPU has no AVX512-BF16/AMX: bf16 would be emulated"}
        for layout in ("nchw", "channels_last"):
            row[f"torch_{layout}"] = bench_torch(
                make_torch, images, labels, args.warmup, args.steps, layout == "channels_last"
            )
        for value in row.values():
            if "step_s" in value:
                value["images_per_s"] = args.batch / value["step_s"]
        best_torch = max(
            row["torch_nchw"]["images_per_s"], row["torch_channels_last"]["images_per_s"]
        )
        row["ratio_jax_fp32_over_best_torch"] = row["jax_fp32"]["images_per_s"] / best_torch
        results[name] = row
        print(
            f"{name}: jax {row['jax_fp32']['images_per_s']:.1f} img/s "
            f"(compile {row['jax_fp32']['compile_s']:.1f} s), torch NCHW "
            f"{row['torch_nchw']['images_per_s']:.1f}, channels_last "
            f"{row['torch_channels_last']['images_per_s']:.1f}, "
            f"ratio {row['ratio_jax_fp32_over_best_torch']:.2f}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tag": args.tag,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": info,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
