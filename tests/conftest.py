from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from hypothesis import settings

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
