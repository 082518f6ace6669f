"""Measurement operators: adjointness, shapes, validation."""

from __future__ import annotations

import numpy as np
import pytest

from preimage.model.operators import (
    GaussianMatrix,
    Mask,
    MatrixMeasurement,
    as_mask,
    as_measurement,
)


def _operators() -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "mask": Mask(rng.random(30) < 0.6),
        "matrix": MatrixMeasurement(rng.standard_normal((7, 30))),
        "gaussian": GaussianMatrix(12, 30, seed=1),
    }


@pytest.mark.parametrize("name", ["mask", "matrix", "gaussian"])
def test_adjointness_and_matrix(name: str, rng: np.random.Generator) -> None:
    op = _operators()[name]
    m, n = op.shape  # type: ignore[attr-defined]
    x = rng.standard_normal((4, n))
    y = rng.standard_normal((4, m))
    # <A x, y> = <x, A^T y>, row by row
    lhs = np.sum(op.apply(x) * y, axis=1)  # type: ignore[attr-defined]
    rhs = np.sum(x * op.adjoint(y), axis=1)  # type: ignore[attr-defined]
    assert np.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    mat = op.matrix()  # type: ignore[attr-defined]
    assert mat.shape == (m, n)
    assert np.allclose(op.apply(x), x @ mat.T)  # type: ignore[attr-defined]
    assert op.apply(x[0]).shape == (m,)  # type: ignore[attr-defined]
    assert op.adjoint(y[0]).shape == (n,)  # type: ignore[attr-defined]


def test_gaussian_matrix_scale_and_seed() -> None:
    a = GaussianMatrix(400, 300, seed=3).matrix()
    assert abs(a.var() * 400 - 1) < 0.05
    assert np.array_equal(a, GaussianMatrix(400, 300, seed=3).matrix())


def test_operators_copy_their_input() -> None:
    mask = np.array([True, False, True])
    op = Mask(mask)
    mask[1] = True
    assert op.shape == (2, 3)
    a = np.ones((2, 3))
    mat = MatrixMeasurement(a)
    a[0, 0] = 5.0
    assert mat.matrix()[0, 0] == 1.0
    with pytest.raises(ValueError):
        mat.matrix()[0, 0] = 2.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Mask(np.array([1, 0, 1])), TypeError, "dtype bool"),
        (lambda: Mask(np.zeros(4, dtype=bool)), ValueError, "no coordinate"),
        (lambda: Mask(np.ones((2, 2), dtype=bool)), ValueError, "1-D"),
        (lambda: MatrixMeasurement(np.ones(3)), ValueError, "2-D"),
        (lambda: MatrixMeasurement(np.full((2, 2), np.nan)), ValueError, "NaN"),
        (lambda: GaussianMatrix(0, 5), ValueError, ">= 1"),
        (lambda: GaussianMatrix(40.5, 5), ValueError, "`m` must be an integer"),
        (lambda: GaussianMatrix("40", 5), TypeError, "`m` must be an integer"),
        (lambda: as_measurement(np.ones((3, 4)), 5), ValueError, "has 4 columns"),
        (lambda: as_mask(np.ones(4, dtype=bool), 5), ValueError, "has length 4"),
        (lambda: Mask(np.ones(3, dtype=bool)).apply(np.ones(4)), ValueError, "shape"),
    ],
)
def test_validation_messages(make: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()  # type: ignore[operator]
