from __future__ import annotations

import os
from collections.abc import Iterator

# OpenBLAS threads spin-wait: on a shared, loaded machine a 500 x 100 SVD then takes
# seconds instead of milliseconds. The tests' matrices are small, one thread is fastest.
# (Set before numpy is imported; an explicit setting in the environment wins.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

matplotlib.use("Agg")

# Derandomized in CI so a run is reproducible; random locally to keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

#: The paper authors' trained decoders, when the shared folder is beside the checkout.
AUTHORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "invertgan_lp"


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread() -> Iterator[None]:
    """Small LAPACK calls on a loaded machine: multi-threaded OpenBLAS was measured up
    to 100x slower than one thread, which made test times erratic."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield None


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def authors_state_dict(name: str) -> dict:
    import torch

    path = AUTHORS_DIR / name
    if not path.exists():
        pytest.skip(f"the authors' decoder {path} is not available")
    return torch.load(path, map_location="cpu", weights_only=True)
