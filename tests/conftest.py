"""Shared test set-up: CPU only, a fixed hypothesis profile, the real-data path."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# jaxlib 0.10 sends CPU convolutions to YNNPACK, which on this project's AMD EPYC runs a
# ResNet train step 2.7-3.8x slower than XLA's own Eigen convolutions
# (benchmarks/results/train_step.json): hand convolutions back to Eigen for the tests.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_OFF}".strip()

# Property tests compile JAX functions: the first example is slow, so no deadline.
# On CI (CI=true) the examples are derandomized, so a red run replays the same way.
settings.register_profile(
    "jaxlearn",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("jaxlearn")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (../shared/data or $JAXLEARN_DATA); skip when absent."""
    path = Path(os.environ.get("JAXLEARN_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set JAXLEARN_DATA)")
    return path
