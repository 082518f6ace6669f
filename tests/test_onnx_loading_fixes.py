"""`Network.from_onnx` on what torch and other exporters write: Resize read by its scales,
the precision of half models, constants with a batch axis of 1, weights computed by
unfolded constant subgraphs, and the check of the network read against onnx's own
reference evaluator."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from preimage import Network, invert
from preimage.model import chain, onnx_io
from preimage.model.activations import Activation


def _export(module: nn.Module, example: torch.Tensor, path: Path, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["z"],
                          output_names=["x"], dynamic_axes={"z": {0: "b"}, "x": {0: "b"}},
                          **options)


def _outputs(module: nn.Module, z: np.ndarray) -> np.ndarray:
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        out = module(torch.as_tensor(z, dtype=dtype))
    return out.reshape(len(z), -1).double().numpy()


def _save(nodes: list[Any], inits: dict[str, np.ndarray], path: Path, width: int = 3,
          opset: int = 17) -> Path:
    """A model with input z (B, width) and output x, built node by node."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", width])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _resize_model(path: Path, opset: int = 17, scales: list[float] | None = None,
                  sizes: list[int] | None = None, **attrs: Any) -> Path:
    """Gemm -> Reshape (B, 2, 5, 5) -> Resize -> Flatten."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((50, 3)).astype(np.float32),
             "shape": np.array([-1, 2, 5, 5], np.int64)}
    inputs = ["r", ""]
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
        inputs.append("scales")
    if sizes is not None:
        inits["sizes"] = np.array(sizes, np.int64)
        inputs += ["", "sizes"]
    nodes = [helper.make_node("Gemm", ["z", "w"], ["g"], transB=1),
             helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Resize", inputs, ["u"], name="up", **attrs),
             helper.make_node("Flatten", ["u"], ["x"])]
    return _save(nodes, inits, path, opset=opset)


def _reference(path: Path, z: np.ndarray) -> np.ndarray:
    out = ReferenceEvaluator(str(path)).run(None, {"z": z.astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float64).reshape(len(z), -1)


# --- Resize: its scales, its attributes -------------------------------------------------

_UPSAMPLINGS = {
    "bilinear 1.5": nn.Upsample(scale_factor=1.5, mode="bilinear"),
    "nearest 1.7": nn.Upsample(scale_factor=1.7, mode="nearest"),
    "nearest 2": nn.Upsample(scale_factor=2, mode="nearest"),
    "bilinear to (7, 9), align_corners": nn.Upsample(size=(7, 9), mode="bilinear",
                                                     align_corners=True),
}


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("kind", list(_UPSAMPLINGS))
def test_a_resize_is_read_with_its_scales(kind: str, opset: int, tmp_path: Path) -> None:
    # a fractional scale: the interpolation uses it, not the in / out size ratio
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 50), nn.ReLU(), nn.Unflatten(1, (2, 5, 5)),
                           _UPSAMPLINGS[kind], nn.Flatten()).eval()
    path = tmp_path / "up.onnx"
    _export(module, torch.zeros((1, 4)), path, opset_version=opset)
    net = Network.from_onnx(path)
    z = np.random.default_rng(1).standard_normal((3, 4))
    x = _outputs(module, z)
    assert np.abs(net.forward(z) - x).max() < 1e-5 * np.abs(x).max()
    assert np.abs(net.forward(z) - Network.from_torch(module).forward(z)).max() < 1e-5
    if kind == "bilinear 1.5":
        assert "infeasible" not in list(invert(net, x).status)


def test_a_resize_in_another_nearest_mode_is_read_where_it_picks_the_same_pixels(
    tmp_path: Path,
) -> None:
    # half_pixel / round_prefer_floor (TensorFlow's exports) doubling picks torch's pixels
    path = _resize_model(tmp_path / "r.onnx", scales=[1, 1, 2, 2], mode="nearest",
                         coordinate_transformation_mode="half_pixel",
                         nearest_mode="round_prefer_floor")
    net = Network.from_onnx(path)
    z = np.random.default_rng(2).standard_normal((2, 3))
    assert np.abs(net.forward(z) - _reference(path, z)).max() < 1e-5


@pytest.mark.parametrize(("attrs", "message"), [
    ({"scales": [1, 1, 1.5, 1.5], "mode": "cubic"}, r"mode 'cubic' is not supported"),
    ({"opset": 18, "scales": [1, 1, 0.6, 0.6], "mode": "linear", "antialias": 1},
     r"antialias = 1 is not supported"),
    ({"scales": [1, 1, 2, 2], "mode": "linear", "exclude_outside": 1},
     r"exclude_outside = 1 is not supported"),
    ({"scales": [1, 1, 2, 2], "mode": "linear",
      "coordinate_transformation_mode": "tf_crop_and_resize"}, r"'tf_crop_and_resize'"),
    ({"opset": 18, "sizes": [7, 7], "axes": [2, 3], "mode": "linear",
      "keep_aspect_ratio_policy": "not_larger"}, r"keep_aspect_ratio_policy 'not_larger'"),
    ({"scales": [1, 1, 1.5, 1.5], "mode": "nearest",
      "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
     r"nearest_mode 'round_prefer_ceil' and these scales / sizes does not interpolate as "
     r"torch's nearest upsampling"),
    ({"scales": [1, 1, 1.5, 1.5], "mode": "linear",
      "coordinate_transformation_mode": "asymmetric"}, r"does not interpolate as torch's"),
    ({"scales": [1, 2, 2, 2], "mode": "nearest", "coordinate_transformation_mode": "asymmetric",
      "nearest_mode": "floor"}, r"resize the batch or channel axis"),
    ({"opset": 10, "scales": [1, 1, 2, 2], "mode": "nearest"}, r"Resize of opset 10"),
])
def test_a_resize_preimage_cannot_reproduce_is_refused_naming_the_node(
    attrs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    opset = attrs.pop("opset", 17)
    scales, sizes = attrs.pop("scales", None), attrs.pop("sizes", None)
    path = tmp_path / "r.onnx"
    if opset == 10:  # Resize-10: inputs X and scales, no roi
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("Gemm", ["z", "w"], ["g"], transB=1),
                 helper.make_node("Reshape", ["g", "shape"], ["r"]),
                 helper.make_node("Resize", ["r", "scales"], ["u"], name="up", **attrs),
                 helper.make_node("Flatten", ["u"], ["x"])]
        path = _save(nodes, {"w": rng.standard_normal((50, 3)).astype(np.float32),
                             "shape": np.array([-1, 2, 5, 5], np.int64),
                             "scales": np.array(scales, np.float32)}, path, opset=10)
    else:
        path = _resize_model(path, opset=opset, scales=scales, sizes=sizes, **attrs)
    with pytest.raises(TypeError, match=r"node up \(Resize\): .*" + message):
        Network.from_onnx(path)


def test_torchs_align_corners_with_a_fractional_scale_is_refused(tmp_path: Path) -> None:
    # torch exports it with scales, and ONNX's align_corners then uses in * scale (7.5),
    # not the output size (7), as the resized length: another interpolation (onnx#2462)
    module = nn.Sequential(nn.Linear(4, 50), nn.Unflatten(1, (2, 5, 5)),
                           nn.Upsample(scale_factor=1.5, mode="bilinear", align_corners=True),
                           nn.Flatten()).eval()
    path = tmp_path / "ac.onnx"
    _export(module, torch.zeros((1, 4)), path, opset_version=17)
    with pytest.raises(TypeError, match=r"\(Resize\): .*'align_corners'.*does not interpolate"):
        Network.from_onnx(path)


# --- the precision of the weights -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_source_dtype_is_the_weights_precision(dtype: torch.dtype, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 50)).to(dtype).eval()
    path = tmp_path / "h.onnx"
    _export(module, torch.zeros((1, 4), dtype=dtype), path, opset_version=17)
    net = Network.from_onnx(path)
    assert net.source_dtype == Network.from_torch(module).source_dtype == str(dtype)[6:]
    # the model's own outputs, handed over as float32, are within its precision's tolerance
    z = np.random.default_rng(3).standard_normal((3, 4))
    x = _outputs(module, z).astype(np.float32)
    assert "infeasible" not in list(invert(net, x).status)


@pytest.mark.parametrize(("eps", "slope", "precision"), [
    (0.1, 0.7, "float32"), (1e-5, 0.7, "float32"), (0.1, 0.5, "float32"),
    (1e-5, 0.5, "float64"),
])
def test_float_attributes_rounded_to_float32_make_the_model_float32(
    eps: float, slope: float, precision: str, tmp_path: Path
) -> None:
    # ONNX keeps epsilon and alpha as float32: a float64 export with eps 0.1 and a slope
    # of 0.7 differs from its module by 1e-9 - 1e-8, and the module's x = G(z) was
    # `infeasible` at float64's tolerance (eps = 1e-5 is off by 2.5e-14 only; 0.5 exact)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16, eps=eps), nn.ReLU(),
                           nn.Linear(16, 40), nn.LeakyReLU(slope))
    with torch.no_grad():
        module[1].running_mean.normal_(0, 0.5)
        module[1].running_var.uniform_(0.1, 2)
    module = module.double().eval()
    path = tmp_path / "g.onnx"
    _export(module, torch.zeros((1, 5), dtype=torch.float64), path, opset_version=17)
    net = Network.from_onnx(path)
    assert net.source_dtype == precision
    x = _outputs(module, np.random.default_rng(1).standard_normal((4, 5)))
    assert "infeasible" not in list(invert(net, x).status)


def test_the_precision_is_that_of_the_weights_the_nodes_compute_with(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # float16 weights cast up to float32 before use: the model computes in float32
    nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["z", "w32"], ["x"], transB=1)]
    path = _save(nodes, {"w": rng.standard_normal((6, 3)).astype(np.float16)}, tmp_path / "c.onnx")
    assert Network.from_onnx(path).source_dtype == "float32"
    # a float64 model keeps float64 though its Resize scales are float32 (they are no weight)
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["z", "w"], ["g"], transB=1),
             helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Flatten", ["u"], ["x"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("z", TensorProto.DOUBLE, ["B", 3])],
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
        [numpy_helper.from_array(rng.standard_normal((8, 3)), "w"),
         numpy_helper.from_array(np.array([-1, 2, 2, 2], np.int64), "shape"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "d.onnx").write_bytes(model.SerializeToString())
    assert Network.from_onnx(tmp_path / "d.onnx").source_dtype == "float64"


# --- constants with a batch axis of 1 --------------------------------------------------

class _BiasParameter(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c = nn.Linear(4, 20), nn.Linear(20, 30)
        self.b = nn.Parameter(torch.randn(*shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.a(z) + self.b))


class _ChannelScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc, self.conv = nn.Linear(4, 3 * 4 * 4), nn.Conv2d(3, 2, 3, padding=1)
        self.s = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)
        self.t = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 3, 4, 4) * self.s - self.t
        return self.conv(torch.relu(h)).flatten(1)


@pytest.mark.parametrize("module", [_BiasParameter((1, 20)), _BiasParameter((20,)),
                                    _ChannelScale()], ids=["(1, n)", "(n,)", "(1, C, 1, 1)"])
def test_a_constant_with_a_leading_batch_axis_of_one_is_read(
    module: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "c.onnx"
    _export(module.eval(), torch.zeros((1, 4)), path, opset_version=17)
    z = np.random.default_rng(4).standard_normal((3, 4))
    x = _outputs(module, z)
    assert np.abs(Network.from_onnx(path).forward(z) - x).max() < 1e-5


@pytest.mark.parametrize(("shape", "message"), [
    ((2, 6), r"node add \(Add\): its constant of shape \(2, 6\) broadcasts over the batch axis"),
    ((1, 1, 6), r"node add \(Add\): its constant of shape \(1, 1, 6\) broadcasts over the batch"),
    ((6, 1), r"node add \(Add\): its constant of shape \(6, 1\) broadcasts over the batch"),
    ((4,), r"node add \(Add\): its constant of shape \(4,\) does not broadcast to"),
])
def test_a_constant_that_differs_over_the_batch_is_refused(
    shape: tuple[int, ...], message: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["z", "w"], ["g"], transB=1),
             helper.make_node("Add", ["g", "b"], ["x"], name="add")]
    inits = {"w": rng.standard_normal((6, 3)).astype(np.float32),
             "b": rng.standard_normal(shape).astype(np.float32)}
    with pytest.raises(TypeError, match=message):
        Network.from_onnx(_save(nodes, inits, tmp_path / "b.onnx"))


def test_a_gemm_bias_of_shape_1_n_is_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["z", "w", "c"], ["x"], transB=1)]
    path = _save(nodes, {"w": rng.standard_normal((6, 3)).astype(np.float32),
                         "c": rng.standard_normal((1, 6)).astype(np.float32)}, tmp_path / "g.onnx")
    z = rng.standard_normal((2, 3))
    assert np.abs(Network.from_onnx(path).forward(z) - _reference(path, z)).max() < 1e-5


# --- weights computed from constants (do_constant_folding=False) ----------------------

class _Unfolded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.w, self.b = nn.Parameter(torch.randn(20, 4)), nn.Parameter(torch.randn(1, 20))
        self.fc, self.bn = nn.Linear(20, 30), nn.BatchNorm1d(30)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(torch.tanh(z @ self.w.t() + self.b))).view(-1, 3, 10)


@pytest.mark.parametrize("factory", [
    _Unfolded,
    lambda: nn.Sequential(nn.Linear(4, 4 * 3 * 3), nn.Unflatten(1, (4, 3, 3)), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(4, 2, 3, padding=1)),
], ids=["transposed weight", "conv decoder"])
def test_an_export_without_constant_folding_is_read(factory: Any, tmp_path: Path) -> None:
    module = factory().eval()
    path = tmp_path / "nofold.onnx"
    _export(module, torch.zeros((1, 4)), path, opset_version=17, do_constant_folding=False)
    z = np.random.default_rng(5).standard_normal((3, 4))
    x = _outputs(module, z)
    assert np.abs(Network.from_onnx(path).forward(z) - x).max() < 1e-5 * max(1, np.abs(x).max())


def test_weights_behind_a_chain_of_constant_ops_are_computed(tmp_path: Path) -> None:
    # MatMul(z, Reshape(Transpose(Cast(w)), Shape(v))): every op on constants alone
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3))
    nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["w32"], ["wt"], perm=[1, 0]),
             helper.make_node("Shape", ["v"], ["s"]),
             helper.make_node("Reshape", ["wt", "s"], ["wr"]),
             helper.make_node("MatMul", ["z", "wr"], ["m"]),
             helper.make_node("Constant", [], ["k"], value_floats=[0.5]),
             helper.make_node("Mul", ["m", "k"], ["x"])]
    path = _save(nodes, {"w": w, "v": np.zeros((3, 6), np.float32)}, tmp_path / "m.onnx")
    z = rng.standard_normal((2, 3))
    assert np.abs(Network.from_onnx(path).forward(z) - 0.5 * z @ w.T).max() < 1e-5


# --- the check against onnx's reference evaluator -------------------------------------

@pytest.mark.parametrize(("op", "misread"), [
    ("Tanh", lambda node: [chain.Act(Activation("sigmoid"), node.name)]),
    ("Gemm", lambda node: []),
])
def test_a_node_read_wrong_is_caught_by_the_reference_evaluator(
    op: str, misread: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(6)
    module = nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 30), nn.ReLU(),
                           nn.Linear(30, 30)).eval()
    path = tmp_path / "g.onnx"
    _export(module, torch.zeros((1, 4)), path, opset_version=17)
    read = onnx_io._steps_of_node
    skipped = []

    def wrong(node: Any, *args: Any) -> list[chain.Step]:
        # the second Gemm dropped (its shape kept by a square one), or tanh read as sigmoid
        if node.op_type == op and (op != "Gemm" or node.name == "/4/Gemm"):
            skipped.append(node.name)
            return misread(node)
        return read(node, *args)

    monkeypatch.setattr(onnx_io, "_steps_of_node", wrong)
    name = "/1/Tanh" if op == "Tanh" else "/4/Gemm"
    with pytest.raises(TypeError, match=rf"node {name} \({op}\): the network read differs from "
                                        r"onnx's reference evaluator"):
        Network.from_onnx(path)
    assert skipped == [name]


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_a_batch_norm_exported_at_any_opset_is_read(opset: int, tmp_path: Path) -> None:
    # onnx's evaluator of opsets 9-13 takes the batch's statistics whenever `momentum` is
    # set (torch always sets it): the forward check refused every such batch norm
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 50),
                      nn.ReLU())
    with torch.no_grad():
        g[1].running_mean.uniform_(-1, 1)
        g[1].running_var.uniform_(0.5, 2)
    g.eval()
    path = tmp_path / "bn.onnx"
    _export(g, torch.randn(2, 4), path, opset_version=opset)
    net = Network.from_onnx(path)
    z = np.random.default_rng(0).standard_normal((3, 4))
    np.testing.assert_allclose(net.forward(z), _outputs(g, z), rtol=1e-5, atol=1e-5)


# --- training mode, convolutions other than 2-D ------------------------------------------

@pytest.mark.parametrize(("layer", "opset", "culprit"), [
    (nn.BatchNorm1d, 17, r"BatchNormalization\) is in training mode \(training_mode = 1\)"),
    (nn.BatchNorm1d, 11, r"BatchNormalization\) is in training mode \(5 outputs"),
    (lambda width: nn.Dropout(0.5), 17, r"Dropout\) is in training mode "
                                        r"\(training_mode = true\)"),
], ids=["batch norm", "batch norm opset 11", "dropout"])
def test_an_export_in_training_mode_is_refused_naming_the_node(
    layer: Any, opset: int, culprit: str, tmp_path: Path
) -> None:
    # it was read as the module in eval mode: a different function from the file's, which
    # normalizes by each batch's statistics (or drops random entries)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 16), layer(16), nn.ReLU(), nn.Linear(16, 8))
    path = tmp_path / "train.onnx"
    _export(module, torch.randn(8, 4), path, opset_version=opset,
            training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    with pytest.raises(ValueError, match=culprit + r".*eval mode \(model\.eval\(\).*"
                                             r"TrainingMode\.EVAL"):
        Network.from_onnx(path)


@pytest.mark.parametrize("flag", [None, False, True])
def test_a_dropout_is_read_as_nothing_unless_its_training_mode_is_true(
    flag: bool | None, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    inits: dict[str, np.ndarray] = {"w": rng.standard_normal((6, 3)).astype(np.float32),
                                    "ratio": np.array(0.5, np.float32)}
    inputs = ["g", "ratio"]
    if flag is not None:
        inits["train"] = np.array(flag)
        inputs.append("train")
    nodes = [helper.make_node("Gemm", ["z", "w"], ["g"], transB=1),
             helper.make_node("Dropout", inputs, ["d"], name="drop"),
             helper.make_node("Relu", ["d"], ["x"])]
    path = _save(nodes, inits, tmp_path / "d.onnx")
    if flag:
        with pytest.raises(ValueError, match=r"node drop \(Dropout\) is in training mode"):
            Network.from_onnx(path)
        return
    z = rng.standard_normal((2, 3))
    assert np.abs(Network.from_onnx(path).forward(z) - _reference(path, z)).max() < 1e-5


@pytest.mark.parametrize(("conv", "shape", "rank"), [
    (nn.Conv1d(4, 8, 1), (4, 5), 1),
    (nn.ConvTranspose1d(4, 8, 3, padding=1), (4, 5), 1),
    (nn.Conv3d(1, 2, 1), (1, 2, 2, 2), 3),
], ids=["Conv1d", "ConvTranspose1d", "Conv3d"])
def test_a_convolution_other_than_2d_is_refused_as_such(
    conv: nn.Module, shape: tuple[int, ...], rank: int, tmp_path: Path
) -> None:
    # it was refused for "asymmetric pads [0, 0]", pads that are symmetric
    path = tmp_path / "conv.onnx"
    _export(nn.Sequential(conv, nn.ReLU()).eval(), torch.randn(2, *shape), path,
            opset_version=17)
    with pytest.raises(TypeError, match=rf"Conv(Transpose)?\) is a {rank}-D convolution.*"
                                        r"2-D convolutions only"):
        Network.from_onnx(path)


@pytest.mark.parametrize("opset", [11, 17])
def test_shapes_left_open_when_the_reference_evaluator_fails_are_explained(
    opset: int, tmp_path: Path
) -> None:
    # onnx's reference evaluator cannot run a ConvTranspose with dilation 2 and output
    # padding 1 (torch can): the view(z.size(0), ...) reshape kept no shape, and the error
    # was a convolution's "got ()" naming no node, or "not static" with no reason
    class G(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 32)
            self.ct1 = nn.ConvTranspose2d(2, 3, 4, 2, 1)
            self.ct2 = nn.ConvTranspose2d(3, 1, 1, dilation=2, output_padding=1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(z)).view(z.size(0), 2, 4, 4)
            return torch.tanh(self.ct2(torch.relu(self.ct1(h))))

    path = tmp_path / "g.onnx"
    _export(G().eval(), torch.zeros((2, 6)), path, opset_version=opset)
    with pytest.raises(ValueError, match=r"g\.onnx: node .*reference evaluator.*could not run"):
        Network.from_onnx(path)
