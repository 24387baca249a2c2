#!/usr/bin/env bash
# The main job: set up .venv from pyproject.toml, then run the quickstart
# experiment. Arguments go to the script (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ensure_venv .venv ""
exec .venv/bin/python experiments/quickstart.py "$@"
