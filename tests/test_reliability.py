"""A batch never loses a result, time budgets, and untrusted model files (issue 15)."""

from __future__ import annotations

import builtins
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from preimage import GlobalSettings, Network, invert, random_network
from preimage.apps.cli import main
from preimage.methods import descent, hybrid, layerwise, noisy, partial, sensing
from preimage.methods.batched import descend
from preimage.results import OUT_OF_TIME, Deadline, SampleFailure, per_sample
from preimage.solvers import layer as layer_solver


@pytest.fixture(scope="module")
def case() -> tuple[Network, np.ndarray]:
    net = random_network([6, 30, 90], seed=3)
    return net, net.forward(np.random.default_rng(3).standard_normal((5, 6)))


# --- one sample's failure ---------------------------------------------------------------

def _raising_for(target: np.ndarray, real: Any, error: type[Exception] = RuntimeError) -> Any:
    """`real`, raising `error` when its second argument is the observation `target`."""

    def flaky(first: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        if np.shape(y) == target.shape and np.array_equal(y, target):
            raise error("forced failure of one sample")
        return real(first, y, *args, **kwargs)

    return flaky


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("fast_path_breaks", [False, True])
def test_one_sample_whose_solver_raises_costs_no_other_its_result(
    case: tuple[Network, np.ndarray], monkeypatch: pytest.MonkeyPatch, batched: bool,
    fast_path_breaks: bool,
) -> None:
    """The sample ends "failed" with the error in its message; the others' answers are
    those of a run without the failure (on the batched path also when the batched
    step itself raises for the whole chunk: each sample then goes alone)."""
    net, x = case
    reference = invert(net, x, batched=batched)
    flaky = _raising_for(x[2], layer_solver.invert_layer)
    monkeypatch.setattr(layerwise, "invert_layer", flaky)
    monkeypatch.setattr(descend, "invert_layer", flaky)
    if fast_path_breaks:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise FloatingPointError("the batched step broke")

        monkeypatch.setattr(descend, "fast_layer", broken)
    elif batched:  # the sample must reach invert_layer: the batched step leaves it
        real_fast = descend.fast_layer

        def leaves_it(layer: Any, y: np.ndarray, **kw: Any) -> Any:
            fast = real_fast(layer, y, **kw)
            if y.shape[1] == x.shape[1]:
                fast.ok[np.all(y == x[2], axis=1)] = False
            return fast

        monkeypatch.setattr(descend, "fast_layer", leaves_it)
    result = invert(net, x, batched=batched)
    assert result.status[2] == "failed"
    assert "RuntimeError" in result.message[2] and "forced failure" in result.message[2]
    assert np.all(np.isnan(result.z[2]))
    others = [0, 1, 3, 4]
    assert list(result.status[others]) == list(reference.status[others])
    np.testing.assert_allclose(result.z[others], reference.z[others], rtol=1e-9, atol=1e-12)
    assert set(reference.status) - {"failed"}  # (the others had answers to lose)


@pytest.mark.parametrize(("route", "module", "name", "kwargs"), [
    ("noisy", noisy, "invert_noisy_one", {"method": "layerwise", "noise": "linf"}),
    ("pgd", sensing, "_pgd_one", {"A": "gauss", "options": {"iterations": 5}}),
    ("descent", descent, "cell_walk",
     {"noise": "l2", "options": {"adam_steps": 10, "restarts": 1, "layerwise_start": False,
                                 "max_lps": 20}}),
    ("hybrid", hybrid, "cell_walk", {"method": "hybrid", "options": {"steps": 10, "max_lps": 10},
                                     "x": "noisy"}),
    ("partial", partial, "search_preimage",
     {"observe": "third", "fallback": GlobalSettings(enabled=False),
      "options": {"restarts": 1, "steps": 20}}),
])
def test_every_route_isolates_a_sample_that_raises(
    case: tuple[Network, np.ndarray], monkeypatch: pytest.MonkeyPatch, route: str,
    module: Any, name: str, kwargs: dict[str, Any],
) -> None:
    net, x = case
    x, kwargs = _prepared(x, kwargs)
    if kwargs.get("observe") == "third":
        kwargs["observe"] = np.arange(90) % 3 == 0
    reference = invert(net, x, **kwargs)
    real = getattr(module, name)
    calls: list[int] = []

    def flaky(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second sample this solver is handed
            raise ZeroDivisionError("forced failure of one sample")
        return real(*args, **kw)

    monkeypatch.setattr(module, name, flaky)
    result = invert(net, x, **kwargs)
    broke = [i for i, m in enumerate(result.message) if "ZeroDivisionError" in m]
    assert len(broke) == 1, result.message
    assert "forced failure" in result.message[broke[0]]
    keep = [i for i in range(len(x)) if i not in broke]
    assert list(result.status[keep]) == list(reference.status[keep])
    np.testing.assert_allclose(result.z[keep], reference.z[keep], rtol=1e-7, atol=1e-10)


def test_per_sample_isolates_errors_and_stops_at_the_deadline() -> None:
    def work(b: int) -> int:
        if b == 1:
            raise KeyError("one bad sample")
        return b * 10

    out = per_sample(work, 3)
    assert out[0] == 0 and out[2] == 20
    assert isinstance(out[1], SampleFailure) and "KeyError" in out[1].message
    late = per_sample(work, [0, 2], deadline=Deadline.of(0.0))
    assert all(isinstance(o, SampleFailure) and OUT_OF_TIME in o.message for o in late)


# --- time budgets -----------------------------------------------------------------------

def _slowed(real: Any, seconds: float) -> Any:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    return slow


@pytest.mark.parametrize("batched", [True, False])
def test_time_limit_keeps_every_finished_sample(
    case: tuple[Network, np.ndarray], monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """Out of time: the samples finished keep their results, the rest say so ("failed")."""
    net, x0 = case
    x = np.repeat(x0, 4, axis=0)  # 20 samples
    reference = invert(net, x, batched=batched)
    if batched:  # chunks of 2, each taking 0.1 s
        monkeypatch.setattr(descend, "fast_layer", _slowed(descend.fast_layer, 0.05))
    else:
        monkeypatch.setattr(layerwise, "_invert_one", _slowed(layerwise._invert_one, 0.1))
    result = invert(net, x, batched=batched, batch_size=2, time_limit=0.5)
    late = np.array([OUT_OF_TIME in m for m in result.message])
    assert late.any() and (~late).any(), result.message
    assert set(result.status[late]) == {"failed"}
    assert all("time_limit of 0.5 s" in m for m in result.message[late])
    assert list(result.status[~late]) == list(reference.status[~late])
    np.testing.assert_allclose(result.z[~late], reference.z[~late], rtol=1e-9, atol=1e-12)
    assert late[np.argmax(late):].all()  # in order: nothing after the first one late


def test_a_zero_time_limit_answers_at_once(case: tuple[Network, np.ndarray]) -> None:
    net, x = case
    for kwargs in ({}, {"batched": False}, {"noise": "linf", "method": "layerwise"}):
        result = invert(net, x, time_limit=0.0, **kwargs)
        assert set(result.status) == {"failed"}
        assert all(OUT_OF_TIME in m for m in result.message)


def test_gradient_methods_stop_at_the_limit_and_keep_their_point(
    case: tuple[Network, np.ndarray]
) -> None:
    """Adam for 10^7 steps would take hours; with time_limit=1 it returns its iterate."""
    net, x = case
    start = time.perf_counter()
    result = invert(net, x, method="adam", time_limit=1.0,
                    options={"steps": 10**7, "restarts": 2})
    assert time.perf_counter() - start < 30  # (loose: a loaded machine)
    assert np.all(np.isfinite(result.z))
    assert all(OUT_OF_TIME in m for m in result.message)
    assert 0 < result.steps[0] < 2 * 10**7


@pytest.mark.parametrize(("kwargs", "note"), [
    ({"noise": "l2", "options": {"adam_steps": 10, "restarts": 1, "seconds": 0.0}},
     "its 0 s per sample ran out"),
    ({"method": "hybrid", "options": {"steps": 10, "seconds": 0.0}, "x": "noisy"},
     "its 0 s per sample ran out"),
    ({"A": "gauss", "options": {"seconds": 0.0}}, "its 0 s per sample ran out"),
])
def test_per_sample_search_limits_say_so_and_keep_the_estimate(
    case: tuple[Network, np.ndarray], kwargs: dict[str, Any], note: str
) -> None:
    net, x = case
    x, kwargs = _prepared(x, kwargs)
    result = invert(net, x, **kwargs)
    assert all(note in m for m in result.message), result.message
    if "A" not in kwargs:  # the estimate before the search is kept
        assert np.all(np.isfinite(result.z))


def test_the_search_stops_at_the_call_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search cut by time_limit keeps the layer-wise result and says so."""
    net = random_network([20, 60, 90], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((12, 20)))
    alone = invert(net, x, fallback=GlobalSettings(enabled=False))
    failed = np.flatnonzero(np.asarray(alone.status) == "failed")[:2]
    assert failed.size
    result = invert(net, x[failed], time_limit=0.05, fallback=GlobalSettings(seconds=30))
    assert set(result.status) == {"failed"}
    assert all(OUT_OF_TIME in m for m in result.message)


def test_the_cli_takes_a_time_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["invert", "mnist-relu", "--codes", "3", "--time-limit", "0"]) == 0
    assert "failed  3" in capsys.readouterr().out
    assert main(["invert", "mnist-relu", "--codes", "3", "--time-limit", "-1"]) == 2
    assert "`time_limit` must be a finite number >= 0" in capsys.readouterr().err


def test_time_limit_is_checked() -> None:
    net = random_network([2, 6], seed=0)
    x = net.forward(np.ones(2))
    for bad in (-1.0, np.nan, "1"):
        with pytest.raises((ValueError, TypeError), match="`time_limit`"):
            invert(net, x, time_limit=bad)


# --- untrusted files ----------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls exec: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "pth"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path, how: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran.txt"
    payload = {"fc.weight": torch.ones(3, 2), "extra": _RunsCode(marker)}
    path = tmp_path / ("evil.pth" if how == "pth" else "evil.pt")
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match="was refused: unpickling it would"):
        Network.from_file(path)
    assert main(["invert", str(path), "--codes", "2"]) == 2
    assert "was refused" in capsys.readouterr().err
    assert not marker.exists()  # nothing ran ...
    pickle.loads(pickle.dumps(payload))  # ... and the payload is real: unpickled, it runs
    assert marker.read_text() == "the payload ran"


def test_a_plain_state_dict_pickle_still_loads(tmp_path: Path) -> None:
    net = random_network([3, 8, 12], seed=0)
    state = {f"fc{i}.weight": torch.tensor(np.asarray(layer.weight.matrix()))
             for i, layer in enumerate(net.layers)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ok.pt")
    loaded = Network.from_file(tmp_path / "ok.pt")
    z = np.ones((2, 3))
    np.testing.assert_allclose(loaded.forward(z), net.forward(z))


def _decoder_state() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {"fc1.weight": torch.tensor(rng.standard_normal((6, 3))),
            "fc1.bias": torch.tensor(rng.standard_normal(6)),
            "fc2.weight": torch.tensor(rng.standard_normal((9, 6)))}


@pytest.mark.parametrize(("harm", "message"), [
    ("nan", r"g.safetensors: `fc2.weight` contains NaN"),
    ("wrong_shape", r"do not form one chain \(fc1 gives 6 outputs, fc2 takes 5 inputs\)"),
    ("bias_shape", r"g.safetensors: `fc1.bias`"),
    ("missing", r"g.safetensors has no 'fc2.weight'; its layers are \['fc1'\]"),
    ("huge", r"`fc1.weight` has entries of magnitude up to 1e\+200"),
    ("truncated", r"g.safetensors is not a safetensors file"),
])
def test_a_broken_safetensors_file_gets_a_clear_error(tmp_path: Path, harm: str,
                                                      message: str) -> None:
    state = _decoder_state()
    layers = None
    if harm == "nan":
        state["fc2.weight"][0, 0] = float("nan")
    elif harm == "wrong_shape":
        state["fc2.weight"] = torch.ones(9, 5, dtype=torch.float64)
    elif harm == "bias_shape":
        state["fc1.bias"] = torch.ones(4, dtype=torch.float64)
    elif harm == "missing":
        del state["fc2.weight"]
        layers = ["fc1", "fc2"]
    elif harm == "huge":
        state["fc1.weight"][1, 1] = 1e200
    path = tmp_path / "g.safetensors"
    save_file(state, str(path))
    if harm == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=message):
        Network.from_file(path, layers)


@pytest.mark.parametrize(("harm", "message"), [
    ("nan", r"g.onnx: node Gemm \(Gemm\): the tensor 'w2' contains NaN or inf"),
    ("shape", r"g.onnx"),
    ("missing", r"g.onnx: node Gemm \(Gemm\) does not take exactly the previous node's output"),
    ("truncated", r"g.onnx is not an ONNX model"),
])
def test_a_broken_onnx_file_gets_a_clear_error(tmp_path: Path, harm: str, message: str) -> None:
    from tests.test_fuzz import _onnx_model

    path = tmp_path / "g.onnx"
    path.write_bytes(_onnx_model(harm))
    with pytest.raises((ValueError, TypeError), match=message):
        Network.from_onnx(path)


def test_onnx_weights_in_external_files_are_not_read(tmp_path: Path) -> None:
    import onnx

    from tests.test_fuzz import _onnx_model

    model = onnx.load_from_string(_onnx_model("none"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    with pytest.raises(ValueError, match="stored in external data files"):
        Network.from_onnx(tmp_path / "ext.onnx")


def _prepared(x: np.ndarray, kwargs: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """x and a copy of kwargs with the parametrisation's shorthands made real:
    ``x="noisy"`` (x off the range by 1e-3), ``A="gauss"`` (a 60 x 90 Gaussian A, x -> A x)."""
    kwargs = dict(kwargs)
    if kwargs.pop("x", None) == "noisy":
        x = x + 1e-3
    if kwargs.get("A") == "gauss":
        from preimage import GaussianMatrix

        kwargs["A"] = GaussianMatrix(60, 90, seed=0)
        x = kwargs["A"].apply(x)
    return x, kwargs


@pytest.mark.parametrize("seed", range(12))
def test_a_layer_with_unreached_inputs_keeps_its_answer_near_the_data(seed: int) -> None:
    # Columns of W that are zero (inputs a convolution's padding hides) and float32
    # outputs: the rows of the null basis for the other coordinates are rounding
    # (1e-17) while h0 misses h >= 0 by rounding; divided by their largest entry they
    # asked for h = 1e9 - 1e10 in a zero column (18 of 40 seeds), which the layer
    # below could only reach with |z| = 1e10 (and then G(z) missed x by 1e-3)
    rng = np.random.default_rng(seed)
    w = np.zeros((4, 8))
    w[:, [2, 3, 6, 7]] = rng.standard_normal((4, 4)) * 0.1
    net = Network.from_weights([w], [np.full(4, -0.25)], activation=["sigmoid"])
    h = np.zeros(8)
    h[[2, 7]] = rng.uniform(0.2, 0.4, 2)
    y = net.layers[0].forward(h[None])[0].astype(np.float32).astype(np.float64)
    found = layer_solver.invert_layer(net.layers[0], y, nonneg=True, rtol=1e-5)
    assert found.status in ("non_unique", "unique", "feasible")
    assert np.max(np.abs(found.h)) < 10 * np.max(h)
    assert np.allclose(net.layers[0].forward(found.h[None])[0], y, rtol=0, atol=1e-5)


def test_a_latent_layer_pinned_by_a_barely_active_unit_is_not_called_unique() -> None:
    # a float32 generator's x = G(z0) whose preimages form a segment through z0 was
    # "unique": float32 rounding carried up from the layers above lifted an inactive
    # latent unit above the threshold, and with it the latent layer looked injective
    rng = np.random.default_rng(0)
    k = 8
    w0 = rng.standard_normal((24, k))
    z0 = rng.standard_normal(k)
    pre = w0 @ z0
    order = np.argsort(-pre)
    b0 = np.zeros(24)
    b0[order[7:]] = -pre[order[7:]] - 1.0  # 7 units on, the others off by a margin
    b0[order[7]] = -pre[order[7]] + 3e-5 * np.max(pre)  # and one barely on: 3 float32 rtol
    w1 = rng.standard_normal((40, 24)) / 5
    for dtype, expected in ((np.float32, "feasible"), (np.float64, "unique")):
        net = Network.from_weights([w0.astype(dtype), w1.astype(dtype)],
                                   [b0.astype(dtype), np.zeros(40, dtype)],
                                   activation=["relu", "sigmoid"])
        x = net.forward(z0[None])[0].astype(dtype)
        result = invert(net, x)
        assert result.status == expected, result.message
        assert np.allclose(net.forward(result.z[None])[0], x, rtol=0, atol=1e-5)


def test_a_fold_nets_latent_layer_keeps_its_answer_near_the_data() -> None:
    # W_0 = [V; -V] (a fold): the inactive rows v are minus the active rows, so their rows
    # along null(W_A) are rounding; divided by their largest entry they put z at 1e15,
    # where G(z) missed x by 0.59 (relative): `failed`, though |z| < 10 holds preimages
    v = np.array([[-0.3064947800456559, -1.2027170522353865, 0.65959148703698],
                  [-1.0144993479682267, -0.01845994675811599, -0.19602831316491337]])
    c = np.array([0.44793540201905513, 0.3890145209165975])
    a = np.array([[-0.9419512896310858, 0.20533773625691368],
                  [2.2664801353714195, 0.8623935273325731],
                  [-1.152951845844343, -0.7351940590759148],
                  [0.0658512162706448, -1.3955647652897212]])
    b2 = np.array([-0.1589983547958304, 0.2539078444395553, 0.2501515089554591,
                   0.3791966778424565])
    net = Network.from_weights([np.vstack([v, -v]), np.hstack([a, a])],
                               [np.concatenate([c, c]), b2])
    x = np.array([0.0, 4.781456589250295, 0.0, 0.0])
    for method in ("exact", "global"):
        result = invert(net, x, method=method)
        assert result.status == "non_unique", result.message
        assert np.max(np.abs(result.z)) < 10
        assert np.allclose(net.forward(result.witness[None])[0], x, rtol=0, atol=1e-8)
