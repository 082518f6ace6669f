"""Arguments at their edges: tolerances, the precision of the data, huge observations,
the first call's time budget, and the messages of the public helpers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import preimage
from preimage import GaussianMatrix, Network, certify_unique, invert, random_network
from preimage.methods.sensing import pgd_invert
from preimage.model.validation import MAX_MAGNITUDE
from preimage.solvers.layer import invert_layer


@pytest.fixture(scope="module")
def codes() -> tuple[Network, np.ndarray, np.ndarray]:
    net = random_network([10, 40, 200], seed=0)
    z = np.random.default_rng(1).standard_normal((4, 10))
    return net, z, net.forward(z)


@pytest.mark.parametrize("rtol", [1e-16, 1e-30, 0.5, 1.0, 5.0])
def test_a_tolerance_beyond_the_data_or_near_one_is_refused(
    codes: tuple[Network, np.ndarray, np.ndarray], rtol: float
) -> None:
    # rtol = 1e-16 had x = G(z) "infeasible"; rtol >= 1 had z = 0 "unique" for every x.
    net, _, x = codes
    with pytest.raises(ValueError, match="`rtol` must lie between"):
        invert(net, x, rtol=rtol)
    with pytest.raises(ValueError, match="`rtol` must lie between"):
        invert_layer(net.layers[0], x[0, :40], rtol=rtol)


def test_the_tolerance_floor_is_that_of_the_data(
    codes: tuple[Network, np.ndarray, np.ndarray],
) -> None:
    net, z, x = codes
    assert invert(net, x, rtol=1e-15).counts() == {"unique": 4}
    # float32 weights, G(z) computed in float64: float64's digits (the authors' decoder).
    net32 = Network.from_weights([np.float32(layer.weight.matrix()) for layer in net.layers])
    assert invert(net32, net32.forward(z), rtol=1e-9).counts() == {"unique": 4}
    with pytest.raises(ValueError, match="float32's machine epsilon"):
        invert(net, x.astype(np.float32), rtol=1e-9)
    result = invert(net, x.astype(np.float32), rtol=2e-7)
    assert np.all(result.success)


def test_network_from_float32_weights_keeps_their_precision(
    codes: tuple[Network, np.ndarray, np.ndarray],
) -> None:
    # The float32 weights' outputs handed over as float64: at float64's 1e-9 they were
    # all "infeasible", as from_torch's network of the same weights never is.
    net, z, _ = codes
    weights = [np.asarray(layer.weight.matrix(), np.float32) for layer in net.layers]
    net32 = Network.from_weights(weights)
    assert net32.source_dtype == "float32"
    module = net32.to_torch(dtype=torch.float32)
    with torch.no_grad():
        x = module(torch.from_numpy(z.astype(np.float32))).double().numpy()
    result = invert(net32, x)
    assert result.rtol == pytest.approx(1e-5)
    assert result.counts() == {"unique": 4}
    assert np.abs(result.z - z).max() < 1e-3


def test_an_answer_larger_than_any_accepted_x_is_still_measured(
    codes: tuple[Network, np.ndarray, np.ndarray],
) -> None:
    # x just inside MAX_MAGNITUDE has a code beyond it: the check of the answer raised
    # about a `z` the caller never passed, and the whole batch was lost.
    net, z, x = codes
    scale = 0.9 * MAX_MAGNITUDE / np.abs(x).max()
    result = invert(net, x * scale)
    assert np.abs(result.z).max() > MAX_MAGNITUDE
    assert result.counts() == {"unique": 4}
    np.testing.assert_allclose(result.z, z * scale, rtol=1e-9)


def test_compressed_float16_measurements_are_checked_at_their_precision() -> None:
    net = random_network([10, 40, 200], seed=0)
    z = np.random.default_rng(1).standard_normal((3, 10))
    A = GaussianMatrix(120, 200, seed=0)
    y = A.apply(net.forward(z)).astype(np.float16)
    result = invert(net, y, A=A)
    assert result.rtol == pytest.approx(1e-3)
    assert np.all(result.success), result.residual
    assert np.all(result.residual <= 1e-3)
    assert pgd_invert(net, y.astype(np.float64), A).rtol == pytest.approx(1e-6)


def test_the_first_call_of_a_process_keeps_its_time_budget_for_the_work() -> None:
    # torch's first import (about 1 s) used to be charged to `time_limit`: every sample of
    # the first call "out of time", the same call an instant later all unique.
    script = textwrap.dedent("""
        import numpy as np, preimage
        net = preimage.random_network([10, 40, 200], seed=0)
        x = net.forward(np.random.default_rng(1).standard_normal((6, 10)))
        print(preimage.invert(net, x, time_limit=0.5).counts())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "{'unique': 6}", out.stdout + out.stderr


def test_a_measurement_of_the_wrong_width_names_what_it_must_match(
    codes: tuple[Network, np.ndarray, np.ndarray],
) -> None:
    net, _, x = codes
    with pytest.raises(ValueError, match=r"has 200 entries .* measurement A's output"):
        invert(net, x, A=GaussianMatrix(100, 200))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"widths": [5, 10], "seed": -1}, "`seed` must be an integer >= 0"),
    ({"widths": [5.7, 10]}, r"`widths\[0\]` must be an integer >= 1"),
    ({"widths": [5]}, "at least two positive widths"),
    ({"widths": 5}, "at least two positive widths"),
])
def test_random_network_arguments_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        random_network(**kwargs)
    assert random_network(np.array([5, 10]), seed=np.int64(3)).widths == [5, 10]


def test_to_torch_takes_a_dtype_or_its_name() -> None:
    net = random_network([5, 10], seed=0)
    assert net.to_torch(dtype="float32")[0].weight.dtype == torch.float32
    for bad in ("int32", "cuda", 3):
        with pytest.raises(TypeError, match="`dtype` must be a torch floating dtype"):
            net.to_torch(dtype=bad)


def test_certify_unique_checks_its_arrays() -> None:
    layer = random_network([5, 20], seed=0).layers[0]
    h = np.random.default_rng(0).standard_normal(5)
    y = layer.forward(h[None])[0]
    empty = np.zeros((5, 0))
    common = {"nonneg": False, "tol": 1e-9, "check_tol": 1e-9}
    assert certify_unique(layer, y, h, y > 0, empty, **common).verdict == "unique"
    for args, name in [((y[:3], h, y > 0, empty), "`y`"), ((y, h[:2], y > 0, empty), "`h`"),
                       ((y, h, np.ones(7, bool), empty), "`active`"),
                       ((y, h, y > 0, np.ones(5)), "`null_basis`"),
                       ((y, h, y > 0, np.ones((4, 1))), "`null_basis`")]:
        with pytest.raises(ValueError, match=name):
            certify_unique(layer, *args, **common)
    assert preimage.certify_unique is certify_unique


def test_nan_and_inf_are_each_named_with_their_samples() -> None:
    # an inf was reported as NaN, in the NaN's samples, when another sample held NaN
    net, x = random_network([5, 20], seed=0), np.ones((6, 20))
    x[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"contains inf \(in sample\(s\) \[4\]\)\.$"):
        invert(net, x)
    x[1] = np.nan
    with pytest.raises(ValueError, match=r"NaN \(in sample\(s\) \[1\]\) and inf "
                                         r"\(in sample\(s\) \[4\]\)"):
        invert(net, x)


def test_a_measurement_that_sees_nothing_leaks_no_overflow() -> None:
    # scipy's nnls on a matrix of no rows returned uninitialised memory (3e233 here),
    # which the l_2 fit's line search then squared
    import warnings

    net = random_network([5, 20, 50], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = invert(net, np.zeros(10), A=np.zeros((10, 50)))
    assert result.status == "feasible" and np.all(np.isfinite(result.z))


def test_integers_beyond_float_precision_are_counts() -> None:
    from preimage.model.validation import check_count

    assert check_count(2**60 + 1, "n") == 2**60 + 1
    assert check_count(np.int64(2**62 + 1), "n") == 2**62 + 1
    with pytest.raises(ValueError, match="`n` must be an integer >= 0"):
        check_count(2.5, "n")


def test_gradient_descent_takes_a_dtype_or_its_name() -> None:
    from preimage.methods.gradient import gradient_invert

    net = random_network([5, 20, 50], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((1, 5)))
    result = gradient_invert(net, x, dtype="float32", restarts=1, steps=5)
    assert result.z.shape == (1, 5)
    with pytest.raises(TypeError, match="`dtype` must be a torch floating dtype"):
        gradient_invert(net, x, dtype="int8", restarts=1, steps=5)
