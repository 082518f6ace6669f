"""Property-based fuzzing of every public entry point (issue 15).

`invert` with each method and option, `invert_layer`, `invert_layer_noisy`,
`Network.forward` / `from_weights`, `Network.from_torch` / `from_file` /
`from_onnx` and the command line (`preimage.apps.cli.main`), each with
generated arguments: dtypes (bool, int, complex, object, float16, bfloat16
tensors, float32, float64), shapes (0-d, 3-d, wrong widths, empty batch), NaN
and inf, magnitudes 1e-30 .. 1e30 (and beyond), non-contiguous and read-only
arrays, wrong types. Each call answers correctly or refuses with a
ValueError / TypeError of preimage's own naming the argument
(`tests.fuzzing.attempt`), and never changes what it was given.

"Correctly": G of the bias-free ReLU nets below is positively homogeneous, so
x = G(z) * 10^e is realizable at every scale: the exact method must never call
it "infeasible", and where it says "unique" its z must be z_true.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from preimage import (
    METHODS,
    GlobalSettings,
    Layer,
    Network,
    invert,
    invert_layer,
    invert_layer_noisy,
    random_network,
)
from preimage.apps.cli import main
from preimage.model.activations import Activation
from preimage.model.operators import DenseOperator
from preimage.results import STATUSES, SUCCESS
from tests.fuzzing import (
    Generated,
    assert_unchanged,
    attempt,
    fuzz,
    observations,
    snapshot,
)

#: Bias-free ReLU (positively homogeneous) and a LeakyReLU net with biases.
RELU = random_network([3, 10, 16], seed=1)
LEAKY = random_network([2, 8, 12], activation="leaky_relu", bias=True, seed=2)
#: a short search, so that a "failed" sample does not spend the default 2 s
QUICK = GlobalSettings(seconds=0.2, starts=2)

#: (method, extra keyword arguments) for every route of `invert`, with small budgets.
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "exact": ("exact", {"fallback": QUICK}),
    "exact-unbatched": ("exact", {"fallback": QUICK, "batched": False}),
    "layerwise": ("layerwise", {"fallback": QUICK}),
    "adam": ("adam", {"options": {"steps": 5, "restarts": 1}}),
    "clipping": ("clipping", {"options": {"steps": 5, "restarts": 1, "bound": 3.0}}),
    "negation": ("negation", {"options": {"steps": 5, "restarts": 1}}),
    "hybrid": ("hybrid", {"options": {"steps": 5, "restarts": 1, "max_lps": 5}}),
    "descent": ("exact", {"noise": "l2", "options": {"adam_steps": 5, "restarts": 1,
                                                     "max_lps": 10}}),
    "noisy": ("layerwise", {"noise": "linf", "noise_level": 1e-3}),
    "global": ("global", {"fallback": GlobalSettings(seconds=1.0)}),
    "partial": ("exact", {"observe": "half", "fallback": QUICK,
                          "options": {"restarts": 1, "steps": 5, "max_lps": 5}}),
}
assert {m for m, _ in ROUTES.values()} == set(METHODS)

X_NAMES = ("`x`", "`y`")


def check_result(res: Any, gen: Generated, net: Network, *, exact: bool) -> None:
    """The result's types and shapes, and its verdicts' honesty where x is known."""
    statuses = [res.status] if gen.single else list(res.status)
    assert set(statuses) <= set(STATUSES)
    if gen.single:
        assert isinstance(res.status, str) and np.shape(res.z) == (net.latent_dim,)
    else:
        assert res.z.shape == (len(statuses), net.latent_dim)
        assert np.array_equal(res.success, np.isin(res.status, SUCCESS))
    z = np.atleast_2d(res.z)
    success = np.atleast_1d(res.success)
    assert np.all(np.isfinite(z[success]))
    if not exact:
        return
    residual = np.atleast_1d(res.residual)
    assert np.all(residual[success] <= 1e3 * res.rtol), (residual, res.rtol, gen.kind)
    if gen.realizable:
        assert "infeasible" not in statuses, (gen.kind, res.message)
        unique = np.array(statuses) == "unique"
        ref = np.linalg.norm(gen.z_true, axis=1)
        err = np.linalg.norm(z - gen.z_true, axis=1) / np.maximum(ref, 1e-300)
        limit = 1e-6 if gen.precision == "float64" else 1e-2
        assert np.all(err[unique] <= limit), (err, gen.kind)


@pytest.mark.parametrize("route", sorted(ROUTES))
@fuzz(10)
@given(data=st.data())
def test_invert_fuzzed_x(route: str, data: st.DataObject) -> None:
    method, kwargs = ROUTES[route]
    kwargs = dict(kwargs)
    net = data.draw(st.sampled_from([RELU, LEAKY]), label="net")
    gen = data.draw(observations(net), label="x")
    if kwargs.get("observe") == "half":
        kwargs["observe"] = np.arange(net.output_dim) % 2 == 0
    before = snapshot(gen.value, kwargs.get("observe"))
    res = attempt(invert, net, gen.value, method=method, names=X_NAMES, **kwargs)
    assert_unchanged([gen.value, kwargs.get("observe")], before)
    valid = gen.valid
    if gen.entries_only and route == "partial":  # NaN where nothing is observed is fine
        valid = not gen.bad_entries[:, kwargs["observe"]].any()
    if valid:
        assert res is not None, gen.kind  # a valid x is answered
        exact = route in ("exact", "exact-unbatched", "layerwise") and net is RELU
        check_result(res, gen, net, exact=exact)
    else:
        assert res is None, gen.kind  # anything else refused


# --- the other arguments of invert ----------------------------------------------------

def _weird() -> st.SearchStrategy[Any]:
    """Values of the wrong type or range for any argument."""
    return st.sampled_from([None, -1, 0, 0.5, 1, 2.0, -0.0, np.nan, np.inf, "1", "fast", [1],
                            {}, True, np.float32(1e-4), np.int64(3), 1e300, 1e-300, object()])


@st.composite
def invert_arguments(draw: Any, net: Network) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments of `invert`, each valid or weird; the names of the weird ones."""
    n = net.output_dim
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    kwargs: dict[str, Any] = {}
    names = []
    choices: dict[str, list[Any]] = {
        "method": [*METHODS, "global", "EXACT", 3],
        "rtol": [None, 1e-9, 1e-5, 1e-2],
        "batched": [None, True, False],
        "batch_size": [None, 1, 2, 1000],
        "n_jobs": [None, 1, 2],
        "fallback": [None, QUICK, GlobalSettings(enabled=False)],
        "noise": [None, "linf", "l1", "l2"],
        "noise_level": [None, 0.0, 1e-3],
        "time_limit": [None, 0.0, 0.05, 5.0],
        "options": [None, {}],
        "observe": [None, np.arange(n) % 3 != 0, (np.arange(n) % 3 != 0).tolist()],
        "A": [None, rng.standard_normal((max(1, n - 4), n))],
    }
    for name, good in choices.items():
        pick = draw(st.sampled_from(["good", "good", "good", "weird"]))
        if pick == "good":
            kwargs[name] = draw(st.sampled_from(good))
        else:
            kwargs[name] = draw(st.one_of(_weird(), _weird_array(n)))
            names.append(f"`{name}`")
    return {k: v for k, v in kwargs.items() if v is not None}, names


def _weird_array(n: int) -> st.SearchStrategy[Any]:
    return st.sampled_from([
        np.ones(n, dtype=int), np.ones(n + 1, dtype=bool), np.zeros(n, dtype=bool),
        np.full((n - 1, n), np.nan), np.ones((2, n, 1)), torch.ones(n, dtype=torch.bool),
        np.ones((3, n)) * 1e200, np.eye(n)[:0], np.ones(n, dtype=complex),
    ])


@fuzz(80)
@given(data=st.data())
def test_invert_fuzzed_arguments(data: st.DataObject) -> None:
    net = RELU
    kwargs, weird = data.draw(invert_arguments(net), label="kwargs")
    method = kwargs.get("method", "exact")
    method = method if isinstance(method, str) else ""
    if method in ("adam", "clipping", "negation", "hybrid"):
        kwargs["options"] = {"steps": 3, "restarts": 1} if isinstance(
            kwargs.get("options"), dict) else kwargs.get("options")
    elif kwargs.get("noise") is not None and method == "exact" and isinstance(
            kwargs.get("options"), dict):
        kwargs["options"] = {"adam_steps": 3, "restarts": 1, "max_lps": 5}
    z = np.random.default_rng(0).standard_normal((2, net.latent_dim))
    x = net.forward(z)
    if isinstance(kwargs.get("A"), np.ndarray) and kwargs["A"].ndim == 2 and kwargs["A"].shape[
            1:] == (net.output_dim,) and np.all(np.isfinite(kwargs["A"])):
        x = x @ kwargs["A"].T
    arrays = [v for v in kwargs.values() if isinstance(v, (np.ndarray, torch.Tensor, list))]
    before = snapshot(x, *arrays)
    names = [*weird, *(f"`{k}`" for k in kwargs), "`x`", "`y`", "`net`", "method"]
    res = attempt(invert, net, x, names=names, **kwargs)
    assert_unchanged([x, *arrays], before)
    if res is not None:
        assert set(np.atleast_1d(res.status)) <= set(STATUSES)
        assert res.z.shape == (2, net.latent_dim)


def test_a_failed_status_stays_in_the_vocabulary() -> None:
    """`invert`'s statuses on garbage that is still a valid array: never a new word."""
    res = invert(RELU, np.full((2, RELU.output_dim), 7.0), fallback=QUICK)
    assert set(res.status) <= set(STATUSES)


# --- one layer ------------------------------------------------------------------------

@st.composite
def layers(draw: Any) -> tuple[Layer, np.ndarray, bool]:
    """A layer with weights scaled by 1e-6 .. 1e6, some rows duplicated or near zero, and an
    input h it maps (h >= 0 when `nonneg`)."""
    m = draw(st.integers(1, 9))
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**20)))
    w = rng.standard_normal((m, n)) * 10.0 ** draw(st.integers(-6, 6))
    if m > 1 and draw(st.booleans()):
        w[-1] = w[0]  # a duplicated row
    if draw(st.booleans()):
        w[rng.integers(m)] *= 1e-12  # a near-zero row
    kind = draw(st.sampled_from(["relu", "relu", "leaky_relu", "identity", "tanh", "sigmoid",
                                 "elu", "softplus"]))
    slope = 0.2 if kind == "leaky_relu" else 0.0
    bias = rng.standard_normal(m) * 10.0 ** draw(st.integers(-6, 6)) if draw(
        st.booleans()) else None
    nonneg = draw(st.booleans())
    h = rng.standard_normal(n)
    if nonneg:
        h = np.abs(h)
    if bias is not None and draw(st.booleans()):
        bias[0] = -float(w[0] @ h)  # unit 0 exactly at its threshold
    return Layer(DenseOperator(w), bias, Activation(kind, slope)), h, nonneg


@fuzz(100)
@given(spec=layers(), data=st.data())
def test_invert_layer_fuzzed(spec: tuple[Layer, np.ndarray, bool], data: st.DataObject) -> None:
    layer, h, nonneg = spec
    y_true = layer.forward(h[None])[0]
    shape = data.draw(st.sampled_from(["valid"] * 5 + ["2d", "short", "0d", "list", "nan",
                                                       "text", "none"]))
    y: Any = {"valid": y_true, "2d": y_true[None], "short": y_true[:-1], "0d": np.float64(1.0),
              "list": y_true.tolist(), "nan": np.full_like(y_true, np.nan),
              "text": y_true.astype(str), "none": None}[shape]
    rtol = data.draw(st.sampled_from([1e-9, 1e-9, 1e-6, 0.0, -1.0, "tight"]))
    flag = data.draw(st.sampled_from([nonneg, nonneg, nonneg, 1, "yes"]))
    before = snapshot(y)
    solver = data.draw(st.sampled_from([invert_layer, invert_layer_noisy]))
    res = attempt(solver, layer, y, nonneg=flag, rtol=rtol,
                  names=("`y`", "`rtol`", "`nonneg`", "`layer`"))
    assert_unchanged([y], before)
    valid = shape in ("valid", "list") and rtol in (1e-9, 1e-6) and isinstance(flag, bool)
    assert (res is not None) == valid, (shape, rtol, flag)
    if res is None:
        return
    assert res.status in STATUSES
    if solver is invert_layer and (not nonneg or flag is False or np.all(h >= 0)):
        # y = act(W h + b) for an h of the domain: never "infeasible"; an answer maps to y
        assert res.status != "infeasible", res.message
        if res.status in SUCCESS:  # within the documented tolerance (targets, outputs)
            act = layer.activation
            targets = act.clipped_inverse(y_true) if act.is_bijective else y_true
            size = np.max(np.abs(targets)) + np.max(np.abs(y_true)) + np.max(
                np.abs(layer.bias_or_zero()), initial=0.0) + float(
                np.max(np.abs(layer.weight.matrix()) @ np.abs(res.h)))
            assert res.residual <= 10 * rtol * size * 1.0001 + 1e-300, res.message


# --- building networks ----------------------------------------------------------------

@fuzz(60)
@given(data=st.data())
def test_from_weights_and_forward_fuzzed(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(["float64", "float32", "float16", "bool", "int64",
                                       "complex128", "object", "bfloat16"]))
    shape = data.draw(st.sampled_from(["valid", "valid", "1d", "3d", "empty", "mismatch"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    values = rng.standard_normal((5, 3)) * 10.0 ** data.draw(st.integers(-30, 30))
    if data.draw(st.booleans()):
        values[0, 0] = data.draw(st.sampled_from([np.nan, np.inf, 1e200]))
    from tests.fuzzing import _cast

    w1: Any = _cast(values, dtype, "numpy")
    w1 = {"valid": w1, "1d": w1[0], "3d": w1[None], "empty": w1[:0], "mismatch": w1}[shape]
    w2 = np.ones((4, 5 if shape != "mismatch" else 2))
    before = snapshot(w1)
    net = attempt(Network.from_weights, [w1, w2], names=("`weight`", "takes inputs"))
    assert_unchanged([w1], before)
    if net is None:
        return
    z = data.draw(observations(random_network([3, 5], seed=0)), label="z").value
    before = snapshot(z)
    out = attempt(net.forward, z, names=("`z`",))
    assert_unchanged([z], before)
    if out is not None:
        assert np.all(np.isfinite(out))


def _module(spec: list[str], dtype: torch.dtype, rng: np.random.Generator) -> torch.nn.Module:
    """An nn.Sequential from layer names ("linear:3", "relu", ...)."""
    mods: list[torch.nn.Module] = []
    width = 3
    for item in spec:
        name, _, arg = item.partition(":")
        if name == "linear":
            out = int(arg)
            mods.append(torch.nn.Linear(width, out))
            width = out
        elif name == "badlinear":  # takes the wrong width
            mods.append(torch.nn.Linear(width + 1, 4))
            width = 4
        else:
            mods.append({
                "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
                "elu": torch.nn.ELU, "softplus": torch.nn.Softplus, "gelu": torch.nn.GELU,
                "dropout": torch.nn.Dropout, "identity": torch.nn.Identity,
                "layernorm": lambda w=width: torch.nn.LayerNorm(w),
                "batchnorm": lambda w=width: torch.nn.BatchNorm1d(w),
                "leaky": lambda a=arg: torch.nn.LeakyReLU(float(a or 0.1)),
                "softmax": lambda: torch.nn.Softmax(dim=1),
            }[name]())
    module = torch.nn.Sequential(*mods).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape))))
    return module.to(dtype)


LAYER_NAMES = ["linear:2", "linear:5", "linear:8", "relu", "relu", "tanh", "sigmoid", "elu",
               "softplus", "leaky:0.2", "leaky:-0.5", "leaky:0", "dropout", "identity",
               "batchnorm", "gelu", "layernorm", "softmax", "badlinear"]


@fuzz(40)
@given(spec=st.lists(st.sampled_from(LAYER_NAMES), min_size=0, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       poison=st.sampled_from([None, None, None, "nan", "inf", "huge"]),
       train=st.booleans(), seed=st.integers(0, 1000))
def test_from_torch_fuzzed(spec: list[str], dtype: torch.dtype, poison: str | None,
                           train: bool, seed: int) -> None:
    """A module read into a Network computes what the module computes; every other one
    is refused by name."""
    rng = np.random.default_rng(seed)
    module = _module(spec, dtype, rng)
    if train:
        module.train()
    params = list(module.parameters())
    if poison and params:
        with torch.no_grad():
            params[0].view(-1)[0] = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[poison]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    net = attempt(Network.from_torch, module, names=("'", "`", "Linear", "layer", "module",
                                                      "NaN", "inf", "magnitude", "chain"))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v) & torch.isnan(before[k])).any()
    if net is None:
        return
    assert poison in (None, "huge") or not params
    z = rng.standard_normal((4, net.latent_dim))
    with torch.no_grad():
        ref = module.eval().double()(torch.tensor(z)).reshape(4, -1).numpy()
    assert np.allclose(net.forward(z), ref, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(ref).max()))


def test_from_torch_refuses_what_is_not_a_module() -> None:
    for thing in (None, 3, "net.pt", np.eye(3), torch.eye(3), lambda z: z):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            Network.from_torch(thing)


# --- model files ----------------------------------------------------------------------

@st.composite
def state_dicts(draw: Any) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Weights of a 2-layer decoder, perturbed: dtypes, shapes, NaN, missing entries."""
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    w1, w2 = rng.standard_normal((6, 3)), rng.standard_normal((9, 6))
    state = {"fc1.weight": torch.tensor(w1), "fc1.bias": torch.tensor(rng.standard_normal(6)),
             "fc2.weight": torch.tensor(w2)}
    harm = draw(st.sampled_from(["none", "none", "dtype", "nan", "inf", "huge", "1d", "3d",
                                 "chain", "bias", "missing", "int", "bool", "empty"]))
    key = draw(st.sampled_from(sorted(state)))
    if harm == "dtype":
        state[key] = state[key].to(draw(st.sampled_from(
            [torch.float16, torch.bfloat16, torch.float32])))
    elif harm in ("nan", "inf", "huge"):
        state[key].view(-1)[0] = {"nan": np.nan, "inf": np.inf, "huge": 1e200}[harm]
    elif harm == "1d":
        state[key] = state[key].reshape(-1)
    elif harm == "3d":
        state[key] = state[key].reshape(1, *state[key].shape)
    elif harm == "chain":
        state["fc2.weight"] = torch.ones(9, 5, dtype=torch.float64)
    elif harm == "bias":
        state["fc1.bias"] = torch.ones(4, dtype=torch.float64)
    elif harm == "missing":
        del state[key]
    elif harm in ("int", "bool"):
        state[key] = state[key].to(torch.int64 if harm == "int" else torch.bool)
    elif harm == "empty":
        state[key] = state[key][:0]
    layers = draw(st.sampled_from([None, None, ["fc1", "fc2"], ["fc2"], ["fc3"], []]))
    return state, layers


@fuzz(50)
@given(spec=state_dicts(), form=st.sampled_from(["safetensors", "pt", "pth", "junk",
                                                 "truncated", "empty", "pickle", "dir"]))
def test_from_file_fuzzed(spec: tuple[dict[str, torch.Tensor], list[str] | None],
                          form: str) -> None:
    state, layers = spec
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"g.{'safetensors' if form in ('safetensors', 'truncated') else 'pt'}"
        if form == "safetensors" or form == "truncated":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            if form == "truncated":
                path.write_bytes(path.read_bytes()[:-7])
        elif form in ("pt", "pth"):
            path = path.with_suffix(f".{form}")
            torch.save(state, path)
        elif form == "junk":
            path.write_bytes(np.random.default_rng(0).bytes(300))
        elif form == "empty":
            path.write_bytes(b"")
        elif form == "pickle":  # a plain (legacy) pickle of NumPy arrays: not weights-only
            path.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()
                                           if v.dtype != torch.bfloat16}))
        else:
            path = Path(tmp)
        net = attempt(Network.from_file, path, layers,
                      names=(str(path), "`layers`", "layer", "weight", "bias"))
    if net is not None:
        assert np.all(np.isfinite(net.forward(np.ones((1, net.latent_dim)))))


def _onnx_model(harm: str) -> bytes:
    """A Gemm-Relu-Gemm chain built with onnx.helper, then harmed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3)).astype(np.float32)
    w2 = rng.standard_normal((9, 6)).astype(np.float32)
    if harm == "nan":
        w2[0, 0] = np.nan
    if harm == "shape":
        w2 = w2[:, :4]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    if harm == "missing":
        inits = inits[:1]
    nodes = [helper.make_node("Gemm", ["z", "w1"], ["h"], transB=1),
             helper.make_node("Relu" if harm != "op" else "Gelu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["x"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 9])], inits,
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    raw = data.SerializeToString() if harm != "garbage" else b"\x08\x07garbage" * 30
    return raw[: len(raw) // 2] if harm == "truncated" else raw


@pytest.mark.parametrize("harm", ["none", "nan", "shape", "missing", "op", "garbage",
                                  "truncated"])
def test_from_onnx_fuzzed(harm: str, tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    path.write_bytes(_onnx_model(harm))
    net = attempt(Network.from_onnx, path, names=(str(path),))
    assert (net is not None) == (harm == "none")
    if net is not None:
        x = net.forward(np.ones((2, 3)))
        assert invert(net, x).counts().get("infeasible", 0) == 0


# --- the command line -----------------------------------------------------------------

@fuzz(25)
@given(data=st.data())
def test_cli_fuzzed(data: st.DataObject) -> None:
    """`preimage invert` with generated files and flags: exit 0, or 2 with a message
    (argparse's own usage errors included); never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = data.draw(st.sampled_from(["state", "state", "onnx", "mnist-relu", "missing",
                                           "junk"]), label="model")
        net = random_network([3, 10, 16], seed=0)
        if model == "state":
            path = folder / "g.safetensors"
            save_file({"a.weight": torch.tensor(np.asarray(net.layers[0].weight.matrix())),
                       "b.weight": torch.tensor(np.asarray(net.layers[1].weight.matrix()))},
                      str(path))
            model = str(path)
        elif model == "onnx":
            path = folder / "g.onnx"
            path.write_bytes(_onnx_model("none"))
            model, net = str(path), Network.from_onnx(path)
        elif model == "missing":
            model = str(folder / "nothing.pt")
        elif model == "junk":
            path = folder / "g.pt"
            path.write_bytes(b"not a model")
            model = str(path)
        elif model == "mnist-relu":
            from preimage.model.mnist import shipped_decoder

            net = shipped_decoder("relu")
        argv = ["invert", model]
        source = data.draw(st.sampled_from(["codes", "npy", "npy", "text", "object"]))
        if source == "codes":
            argv += ["--codes", data.draw(st.sampled_from(["2", "0", "-1", "x", "1.5"]))]
        else:
            xfile = folder / "x.npy"
            if source == "npy":
                gen = data.draw(observations(net), label="x")
                value = gen.value
                if isinstance(value, torch.Tensor):
                    value = value.float().numpy() if value.is_floating_point() else value.numpy()
                np.save(xfile, np.asarray(value) if np.asarray(value).dtype != object
                        else np.asarray(value, dtype=float))
            elif source == "text":
                xfile.write_text("1 2 3")
            else:
                np.save(xfile, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            argv.append(str(xfile))
        for flag, values in (("--method", ["exact", "layerwise", "adam", "nope"]),
                             ("--rtol", ["1e-6", "0", "-1", "nan", "x"]),
                             ("--noise", ["linf", "l2", "l3"]),
                             ("--noise-level", ["1e-3", "-1", "nan"]),
                             ("--threads", ["1", "0", "-2"]),
                             ("--time-limit", ["5", "0", "-1", "inf"])):
            if data.draw(st.integers(0, 3)) == 0:
                argv += [flag, data.draw(st.sampled_from(values))]
        if "adam" in argv and model == "mnist-relu":
            argv[argv.index("adam")] = "exact"  # (its 1000 steps x 10 restarts: too slow here)
        if data.draw(st.integers(0, 4)) == 0:
            mask = folder / "m.npy"
            np.save(mask, data.draw(st.sampled_from([
                np.arange(net.output_dim) % 2 == 0, np.ones(3, dtype=bool),
                np.arange(net.output_dim)])))
            argv += ["--mask", str(mask)]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a usage line and exit status 2
            code = exc.code
        assert code in (0, 2), argv


def test_the_cli_says_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 16), dtype=complex))
    net = random_network([3, 16], seed=0)
    path = tmp_path / "g.safetensors"
    save_file({"a.weight": torch.tensor(np.asarray(net.layers[0].weight.matrix()))}, str(path))
    assert main(["invert", str(path), str(x)]) == 2
    err = capsys.readouterr().err
    assert "`x` must be an array of real numbers; got complex numbers" in err
    assert "Traceback" not in err
