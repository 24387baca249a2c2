#!/usr/bin/env bash
# The main job: set up .venv from pyproject.toml, then run the quickstart
# experiment. Arguments go to the script (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ensure_venv .venv ""
# jaxlib 0.10 sends CPU convolutions to YNNPACK, 2.7-3.8x slower than XLA's Eigen
# convolutions for a ResNet train step on our AMD EPYC (benchmarks/README.md); the flag
# only touches the CPU backend.
case "${XLA_FLAGS:-}" in
  *ynn_fusion_type*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_experimental_ynn_fusion_type=-individual_convolution" ;;
esac
exec .venv/bin/python experiments/quickstart.py "$@"
