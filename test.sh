#!/usr/bin/env bash
# The test command: set up .venv-test from pyproject.toml (extras: test), check
# style with ruff, then run the whole suite on every core (pytest-xdist: about
# half the wall time on 2 cores; work stealing, so the long experiment smoke tests do
# not end the run on one worker). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ensure_venv .venv-test "[test]"
.venv-test/bin/ruff check .
.venv-test/bin/ruff format --check .
exec .venv-test/bin/python -m pytest -n auto --dist worksteal "$@"
