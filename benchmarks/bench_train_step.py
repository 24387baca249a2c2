"""Train-step throughput: jaxlearn's jitted step against PyTorch (CPU) on the same model.

CIFAR ResNet-18 (3x3 stem, no max-pool, option-B shortcuts, 11.2M params) and
ResNet-20 (option-A shortcuts, 0.27M params) at batch 128, 32x32x3, 10 classes, and
`cnn_small` (4 x conv3x3-BN-ReLU-maxpool2, 0.39M params) at batch 32, 64x64 and
128x128, 2 classes; fp32, SGD momentum 0.9 with L2 weight decay 5e-4, for several XLA
CPU flag sets (`VARIANTS`). XLA reads XLA_FLAGS once, when jax starts, so each (model,
variant) runs in its own subprocess, `--repeats` times. These machines are shared and
loaded, so before each subprocess the parent waits (up to `--max-wait` seconds) for
the 1-minute load average to drop below `--max-load`, and inside it the JAX step and
the PyTorch channels_last step alternate (jax, torch, jax, torch, ...): both see the
same load and their ratio is fair even when the absolute numbers are not. A repeat
during which other processes kept more than `--max-foreign` cores busy is discarded
and run again. The first call of the JAX step (compilation and one step) is timed
separately; then `--warmup` steps of each, then the medians of `--steps` timed steps,
each blocked on (`jax.block_until_ready`). A row reports the median over the repeats,
each repeat's ratio, load averages and foreign CPU use, and `tried`: what was tried
to speed that model up, with the measured effect. The first and last losses are
recorded so a flag that changes the numerics shows up. XLA_FLAGS from the environment
are prepended to every variant's flags. Writes one JSON; each run records its machine
(these VMs move between hosts: the same project has run on AVX2-only and AVX-512 CPUs).

`--torch-isa AVX2` caps PyTorch's kernels at AVX2: on an AVX-512 CPU oneDNN JITs
AVX-512 convolutions, while the Eigen kernels in jaxlib are compiled for AVX2.
`--conv-kernels` times each model's convolutions alone instead (`conv_kernels`).

    python benchmarks/bench_train_step.py                      # every variant, every model
    python benchmarks/bench_train_step.py --quick              # smoke run: batch 16, 2 steps
    python benchmarks/bench_train_step.py --variants eigen_conv --models cnn_small_64 --merge
    python benchmarks/bench_train_step.py --conv-kernels --models resnet20 --merge
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

from jaxlearn.models import CifarResNet, get_model
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
    # ...and XLA's memory-minimising scheduler instead of the concurrency-optimised one,
    # which keeps more temporaries alive (EfficientNet-Lite0: 6.1 -> 2.3 s per step).
    "eigen_conv+memory_scheduler": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false",
    # Elementwise ops (BatchNorm arithmetic, ReLU) fused into YNNPACK subgraphs too.
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    # Eigen ops on one thread: less synchronisation when the cores are oversubscribed.
    "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
    # LLVM fast math for XLA's own fused kernels (ignores NaN/inf semantics: not a default).
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


class TorchCNN(torch.nn.Module):
    """jaxlearn's SimpleCNN in torch: (Conv2d 3x3 - BatchNorm2d - ReLU - MaxPool2d(2)) per width."""

    def __init__(self, widths, num_classes):
        super().__init__()
        layers, cin = [], 3
        for width in widths:
            layers += [
                torch.nn.Conv2d(cin, width, 3, 1, 1, bias=False),
                torch.nn.BatchNorm2d(width),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            cin = width
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


# name -> (JAX model, torch model, image size, default batch, classes).
MODELS = {
    "resnet18_cifar": (
        CifarResNet18,
        lambda: TorchResNet((64, 128, 256, 512), 2, "conv"),
        32,
        128,
        10,
    ),
    "resnet20": (lambda: CifarResNet(20), lambda: TorchResNet((16, 32, 64), 3, "pad"), 32, 128, 10),
    "cnn_small_64": (
        lambda: get_model("cnn_small", 2),
        lambda: TorchCNN((32, 64, 128, 256), 2),
        64,
        32,
        2,
    ),
    "cnn_small_128": (
        lambda: get_model("cnn_small", 2),
        lambda: TorchCNN((32, 64, 128, 256), 2),
        128,
        32,
        2,
    ),
}


# What was tried to bring each model's step level with PyTorch, and what it measured: ms per
# train step (medians, alternating with torch in one process, eigen_conv flags, load < 2.5)
# unless said otherwise; "isolated": the op alone, jitted, forward + backward. Kept: in
# jaxlearn/models/layers.py. The same flags were tried on every model.
_FLAGS_TRIED = [
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce (XLA's own "
    "reductions instead of YNNPACK's): cnn_small 64 px 57 -> 81 ms. Dropped.",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true: cnn_small 64 px 57.0 -> 56.6 ms "
    "(noise: it is jaxlib 0.10's default).",
    "KEPT in quickstart.sh --xla_cpu_enable_concurrency_optimized_scheduler=false (XLA's "
    "memory-minimising scheduler; results/train_step_memory_scheduler.json, 2 processes "
    "each): JAX img/s ResNet-20 584 -> 536, cnn_small 64 px 496 -> 500, 128 px 132 -> 141, "
    "ResNet-18 80 -> 79; EfficientNet-Lite0 at 224 px 6.1 -> 2.3 s a step "
    "(results/efficientnet.json), whose depthwise gradients' k*k tap copies it no longer "
    "keeps alive at once.",
    "--xla_cpu_multi_thread_eigen=false with Eigen convolutions (independent thunks in "
    "parallel instead of each convolution on 2 threads): cnn_small 64 px 58.1, 59.1 -> "
    "64.7, 66.3 ms. Dropped.",
    "--xla_cpu_use_onednn=true (also with --xla_cpu_experimental_onednn_custom_call=true, "
    "--xla_cpu_max_isa=AVX2, --xla_cpu_use_thunk_runtime=false): compiles here, but no "
    "convolution is rewritten to oneDNN (the optimized HLO keeps Eigen convolutions), same time.",
    "oneDNN fusion types (--xla_cpu_experimental_onednn_fusion_type): only dot, eltwise and "
    "reduce exist, no convolution.",
    "XNNPACK convolutions (--xla_cpu_experimental_xnn_fusion_type=individual_convolution, "
    "also with --xla_cpu_use_xnnpack=true, YNNPACK fusions off): a 32x32 16->16 convolution "
    "at batch 128 forward 10.8-11.1 ms and both gradients 41-44 ms, Eigen's 11.3 and 43.6 in "
    "the same run (2026-12-02, another job on the cores): they stay on Eigen. Dropped.",
]
_STRIDED_TRIED = (
    "Input gradient of stride-2 convolutions by output phase (a custom_vjp: the s^2 phases "
    "as one stride-1 convolution of the undilated gradient, then depth-to-space; matches "
    "autodiff to 2e-7): isolated 32x32 16->32 at batch 128 13.1-14.7 -> 2.5-3.3 ms, 16x16 "
    "32->64 2.7-3.8 -> 1.8-2.2 ms, but the whole gradient in one process, alternating "
    "(2026-12-02): ResNet-20 332 -> 331 ms (1.008x), CIFAR ResNet-18 1.009x, ResNet-18 at "
    "64 px batch 32 1.058x. Dropped."
)
_CNN_TRIED = [
    "KEPT max_pool_2x2: 2x2 max-pool as reshape + max instead of nn.max_pool "
    "(select-and-scatter backward): 64 px 121 -> 83 ms with JAX's own gradient of the max "
    "(PyTorch 60); isolated at 32x64x64x32: 44 ms -> 7-15 ms.",
    "KEPT hand-written elementwise-mask backward for it (ties each get the gradient): "
    "64 px 83 -> 65 ms, 128 px 490 -> 311 ms; isolated 7-15 -> 3.8-4.4 ms (PyTorch 11 ms).",
    "KEPT BatchNorm with a hand-written backward: 64 px 65 -> 57 ms, 128 px 311 -> 247 ms; "
    "isolated BN + ReLU at 32x64x64x32: 7.2-10.5 -> 5.1-7.6 ms (PyTorch 20-24 ms).",
    "BatchNorm + ReLU + max-pool as one custom op (no full-size ReLU output kept): isolated "
    "layer 1 17.0 -> 18.5 ms (64 px), 65.8 -> 63.2 ms (128 px). Dropped.",
    "Convolution input saved pre-transposed (C, H, W, N) in the forward for the weight "
    "gradient: 64 px 59.2, 59.5 -> 57.4, 64.7 ms. Dropped.",
    "Weight gradient with the roles of input and gradient swapped (input as the kernel, "
    "read without a full transpose): 64 px 67 -> 81 ms. Dropped.",
    "First convolution (3 input channels; Eigen 3-7x slower than oneDNN) as im2col + dot "
    "(YNNPACK's dot): isolated forward 64 px 7.4 -> 10.4 ms, 128 px 29 -> 42 ms; in the "
    "64 px step 65.6, 57.6 -> 64.1, 57.6 ms; its weight gradient as batched dots 7.7 -> "
    "10.1 ms. Input channels zero-padded to 4 or 8: 2.9 -> 3.2, 4.5 ms. Dropped.",
    "Input-gradient convolutions split over output or input channels or the batch, or "
    "output channels zero-padded (16x16 128->64: 3.9 ms plain): 4.2-6.6 ms. Weight "
    "gradient split over the batch in 2 or 4: no change. Dropped.",
    *_FLAGS_TRIED,
]
TRIED = {
    "resnet18_cifar": [
        "KEPT the same add_relu and BatchNorm as ResNet-20 (its blocks): ratio 0.72 -> 0.88 on "
        "the AVX-512 host (0.98 before on the AVX2-only host of runs 0-2).",
        _STRIDED_TRIED,
    ],
    "cnn_small_64": _CNN_TRIED,
    "cnn_small_128": _CNN_TRIED,
    "resnet20": [
        "KEPT add_relu: the residual add + ReLU as max(x, -shortcut) + shortcut with a "
        "hand-written backward, so XLA:CPU stops recomputing the whole residual stream inside "
        "each weight-gradient transpose: 306 -> 257 ms (PyTorch 135); transposes 242 -> 125 "
        "ms CPU per step.",
        "KEPT BatchNorm with a hand-written backward: 257 -> 254 ms (within noise here).",
        "lax.optimization_barrier on convolution inputs: XLA:CPU removes it before fusion; "
        "transposes 242 -> 238 ms CPU. Dropped.",
        "Convolution input saved pre-transposed in the forward for the weight gradient: "
        "240, 226 -> 250, 232 ms. Dropped.",
        "Weight gradient with the roles of input and gradient swapped: 233 -> 288 ms "
        "(the gradient's transpose then recomputes the BatchNorm backward). Dropped.",
        "Weight gradient as dots (im2col, or 9 shifted dots): isolated 32x32x16 batch 128 "
        "10.1 -> 47-81 ms; with the batch folded into the rows (no input transpose) "
        "13.6 -> 49.2 ms. Dropped.",
        "Forward convolution as a dot (2026-12-04, Intel Xeon with AVX-512 and AMX): XLA's "
        "dots are YNNPACK's AVX-512 kernels (2048^3: 285 GFLOP/s, PyTorch 317), but at a "
        "16-channel layer's im2col shape, [131072, 144] x [144, 16], they reach 91 GFLOP/s "
        "(PyTorch 103). Isolated 32x32 16->16 at batch 128, forward: Eigen convolution 7.9 ms, "
        "im2col + dot 40.7 ms, 9 shifted dots 32.6 ms; forward + both gradients 27.4, 61.8, "
        "101 ms. Dropped.",
        "YNNPACK convolutions (jaxlib's default): isolated forward 32x32 16->16 5.1 ms, "
        "8x8 64->64 4.7 ms vs Eigen 4.8, 1.9 ms; the whole step 2.7x slower. Not used.",
        _STRIDED_TRIED,
        "Stops here: the convolutions alone (conv_kernels in this JSON) take Eigen about "
        "twice as long as oneDNN at these shapes, more than PyTorch's whole step.",
        *_FLAGS_TRIED,
    ],
}


def _timed(run_step):
    t = time.perf_counter()
    run_step()
    return time.perf_counter() - t


def _cpu_ticks():
    """(clock ticks all CPUs spent busy, ticks this process spent), or None without /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(map(int, fields)) - int(fields[3]) - int(fields[4])  # minus idle and iowait
    return busy, int(own[11]) + int(own[12])  # utime + stime


def interleaved_step_times(runners, warmup, steps):
    """Step times of each runner, the runners alternating step by step.

    Args:
      runners: name -> zero-argument function that runs one blocking step.
      warmup: untimed steps of each runner first.
      steps: timed steps of each runner.

    Returns:
      (name -> list of `steps` wall times in seconds, the average number of cores
      that other processes kept busy during the timed steps, or None if unknown).
    """
    for _ in range(warmup):
        for run_step in runners.values():
            run_step()
    times = {name: [] for name in runners}
    ticks, t = _cpu_ticks(), time.perf_counter()
    for _ in range(steps):
        for name, run_step in runners.items():
            times[name].append(_timed(run_step))
    wall, end = time.perf_counter() - t, _cpu_ticks()
    if ticks is None or end is None:
        return times, None
    foreign = (end[0] - ticks[0]) - (end[1] - ticks[1])
    return times, foreign / os.sysconf("SC_CLK_TCK") / wall


def jax_runner(make_model, images, labels, compute_dtype=None):
    """jaxlearn's jitted, donating train step; its first call (compilation + one step) timed.

    Returns:
      (first-call seconds, run_step, losses): `run_step()` takes one step and
      appends its loss to `losses`.
    """
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(make_model(), tx, jax.random.key(0), images[:1])
    step = make_train_step(weight_decay=5e-4, compute_dtype=compute_dtype)
    mesh = data_mesh()
    batch = shard_batch({"image": images, "label": labels}, mesh)
    state = replicate(state, mesh)
    t = time.perf_counter()
    state, metrics = step(state, batch)
    losses = [float(jax.block_until_ready(metrics)["loss"])]
    compile_s = time.perf_counter() - t
    holder = [state]

    def run_step():
        holder[0], metrics = step(holder[0], batch)
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


# Each model's convolutions: (count, batch, input size, in channels, out channels, stride).
CONV_SHAPES = {
    "resnet20": [
        (1, 128, 32, 3, 16, 1),
        (6, 128, 32, 16, 16, 1),
        (1, 128, 32, 16, 32, 2),
        (5, 128, 16, 32, 32, 1),
        (1, 128, 16, 32, 64, 2),
        (5, 128, 8, 64, 64, 1),
    ],
    "cnn_small_64": [
        (1, 32, 64, 3, 32, 1),
        (1, 32, 32, 32, 64, 1),
        (1, 32, 16, 64, 128, 1),
        (1, 32, 8, 128, 256, 1),
    ],
    "cnn_small_128": [
        (1, 32, 128, 3, 32, 1),
        (1, 32, 64, 32, 64, 1),
        (1, 32, 32, 64, 128, 1),
        (1, 32, 16, 128, 256, 1),
    ],
}


def _blocking(fn, *args):
    """A zero-argument function that runs `fn(*args)` and waits for its result."""
    return lambda: jax.block_until_ready(fn(*args))


def conv_kernel_times(model_name, warmup, steps):
    """Each of a model's 3x3 convolutions alone: forward, input and weight gradient, JAX vs torch.

    JAX: `lax.conv_general_dilated` and its two VJPs, each jitted on its own
    (the input gradient is not needed for the first layer, whose input is the
    image). torch: `F.conv2d` and `aten.convolution_backward`, channels_last.
    Alternating, medians; what the convolution kernels alone cost, without the
    rest of the step.

    Returns:
      One dict per shape with the ms of each pass, and the totals weighted by
      how often each shape occurs in the model.
    """
    rng = np.random.default_rng(0)
    rows, totals = [], {}
    dn = ("NHWC", "HWIO", "NHWC")
    for count, batch, size, cin, cout, stride in CONV_SHAPES[model_name]:
        x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
        w = (0.1 * rng.standard_normal((3, 3, cin, cout))).astype(np.float32)

        def conv_fn(x, w, stride=stride):
            return jax.lax.conv_general_dilated(
                x, w, (stride,) * 2, ((1, 1), (1, 1)), None, None, dn
            )

        g = rng.standard_normal(jax.eval_shape(conv_fn, x, w).shape).astype(np.float32)
        fwd = jax.jit(conv_fn)
        dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv_fn(x, w), x)[1](g)[0])
        wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv_fn(x, w), w)[1](g)[0])
        xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)

        def nchw(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).contiguous(
                memory_format=torch.channels_last
            )

        xt, gt = nchw(x), nchw(g)
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).contiguous(
            memory_format=torch.channels_last
        )

        def torch_pass(mask, xt=xt, wt=wt, gt=gt, stride=stride):
            def run():
                torch.ops.aten.convolution_backward(
                    gt, xt, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask
                )

            return run

        def torch_fwd(xt=xt, wt=wt, stride=stride):
            with torch.no_grad():
                F.conv2d(xt, wt, stride=stride, padding=1)

        runners = {
            "jax_forward": _blocking(fwd, xj, wj),
            "torch_forward": torch_fwd,
            "jax_weight_grad": _blocking(wgrad, xj, wj, gj),
            "torch_weight_grad": torch_pass([False, True, False]),
        }
        if cin > 3:
            runners["jax_input_grad"] = _blocking(dgrad, xj, wj, gj)
            runners["torch_input_grad"] = torch_pass([True, False, False])
        times, foreign = interleaved_step_times(runners, warmup, steps)
        ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
        rows.append({"count": count, "batch": batch, "size": size, "in": cin, "out": cout,
                     "stride": stride, "ms": ms, "foreign_cores": foreign})  # fmt: skip
        for name, value in ms.items():
            totals[name] = totals.get(name, 0.0) + count * value
    for lib in ("jax", "torch"):
        totals[f"{lib}_all"] = sum(v for k, v in totals.items() if k.startswith(lib + "_"))
    return {"shapes": rows, "total_ms": totals, "load_average": os.getloadavg()}


def _bf16_note(asked):
    if not has_bf16_hardware():
        return "skipped: no AVX512-BF16/AMX on this CPU, bf16 matmuls would be emulated"
    if asked:
        return "measured: jax_bf16 rows (bf16 compute, f32 params)"
    return "not measured (--bf16 adds a bf16 JAX step to the alternation)"


def has_bf16_hardware():
    """Whether /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (else bf16 matmuls are emulated)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return " avx512_bf16" in text or " amx_bf16" in text


def worker(model_name, batch, warmup, steps, with_nchw, bf16=False):
    """One (model, variant) measurement in this process; XLA_FLAGS were set by the parent."""
    make_jax, make_torch, size, _, num_classes = MODELS[model_name]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    load_start = os.getloadavg()
    compile_s, jax_step, losses = jax_runner(make_jax, images, labels)
    runners = {
        "jax_fp32": jax_step,
        "torch_channels_last": torch_runner(make_torch, images, labels, True),
    }
    if with_nchw:
        runners["torch_nchw"] = torch_runner(make_torch, images, labels, False)
    if bf16 and has_bf16_hardware():
        runners["jax_bf16"] = jax_runner(make_jax, images, labels, jnp.bfloat16)[1]
    times, foreign = interleaved_step_times(runners, warmup, steps)
    row = {"compile_s": compile_s, "first_loss": losses[0], "last_loss": losses[-1]}
    row["foreign_cores"] = foreign
    row["jaxlearn"] = str(Path(sys.modules["jaxlearn"].__file__).parent)
    row["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    row["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    for name, ts in times.items():
        row[name] = {"step_s": statistics.median(ts), "images_per_s": batch / statistics.median(ts)}
        row[name]["step_times_s"] = ts
    row["ratio_jax_over_torch_channels_last"] = (
        row["jax_fp32"]["images_per_s"] / row["torch_channels_last"]["images_per_s"]
    )
    row["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return row


def wait_for_load(max_load, max_wait_s):
    """Wait until the 1-minute load average is below `max_load` (at most `max_wait_s`).

    Returns:
      (seconds waited, the load average when measuring starts).
    """
    t = time.perf_counter()
    while os.getloadavg()[0] >= max_load and time.perf_counter() - t < max_wait_s:
        time.sleep(10)
    return time.perf_counter() - t, os.getloadavg()


def run_variant(args, model_name, flags, with_nchw, extra=()):
    """Run `worker` in a subprocess with `flags` appended to XLA_FLAGS; its result dict."""
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in (os.environ.get("XLA_FLAGS"), flags) if f))
    if args.torch_isa:  # PyTorch's kernels capped at this ISA (oneDNN JITs the best it finds)
        env.update(ONEDNN_MAX_CPU_ISA=args.torch_isa, ATEN_CPU_CAPABILITY=args.torch_isa.lower())
    batch = args.batch or MODELS[model_name][3]
    cmd = [sys.executable, __file__, "--worker", model_name, "--batch", str(batch)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--with-nchw"] if with_nchw else []
    cmd += ["--bf16"] if args.bf16 else []
    cmd += list(extra)
    waited_s, load = wait_for_load(args.max_load, args.max_wait)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - t
    info = {"xla_flags": env["XLA_FLAGS"], "batch": batch, "load_wait_s": waited_s}
    if proc.returncode:
        return {**info, "error": proc.stderr[-2000:], "wall_s": wall_s, "load_before": load}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**info, **row, "wall_s": wall_s, "load_before": load}


RATIO = "ratio_jax_over_torch_channels_last"


def combine_repeats(reps):
    """One row from the repeats of a (model, variant): medians, and every repeat's ratio.

    Each repeat is its own process; their ratios differ by more than the steps inside
    one (how the two runtimes' worker threads share the 2 cores varies between
    processes), so the row keeps them all and reports their median.
    """
    good = [r for r in reps if "error" not in r]
    if not good:
        return reps[-1]
    keys = ("xla_flags", "batch", "jaxlearn", "torch_cpu_capability", "onednn_max_cpu_isa")
    row = {k: good[0].get(k) for k in (*keys, "first_loss", "last_loss")}
    row["compile_s"] = statistics.median(r["compile_s"] for r in good)
    for name in ("jax_fp32", "torch_channels_last", "torch_nchw", "jax_bf16"):
        have = [r for r in good if name in r]  # torch_nchw: the first repeat only
        if have:
            step_s = statistics.median(r[name]["step_s"] for r in have)
            row[name] = {"step_s": step_s, "images_per_s": row["batch"] / step_s}
    row[RATIO] = statistics.median(r[RATIO] for r in good)
    row["repeats"] = [
        {
            "ratio": r[RATIO],
            "jax_images_per_s": r["jax_fp32"]["images_per_s"],
            "torch_channels_last_images_per_s": r["torch_channels_last"]["images_per_s"],
            "compile_s": r["compile_s"],
            "load_average": {"start": r["load_average"]["start"], "end": r["load_average"]["end"]},
            "load_wait_s": r["load_wait_s"],
            "foreign_cores": r.get("foreign_cores"),
            "jax_step_times_s": r["jax_fp32"]["step_times_s"],
            "torch_step_times_s": r["torch_channels_last"]["step_times_s"],
        }
        for r in good
    ]
    row["load_average"] = {
        "start": good[0]["load_average"]["start"],
        "end": good[-1]["load_average"]["end"],
    }
    row["wall_s"] = sum(r["wall_s"] for r in reps)
    if len(good) < len(reps):
        row["failed_repeats"] = [r["error"][-300:] for r in reps if "error" in r]
    return row


def _summary(model_name, variant, row):
    if "error" in row:
        return f"{model_name} {variant}: failed: {row['error'][-300:]}"
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in row.get("repeats", []))
    return (
        f"{model_name:14s} {variant:14s} jax {row['jax_fp32']['images_per_s']:6.1f} img/s "
        f"(first call {row['compile_s']:5.1f} s) torch channels_last "
        f"{row['torch_channels_last']['images_per_s']:6.1f} ratio "
        f"{row[RATIO]:.2f} ({ratios}) loss "
        f"{row['first_loss']:.5f}->{row['last_loss']:.5f} load "
        f"{row['load_average']['start'][0]:.1f}-{row['load_average']['end'][0]:.1f}"
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
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "xla_flags_base": os.environ.get("XLA_FLAGS", ""),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 1 warm-up, 2 timed steps")
    parser.add_argument("--batch", type=int, default=None, help="default: each model's own")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per (model, variant)")
    parser.add_argument("--max-load", type=float, default=2.5, help="wait for a lower 1-min load")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="discard a repeat during which other processes kept more cores than this busy",
    )
    parser.add_argument("--retries", type=int, default=3, help="discarded repeats to replace")
    parser.add_argument(
        "--torch-isa",
        default="",
        help="cap PyTorch's CPU kernels at this ISA, e.g. AVX2 (oneDNN otherwise JITs AVX-512 "
        "kernels where the CPU has them, which XLA's precompiled Eigen kernels do not use)",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--tag", default="variants", help="label of this run")
    parser.add_argument(
        "--row-label", default="", help="appended to each row's variant name, e.g. ' (before)'"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    parser.add_argument(
        "--merge", action="store_true", help="add to the results already in --out (same machine)"
    )
    parser.add_argument(
        "--conv-kernels",
        action="store_true",
        help="time each model's convolutions alone (eigen_conv flags) instead of train steps",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="also a bf16 JAX step, on CPUs with AVX512-BF16/AMX"
    )
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--with-nchw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.steps, args.repeats = 16, 1, 2, 1
    if args.worker:
        if args.conv_kernels:
            row = conv_kernel_times(args.worker, args.warmup, args.steps)
        else:
            row = worker(
                args.worker, args.batch, args.warmup, args.steps, args.with_nchw, args.bf16
            )
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
    record = {"runs": [], "results": {}}
    if args.merge and out.exists():
        record = json.loads(out.read_text())
        old_machine, old_bf16 = record.pop("machine", None), record.pop("bf16", None)
        for old in record["runs"]:  # the machine is per run: these VMs move between hosts
            old.setdefault("machine", old_machine)
            old.setdefault("bf16", old_bf16)
    record["runs"].append(run)
    run["machine"], run["bf16"] = machine_info(), _bf16_note(args.bf16)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.conv_kernels:
        for model_name in [m for m in models if m in CONV_SHAPES]:
            row = run_variant(args, model_name, VARIANTS["eigen_conv"], False, ["--conv-kernels"])
            record.setdefault("conv_kernels", {})[model_name + args.row_label] = {
                "run": len(record["runs"]) - 1,
                **row,
            }
            print(model_name, json.dumps(row.get("total_ms", row)), flush=True)
            run["load_average_at_end"] = os.getloadavg()
            out.write_text(json.dumps(record, indent=2))
        return
    for model_name in models:
        rows = record["results"].setdefault(model_name, {})
        for i, variant in enumerate(variants):
            reps, discarded = [], []
            while len(reps) < args.repeats and len(discarded) <= args.retries:
                rep = run_variant(args, model_name, VARIANTS[variant], i == 0 and not reps)
                if (rep.get("foreign_cores") or 0.0) > args.max_foreign:
                    discarded.append(rep)  # another job ran during the timed steps
                else:
                    reps.append(rep)
            row = combine_repeats(reps or discarded)
            row["discarded_repeats"] = [
                {"foreign_cores": r.get("foreign_cores"), "ratio": r.get(RATIO)} for r in discarded
            ]
            rows[variant + args.row_label] = {
                "run": len(record["runs"]) - 1,
                **row,
                "tried": TRIED.get(model_name),
            }
            print(_summary(model_name, variant, row), flush=True)
            # Written after every variant, so an interrupted run keeps what it measured.
            run["load_average_at_end"] = os.getloadavg()
            run["wall_s"] = time.perf_counter() - t0
            out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
