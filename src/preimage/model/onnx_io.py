"""Reading a generator from an ONNX file with the ``onnx`` package.

The graph must be a chain: every node takes the previous node's output as its
one data input (weights come from initializers or Constant nodes; shape
arithmetic such as Shape -> Gather -> Concat feeding a Reshape is followed and
dropped). Each node becomes a step of `preimage.model.chain`:

| ONNX op | step |
| --- | --- |
| Gemm, MatMul (+ Add) | dense linear map (and bias) |
| Conv, ConvTranspose | convolution (group = 1, symmetric pads) |
| BatchNormalization | elementwise scale and shift |
| Add, Mul with a constant | elementwise shift / scale |
| Resize (nearest with floor / asymmetric, or linear) | upsampling |
| Flatten, Reshape, Squeeze, Unsqueeze | a change of shape |
| Identity, Dropout | nothing |
| Relu, LeakyRelu, Elu, Softplus, Tanh, Sigmoid | activation |

Every other op is refused with its name and the node's name. Shapes come from
``onnx.shape_inference``; the first (batch) dimension may be symbolic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from preimage.model import chain
from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.structured import Conv2dOperator, UpsampleOperator

Shape = tuple[int, ...]

_ACTIVATIONS = {"Relu", "LeakyRelu", "Elu", "Softplus", "Tanh", "Sigmoid"}
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _load(path: str | Path) -> Any:
    import onnx

    if not isinstance(path, (str, Path)):
        raise TypeError(f"`path` must be a file path (str or Path); got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an ONNX file.")
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    try:
        # External data would be read from paths the file names: an untrusted file only
        # gets its own bytes read (`layers_from_onnx` refuses tensors stored outside).
        model = onnx.load(str(path), load_external_data=False)
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # protobuf / checker errors: say which file and why
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not an ONNX model ({type(exc).__name__}: {first}).") from exc


def layers_from_onnx(path: str | Path) -> tuple[list[Layer], str, Shape, Shape]:
    """The layers of an ONNX chain, its weights' dtype and its input / output shapes.

    Any error names the file; a tensor kept in an external data file is refused.
    """
    model = _load(path)
    try:
        return _read(model, Path(path))
    except (ValueError, TypeError) as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


def _read(model: Any, path: Path) -> tuple[list[Layer], str, Shape, Shape]:
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    external = [t.name for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise ValueError(
            f"its tensor(s) {external[:3]} are stored in external data files, which preimage "
            "does not read (save the model with its weights inside the .onnx file)."
        )
    values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dtypes = {str(v.dtype) for v in values.values() if v.dtype.kind == "f"}
    shapes: dict[str, Shape] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(int(d.dim_value) if d.dim_value > 0 else -1 for d in dims)
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != 1:
        raise ValueError(f"{path}: the graph has {len(inputs)} data inputs; preimage needs one "
                         "(the latent code).")
    current = inputs[0].name
    in_shape = shapes[current][1:]
    if any(d < 1 for d in in_shape):
        raise ValueError(f"{path}: the input's shape {shapes[current]} is not static beyond the "
                         "batch dimension.")
    shapes.update(_shapes_by_running(model, current, in_shape))
    meta: set[str] = set()  # tensors computed from shapes, not from the data
    steps: list[chain.Step] = []
    for node in graph.node:
        where = f"node {node.name or node.op_type} ({node.op_type})"
        attrs = _attributes(node)
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        data = [i for i in node.input if i and i not in values and i not in meta]
        if not data and node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]  # a weight passed through
            continue
        if not data or node.op_type == "Shape":  # arithmetic on shapes and constants
            meta.update(node.output)
            continue
        if data != [current]:
            raise TypeError(f"{path}: {where} does not take exactly the previous node's output "
                            f"(its data inputs: {data}); preimage needs a chain of layers.")
        out = node.output[0]
        here = shapes.get(current, ())[1:]
        there = shapes.get(out, ())[1:]
        steps += _steps_of_node(node, attrs, values, here, there, where, str(path))
        current = out
    outputs = [o.name for o in graph.output]
    if outputs != [current]:
        raise TypeError(f"{path}: the graph's output {outputs} is not its last node's output.")
    layers, out_shape = chain.fold(steps, in_shape)
    return layers, "float32" if dtypes <= {"float32", "float16"} else "float64", in_shape, out_shape


def _shapes_by_running(model: Any, input_name: str, in_shape: Shape) -> dict[str, Shape]:
    """Every tensor's shape, from running the graph on a batch of two zero codes.

    Static shape inference leaves the targets of computed reshapes (torch's
    Unflatten and view export Shape -> Slice -> Concat -> Reshape) unknown; the
    reference evaluator of ``onnx`` computes them. Where it cannot run (an op it
    lacks), the inferred shapes are kept and the reader reports what is missing.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = [o for node in probe.graph.node for o in node.output if o and o not in known]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    dtype = {1: np.float32, 11: np.float64, 10: np.float16}.get(
        probe.graph.input[0].type.tensor_type.elem_type, np.float32)
    try:
        results = ReferenceEvaluator(probe).run(
            None, {input_name: np.zeros((2, *in_shape), dtype=dtype)}
        )
    except Exception:  # an op the evaluator lacks: keep the static shapes
        return {}
    outputs = [o.name for o in probe.graph.output]
    return {name: (-1, *np.shape(value)[1:]) for name, value in zip(outputs, results, strict=True)
            if np.ndim(value) >= 1}


def _constant(values: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in values:
        raise TypeError(f"{where}: its input {name!r} is not a constant (an initializer).")
    arr = np.asarray(values[name], dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: the tensor {name!r} contains NaN or inf.")
    return arr


def _steps_of_node(node: Any, attrs: dict[str, Any], values: dict[str, np.ndarray],
                   here: Shape, there: Shape, where: str, path: str) -> list[chain.Step]:
    op = node.op_type
    name = node.name or op
    if op in _ACTIVATIONS:
        act = {
            "Relu": lambda: Activation("relu"),
            "LeakyRelu": lambda: Activation("leaky_relu", float(attrs.get("alpha", 0.01))),
            "Elu": lambda: Activation("elu", alpha=float(attrs.get("alpha", 1.0))),
            "Softplus": lambda: Activation("softplus"),
            "Tanh": lambda: Activation("tanh"),
            "Sigmoid": lambda: Activation("sigmoid"),
        }[op]()
        return [chain.Act(act, name)]
    if op in ("Identity", "Dropout"):
        return []
    if op in _RESHAPES:
        if any(d < 1 for d in there):
            raise ValueError(f"{path}: {where}: its output shape {there} is not static.")
        return [chain.Reshape(there, name)]
    if op == "Gemm":
        if int(attrs.get("transA", 0)):
            raise TypeError(f"{path}: {where} with transA = 1 is not supported.")
        b = _constant(values, node.input[1], where)
        weight = float(attrs.get("alpha", 1.0)) * (b if int(attrs.get("transB", 0)) else b.T)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = _constant(values, node.input[2], where) * float(attrs.get("beta", 1.0))
            bias = np.broadcast_to(c, (weight.shape[0],)).copy()
        return [chain.Linear(DenseOperator(weight, name=node.input[1]), bias, name)]
    if op == "MatMul":
        return [chain.Linear(DenseOperator(_constant(values, node.input[1], where).T,
                                           name=node.input[1]), None, name)]
    if op in ("Add", "Mul", "Sub", "Div"):
        const = [i for i in node.input if i in values]
        if len(const) != 1:
            raise TypeError(f"{path}: {where} combines two data tensors; not a chain.")
        c = np.broadcast_to(_constant(values, const[0], where), here).ravel()
        ones, zeros = np.ones(c.size), np.zeros(c.size)
        if op == "Add":
            return [chain.Affine(ones, c.copy(), here, name)]
        if op == "Sub":
            if node.input[0] in values:
                return [chain.Affine(-ones, c.copy(), here, name)]
            return [chain.Affine(ones, -c, here, name)]
        if op == "Mul":
            return [chain.Affine(c.copy(), zeros, here, name)]
        if node.input[0] in values:
            raise TypeError(f"{path}: {where} divides a constant by the data: not linear.")
        return [chain.Affine(1.0 / c, zeros, here, name)]
    if op in ("Conv", "ConvTranspose"):
        if int(attrs.get("group", 1)) != 1:
            raise TypeError(f"{path}: {where} has group = {attrs['group']}; preimage supports "
                            "group = 1 only.")
        if "output_shape" in attrs or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise TypeError(f"{path}: {where} sets output_shape or auto_pad; give explicit pads.")
        kernel = _constant(values, node.input[1], where)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            raise TypeError(f"{path}: {where} has asymmetric pads {pads}.")
        transposed = op == "ConvTranspose"
        extra = {"output_padding": tuple(attrs.get("output_padding", (0, 0)))} if transposed else {}
        conv = Conv2dOperator(
            kernel, here, stride=tuple(attrs.get("strides", (1, 1))), padding=tuple(pads[:2]),
            dilation=tuple(attrs.get("dilations", (1, 1))), transposed=transposed, **extra,
        )
        bias = None
        if len(node.input) > 2 and node.input[2]:
            spread = conv.out_shape[1] * conv.out_shape[2]
            bias = np.repeat(_constant(values, node.input[2], where), spread)
        return [chain.Linear(conv, bias, name)]
    if op == "BatchNormalization":
        scale, shift, mean, var = (_constant(values, i, where) for i in node.input[1:5])
        return [chain.batch_norm_affine(mean, var, float(attrs.get("epsilon", 1e-5)), scale,
                                        shift, here, name)]
    if op == "Resize":
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        transform = attrs.get("coordinate_transformation_mode", b"half_pixel")
        transform = transform.decode() if isinstance(transform, bytes) else transform
        if len(there) != 3 or any(d < 1 for d in there):
            raise ValueError(f"{path}: {where}: its output shape {there} is not static (C, H, W).")
        if mode == "nearest":
            nearest = attrs.get("nearest_mode", b"round_prefer_floor")
            nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
            if transform != "asymmetric" or nearest != "floor":
                raise TypeError(f"{path}: {where}: nearest resizing with {transform!r} / "
                                f"{nearest!r} is not supported (asymmetric / floor, as torch).")
            up = UpsampleOperator(here, size=there[1:], mode="nearest")
        elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel",
                                                "align_corners"):
            up = UpsampleOperator(here, size=there[1:], mode="bilinear",
                                  align_corners=transform == "align_corners")
        else:
            raise TypeError(f"{path}: {where}: resizing mode {mode!r} with {transform!r} is not "
                            "supported.")
        return [chain.Linear(up, None, name)]
    raise TypeError(
        f"{path}: unsupported {where}: preimage reads Gemm, MatMul, Add, Mul, Conv, "
        "ConvTranspose, BatchNormalization, Resize, Flatten, Reshape, Identity, Dropout, Relu, "
        "LeakyRelu, Elu, Softplus, Tanh and Sigmoid."
    )
