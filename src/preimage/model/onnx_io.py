"""Reading a generator from an ONNX file with the ``onnx`` package.

The graph must be a chain: every node takes the previous node's output as its
one data input. Weights come from initializers, Constant nodes or nodes computed
from those alone (a Transpose, Reshape, Cast, ... of a weight, as an export with
``do_constant_folding=False`` leaves them), which onnx's reference evaluator
computes first; shape arithmetic on the data such as Shape -> Gather -> Concat
feeding a Reshape is followed and dropped. Each node becomes a step of
`preimage.model.chain`:

| ONNX op | step |
| --- | --- |
| Gemm, MatMul (+ Add) | dense linear map (and bias) |
| Conv, ConvTranspose (2-D) | convolution (group = 1, symmetric pads) |
| BatchNormalization (inference) | elementwise scale and shift |
| Add, Sub, Mul, Div with a constant | elementwise shift / scale |
| Resize (nearest, linear; from opset 11) | upsampling, where torch's interpolation is ONNX's |
| Flatten, Reshape, Squeeze, Unsqueeze | a change of shape |
| Identity, Dropout (inference) | nothing |
| Relu, LeakyRelu, Elu, Softplus, Tanh, Sigmoid | activation |

Every other op is refused with its name and the node's name, and so is a node
whose attributes the step cannot reproduce (a cubic or antialiased Resize, a
constant that broadcasts over the batch axis) and a batch norm or dropout
exported in training mode (a ValueError: export with the module in eval mode).
Shapes come from running onnx's reference evaluator on two random codes
(``onnx.shape_inference`` where it cannot run); the first (batch) dimension may
be symbolic. The same run checks the result: a network whose forward pass
differs from the evaluator's on those codes is refused, naming the first node
where they part.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from preimage.model import chain
from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.structured import Conv2dOperator, UpsampleOperator
from preimage.model.validation import PRECISIONS

Shape = tuple[int, ...]

_ACTIVATIONS = {"Relu", "LeakyRelu", "Elu", "Softplus", "Tanh", "Sigmoid"}
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
# Ops whose constant operands are weights: their float type is the model's precision.
_WEIGHTED = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv", "ConvTranspose",
             "BatchNormalization"}
# Ops that draw random numbers: never computed ahead as constants, inputs or not.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli"}
# How far the network read may be from onnx's reference evaluator, relative to the largest
# output, by the model's precision: the evaluator computes in it, the network in float64
# from the same weights, so they differ by rounding (far below these) unless a node is misread.
_AGREEMENT = {"float64": 1e-7, "float32": 1e-3, "float16": 3e-2, "bfloat16": 2e-1}


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


#: How far (absolute) a function attribute may have been rounded to float32 and the
#: model still be float64 (a tenth of float64's default rtol, 1e-9: `_rounded_attributes`).
ATTRIBUTE_ROUNDING = 1e-10
#: The float attributes that enter a node's function (ONNX stores them as float32).
_FUNCTION_ATTRIBUTES = {"BatchNormalization": ("epsilon",), "InstanceNormalization": ("epsilon",),
                        "LeakyRelu": ("alpha",), "Elu": ("alpha",), "Gemm": ("alpha", "beta")}


def _rounded_attributes(op_type: str, attrs: dict[str, Any]) -> bool:
    """Whether one of the node's function attributes was rounded to float32 by more than
    ATTRIBUTE_ROUNDING: its value differs from the float64 number its shortest float32
    decimal names (LeakyReLU(0.7): 0.69999998808, off by 1.2e-8; a BatchNorm eps of 0.1:
    1.5e-9; eps = 1e-5: 2.5e-14, below). Such a model computes in float32 there,
    whatever its weights: a float64 export with eps = 0.1 and slopes 0.7 and 0.2 differed
    from its torch module by 7.5e-9 (relative), and x = G(z) from the module was then
    `infeasible` at float64's tolerance."""
    for name in _FUNCTION_ATTRIBUTES.get(op_type, ()):
        value = attrs.get(name)
        if isinstance(value, float) and abs(float(str(np.float32(value))) - value) > (
                ATTRIBUTE_ROUNDING):
            return True
    return False


def _text(attrs: dict[str, Any], name: str, default: str) -> str:
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


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

    The dtype is the least precise float type among the weights the nodes compute with
    (float16 when any is float16, as `preimage.model.torch_io` reports a half module;
    float32 for float16 weights cast up before use). Any error names the file; a tensor
    kept in an external data file is refused.
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
    # (the stored type, not the array's: older onnx widens bfloat16 to float32 arrays)
    stored: dict[str, str | None] = {t.name: _precision_of_type(t.data_type)
                                     for t in graph.initializer}
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
    in_type = inputs[0].type.tensor_type.elem_type
    opsets = {"" if imp.domain == "ai.onnx" else imp.domain: int(imp.version)
              for imp in model.opset_import}
    # As many codes as a static batch dimension says (a model exported for one batch size
    # may compute with it), else two.
    batch = shapes[current][0] if shapes[current][:1] and shapes[current][0] > 0 else 2
    codes = _codes(in_type, (batch, *in_shape))
    run, unrun = _run_reference(model, current, codes)
    shapes.update({name: (-1, *np.shape(value)[1:]) for name, value in run.items()
                   if np.ndim(value) >= 1})
    meta: set[str] = set()  # tensors computed from shapes, not from the data
    steps: list[chain.Step] = []
    nodes: list[tuple[str, str, int]] = []  # each chain node: where, its output, steps so far
    precisions: set[str] = set()
    for node in graph.node:
        where = f"node {node.name or node.op_type} ({node.op_type})"
        attrs = _attributes(node)
        if node.op_type == "Constant" and "value" in attrs:
            values[node.output[0]] = numpy_helper.to_array(attrs["value"])
            stored[node.output[0]] = _precision_of_type(attrs["value"].data_type)
            continue
        data = [i for i in node.input if i and i not in values and i not in meta]
        if (not data and node.op_type not in _RANDOM
                and all(i in values for i in node.input if i)):
            # Constants only (a transposed weight, a Constant's other forms, the Shape of a
            # constant): computed now, so the chain below sees a weight, as after folding.
            folded = _folded(node, values, opsets)
            if folded is not None:
                values.update(folded)
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
        if node.op_type == "Resize":
            steps.append(_resize_step(node, attrs, values, run, here, there, where, str(path),
                                      opsets))
        else:
            try:
                steps += _steps_of_node(node, attrs, values, here, there, where, str(path))
            except (TypeError, ValueError) as exc:
                if not unrun:
                    raise
                # the shapes static inference left open stayed open: say where, and why
                said = str(exc).rstrip(".") if where in str(exc) else f"{path}: {where}: {exc}"
                raise type(exc)(
                    f"{said} (onnx's reference evaluator, which computes "
                    f"the shapes a reshape takes from the batch, could not run the graph: "
                    f"{unrun}; an export with a static batch, or h.view(-1, C, H, W) written "
                    "with constants, may be read)") from exc
        for i in node.input if node.op_type in _WEIGHTED else ():
            if i in values and (kind := stored.get(i) or _precision_of_array(values[i])):
                precisions.add(kind)
        if _rounded_attributes(node.op_type, attrs):
            precisions.add("float32")
        nodes.append((where, out, len(steps)))
        current = out
    outputs = [o.name for o in graph.output]
    if outputs != [current]:
        raise TypeError(f"{path}: the graph's output {outputs} is not its last node's output.")
    layers, out_shape = chain.fold(steps, in_shape)
    dtype = max(precisions or {_precision_of_type(in_type) or "float32"}, key=PRECISIONS.index)
    if codes is not None and current in run:
        looser = max(_AGREEMENT[dtype], _AGREEMENT[_precision_of_type(in_type) or dtype])
        _check_forward(layers, steps, nodes, codes, run, looser, str(path))
    return layers, dtype, in_shape, out_shape


def _precision_of_type(elem_type: int) -> str | None:
    """preimage's name of an ONNX float element type (None for other types)."""
    from onnx import TensorProto

    names = {TensorProto.DOUBLE: "float64", TensorProto.FLOAT: "float32",
             TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    if elem_type in names:
        return names[elem_type]
    try:
        name = TensorProto.DataType.Name(elem_type)
    except ValueError:  # (a type this onnx does not know)
        return None
    # float8 / float4 weights: coarser than any precision preimage names, so its coarsest
    return "bfloat16" if name.startswith("FLOAT") else None


def _precision_of_array(arr: np.ndarray) -> str | None:
    name = str(np.asarray(arr).dtype)
    if name in PRECISIONS:
        return name
    return "bfloat16" if name.startswith("float") else None


def _codes(elem_type: int, shape: Shape) -> np.ndarray | None:
    """A batch of random codes in the model's input type (None for a type numpy lacks)."""
    from onnx import TensorProto

    kinds: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
                             TensorProto.FLOAT16: np.float16}
    try:
        import ml_dtypes

        kinds[TensorProto.BFLOAT16] = ml_dtypes.bfloat16
    except ImportError:  # (an onnx older than its ml_dtypes dependency)
        pass
    if elem_type not in kinds:
        return None
    return np.random.default_rng(0).standard_normal(shape).astype(kinds[elem_type])


def _run_reference(model: Any, input_name: str, codes: np.ndarray | None
                   ) -> tuple[dict[str, Any], str]:
    """Every tensor of the graph, from onnx's reference evaluator on a batch of codes, and
    why it could not run ("" when it could, or was not asked to).

    Static shape inference leaves the targets of computed reshapes (torch's
    Unflatten and view export Shape -> Slice -> Concat -> Reshape) unknown; the
    reference evaluator computes them, and the output it gives checks the network
    read (`_check_forward`). Where it cannot run (an op it lacks), nothing is
    returned: the inferred shapes are kept and the reader reports what is missing.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    if codes is None:
        return {}, ""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = [o for node in probe.graph.node for o in node.output if o and o not in known]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # (a log or division the codes push out of range)
            results = ReferenceEvaluator(probe, new_ops=[_inference_batch_norm()]).run(
                None, {input_name: codes})
    except Exception as exc:  # an op the evaluator lacks: keep the static shapes
        text = str(exc).strip().splitlines()
        return {}, f"{type(exc).__name__}: {text[0][:200] if text else ''}"
    outputs = [o.name for o in probe.graph.output]
    return dict(zip(outputs, results, strict=True)), ""


def _inference_batch_norm() -> type:
    """onnx's BatchNormalization with the running statistics, as an inference node (one
    output) computes it at every opset. onnx's own evaluator of opsets 9-13 takes the
    batch's statistics whenever `momentum` is set, which torch's export always does: the
    check refused every batch norm exported at those opsets. (Training-mode nodes, with
    more outputs, are refused by the reader.)"""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None,  # type: ignore[no-untyped-def]
                 spatial=None, is_test=None, training_mode=None):
            eps = 1e-5 if epsilon is None else epsilon
            shape = (-1,) + (1,) * (x.ndim - 2)
            y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(
                var.reshape(shape) + eps) + bias.reshape(shape)
            return (y.astype(x.dtype),)

    return BatchNormalization


def _folded(node: Any, values: dict[str, np.ndarray],
            opsets: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The outputs of a node whose inputs are all constants, by onnx's reference evaluator
    (None where it cannot compute them: the node is then taken for shape arithmetic)."""
    from onnx.reference import ReferenceEvaluator

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            results = ReferenceEvaluator(node, opsets=opsets).run(
                None, {i: values[i] for i in node.input if i})
    except Exception:
        return None
    return {name: np.asarray(value) for name, value in zip(node.output, results, strict=False)
            if name}


def _constant(values: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in values:
        raise TypeError(f"{where}: its input {name!r} is not a constant (an initializer, a "
                        "Constant node or ops on those alone).")
    arr = np.asarray(values[name], dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: the tensor {name!r} contains NaN or inf.")
    return arr


def _per_sample(c: np.ndarray, shape: Shape, where: str, path: str) -> np.ndarray:
    """A constant operand of a batch (B, *shape), as the flattened array it gives each sample.

    A leading axis of 1 where the batch axis is ((1, n) against (B, n), (1, C, 1, 1)
    against (B, C, H, W)) is ordinary broadcasting: it is dropped. A constant that
    would differ from sample to sample, or enlarge the data, is refused.
    """
    if c.ndim > len(shape):
        if c.ndim > len(shape) + 1 or c.shape[0] != 1:
            raise TypeError(f"{path}: {where}: its constant of shape {c.shape} broadcasts over "
                            f"the batch axis of its data (B, {', '.join(map(str, shape))}); "
                            "preimage needs the same map for every sample.")
        c = c[0]
    try:
        wider = np.broadcast_shapes(c.shape, shape) != tuple(shape)
    except ValueError:
        wider = True
    if wider:
        raise TypeError(f"{path}: {where}: its constant of shape {c.shape} does not broadcast "
                        f"to its data's shape per sample {tuple(shape)}.")
    return np.broadcast_to(c, shape).ravel()


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
    if op in ("BatchNormalization", "Dropout"):
        _check_inference(node, attrs, values, where, path)
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
            bias = _per_sample(c, (weight.shape[0],), where, path).copy()
        return [chain.Linear(DenseOperator(weight, name=node.input[1]), bias, name)]
    if op == "MatMul":
        return [chain.Linear(DenseOperator(_constant(values, node.input[1], where).T,
                                           name=node.input[1]), None, name)]
    if op in ("Add", "Mul", "Sub", "Div"):
        const = [i for i in node.input if i in values]
        if len(const) != 1:
            raise TypeError(f"{path}: {where} combines two data tensors; not a chain.")
        c = _per_sample(_constant(values, const[0], where), here, where, path)
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
        # (before the pads, whose rule below is that of a 2-D convolution)
        rank = len(attrs["kernel_shape"]) if "kernel_shape" in attrs else kernel.ndim - 2
        if kernel.ndim != 4 or rank != 2:
            raise TypeError(f"{path}: {where} is a {rank}-D convolution (its kernel has shape "
                            f"{kernel.shape}); preimage supports 2-D convolutions only (as torch's "
                            "Conv2d and ConvTranspose2d).")
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
    raise TypeError(
        f"{path}: unsupported {where}: preimage reads Gemm, MatMul, Add, Sub, Mul, Div, Conv, "
        "ConvTranspose, BatchNormalization, Resize, Flatten, Reshape, Squeeze, Unsqueeze, "
        "Identity, Dropout, Relu, LeakyRelu, Elu, Softplus, Tanh and Sigmoid."
    )


def _check_inference(node: Any, attrs: dict[str, Any], values: dict[str, np.ndarray],
                     where: str, path: str) -> None:
    """Refuse (ValueError) a BatchNormalization or Dropout exported in training mode.

    Why: there a batch norm normalizes by the batch's own statistics (and outputs the
    updated running ones) and a dropout zeroes random entries, so the model is not one
    function of each code; reading the node as its inference form would invert another
    model. Training mode shows as a batch norm's ``training_mode = 1`` (opset 14 on) or its
    outputs beyond the first (the batch's statistics, at every opset), a Dropout's
    ``training_mode`` input other than a constant false (opset 12 on), or an explicit
    ``is_test = 0`` (opset 6 and before).
    """
    op = node.op_type
    why = None
    if int(attrs.get("is_test", 1)) == 0:
        why = "is_test = 0"
    elif op == "BatchNormalization":
        outputs = [o for o in node.output if o]
        if int(attrs.get("training_mode", 0)):
            why = "training_mode = 1"
        elif len(outputs) > 1:
            why = f"{len(outputs)} outputs: the batch's statistics besides its result"
    elif len(node.input) > 2 and node.input[2]:  # a Dropout's training_mode input
        flag = values.get(node.input[2])
        if flag is None:
            why = "a training_mode input that is not a constant"
        elif np.any(np.asarray(flag)):
            why = "training_mode = true"
    if why is not None:
        raise ValueError(
            f"{path}: {where} is in training mode ({why}), where its output depends on the "
            f"batch{' (or is random)' if op == 'Dropout' else ''}; export the model with the "
            "module in eval mode (model.eval(), torch.onnx.export(..., "
            "training=torch.onnx.TrainingMode.EVAL))."
        )


def _resize_step(node: Any, attrs: dict[str, Any], values: dict[str, np.ndarray],
                 run: dict[str, Any], here: Shape, there: Shape, where: str, path: str,
                 opsets: dict[str, int]) -> chain.Step:
    """A Resize as torch's upsampling (`UpsampleOperator`), where the two compute the same.

    The scale is the node's ``scales`` input where it has one (the in / out size
    ratio only for ``sizes``, as ONNX says); every attribute is read, and the
    interpolation along each axis is checked against onnx's reference evaluator's
    before it is accepted: ONNX's coordinate rules agree with torch's only in part
    (align_corners with a fractional scale, pytorch_half_pixel onto one pixel,
    nearest modes other than asymmetric / floor at most scales differ).
    """
    mode = _text(attrs, "mode", "nearest")
    transform = _text(attrs, "coordinate_transformation_mode", "half_pixel")
    nearest = _text(attrs, "nearest_mode", "round_prefer_floor")
    opset = opsets.get("", 0)
    said = f"{path}: {where}"
    if opset < 11:
        raise TypeError(f"{said}: Resize of opset {opset} leaves its coordinates unspecified; "
                        "preimage reads Resize from opset 11 on (export with opset >= 11).")
    if mode not in ("nearest", "linear"):
        raise TypeError(f"{said}: mode {mode!r} is not supported (nearest and linear are, as "
                        "torch's nearest and bilinear upsampling).")
    if int(attrs.get("antialias", 0)):
        raise TypeError(f"{said}: antialias = 1 is not supported (torch's upsampling without "
                        "antialiasing is what preimage models).")
    if int(attrs.get("exclude_outside", 0)):
        raise TypeError(f"{said}: exclude_outside = 1 is not supported.")
    if transform == "tf_crop_and_resize":
        raise TypeError(f"{said}: coordinate_transformation_mode 'tf_crop_and_resize' (a crop, "
                        "with extrapolation_value outside it) is not supported.")
    if len(here) != 3 or len(there) != 3 or any(d < 1 for d in there):
        raise ValueError(f"{said}: its input / output shapes {here} / {there} are not static, "
                         "nonempty (C, H, W).")

    names = [*node.input, "", "", ""]
    scales = None
    if names[2]:
        if names[2] in values:
            scales = np.asarray(values[names[2]], dtype=np.float64).ravel()
        elif names[2] in run:  # shape arithmetic, as the reference evaluator computed it
            scales = np.asarray(run[names[2]], dtype=np.float64).ravel()
        else:
            raise TypeError(f"{said}: its scales {names[2]!r} are neither a constant nor "
                            "computed from shapes alone.")
    # (sizes' values are the output shape, known already; an empty tensor stands for none)
    sized = bool(names[3]) and not (names[3] in values and np.size(values[names[3]]) == 0)
    axes = [int(a) % 4 for a in attrs.get("axes", range(4))]
    if scales is not None and scales.size:
        if scales.size != len(axes):
            raise TypeError(f"{said}: it has {scales.size} scales for {len(axes)} axes.")
        full = [1.0] * 4
        for a, factor in zip(axes, scales, strict=True):
            full[a] = float(factor)
        if full[:2] != [1.0, 1.0]:
            raise TypeError(f"{said}: its scales {full} resize the batch or channel axis; "
                            "preimage upsamples (H, W) only.")
        target: dict[str, Any] = {"scale_factor": (full[2], full[3])}
    elif sized:
        policy = _text(attrs, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            raise TypeError(f"{said}: keep_aspect_ratio_policy {policy!r} is not supported "
                            "(stretch is).")
        if there[0] != here[0]:
            raise TypeError(f"{said}: it resizes the channel axis ({here} -> {there}); preimage "
                            "upsamples (H, W) only.")
        target = {"size": there[1:]}  # what `sizes` says, as the graph computed it
    else:
        raise TypeError(f"{said}: it has neither scales nor sizes.")
    kind = "nearest" if mode == "nearest" else "bilinear"
    align = transform == "align_corners" if kind == "bilinear" else None
    up = UpsampleOperator(here, mode=kind, align_corners=align, **target)
    if tuple(up.out_shape) != tuple(there):
        raise TypeError(f"{said}: torch's upsampling gives shape {up.out_shape}, the graph "
                        f"{there}.")
    rule = f"mode {mode!r}, coordinate_transformation_mode {transform!r}" + (
        f", nearest_mode {nearest!r}" if mode == "nearest" else "")
    for axis in (2, 3):
        n_in, n_out = here[axis - 1], there[axis - 1]
        factor = target["scale_factor"][axis - 2] if "scale_factor" in target else None
        one_axis = {"size": (n_out, 1)} if factor is None else {"scale_factor": (factor, 1.0)}
        line = UpsampleOperator((1, n_in, 1), mode=kind, align_corners=align, **one_axis)
        try:
            theirs = _onnx_resize_matrix(node, opsets, axis, n_in, n_out, factor)
        except Exception as exc:
            raise TypeError(f"{said}: onnx's reference evaluator cannot run it ({rule}) to check "
                            f"it: {type(exc).__name__}: {str(exc)[:120]}") from exc
        # Both what the solvers see (the sparse matrix) and the forward pass (torch, which
        # copies an axis whose size a scale leaves as it is) must be ONNX's interpolation.
        ours = line.matrix()
        computed = line.apply(np.eye(n_in)).T
        if (ours.shape != theirs.shape or abs(ours - sparse.csr_matrix(theirs)).max() > 1e-9
                or np.abs(computed - theirs).max() > 1e-9):
            raise TypeError(f"{said}: Resize with {rule} and these scales / sizes does not "
                            f"interpolate as torch's {kind} upsampling, which preimage models, "
                            f"does (along axis {axis}, by onnx's reference evaluator).")
    return chain.Linear(up, None, node.name or node.op_type)


def _onnx_resize_matrix(node: Any, opsets: dict[str, int], axis: int, n_in: int, n_out: int,
                        scale: float | None) -> np.ndarray:
    """ONNX's (n_out, n_in) interpolation along one axis: the node's own Resize (its
    attributes, one axis scaled) run by onnx's reference evaluator on unit vectors."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    shape = [1, n_in, 1, 1]
    shape[axis] = n_in
    feeds = {"x": np.eye(n_in).reshape(shape), "roi": np.zeros(0, np.float32)}
    if scale is not None:
        feeds["scales"] = np.ones(4, np.float32)
        feeds["scales"][axis] = scale
    else:
        feeds["scales"] = np.zeros(0, np.float32)
        feeds["sizes"] = np.array(shape, np.int64)
        feeds["sizes"][axis] = n_out
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "axes"}
    probe = helper.make_node("Resize", list(feeds), ["y"], **attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = ReferenceEvaluator(probe, opsets=opsets).run(None, feeds)[0]
    return np.asarray(y, dtype=np.float64).reshape(n_in, -1).T


def _check_forward(layers: list[Layer], steps: list[chain.Step], nodes: list[tuple[str, str, int]],
                   codes: np.ndarray, run: dict[str, Any], rtol: float, path: str) -> None:
    """Refuse a network whose forward pass on the codes is not the reference evaluator's.

    A safety net under the reading of each node: an attribute misread or a rule of
    ONNX that differs from torch's shows here. The blame goes to the first node whose
    output already differs, running the steps one by one.
    """
    batch = len(codes)
    expected = _per_code(run[nodes[-1][1]], batch)
    if expected is not None and not np.all(np.isfinite(expected)):
        return  # (the model overflows its own precision on these codes: nothing to compare)
    h = np.asarray(codes, dtype=np.float64).reshape(batch, -1)
    for layer in layers:
        h = layer.forward(h)
    if expected is not None and _agrees(h, expected, rtol):
        return
    if expected is None or expected.shape != h.shape:
        error = f"its output has shape {np.shape(run[nodes[-1][1]])}, the network's {h.shape}"
    else:
        error = (f"output max |difference| {np.abs(h - expected).max():.2g}, max |output| "
                 f"{np.abs(expected).max():.2g}, allowed {rtol:g} of it")
    culprit, h, start = nodes[-1][0], np.asarray(codes, dtype=np.float64).reshape(batch, -1), 0
    for where, out, end in nodes:
        for step in steps[start:end]:
            h = _apply_step(step, h)
        start = end
        value = _per_code(run[out], batch) if out in run else h
        if value is None or (np.all(np.isfinite(value)) and not _agrees(h, value, rtol)):
            culprit = where
            break
    raise TypeError(
        f"{path}: {culprit}: the network read differs from onnx's reference evaluator on "
        f"random codes ({error}): preimage misreads this node and refuses the model."
    )


def _per_code(value: Any, batch: int) -> np.ndarray | None:
    """A tensor of the run as (batch, -1) float64, or None where its first axis is not the
    batch (a node that mixes samples)."""
    arr = np.asarray(value, dtype=np.float64)
    return arr.reshape(batch, -1) if arr.ndim >= 1 and arr.shape[0] == batch else None


def _agrees(ours: np.ndarray, theirs: np.ndarray, rtol: float) -> bool:
    if ours.shape != theirs.shape:
        return False
    scale = max(float(np.abs(theirs).max(initial=0.0)), float(np.abs(ours).max(initial=0.0)))
    return bool(np.abs(ours - theirs).max(initial=0.0) <= rtol * scale)


def _apply_step(step: chain.Step, h: np.ndarray) -> np.ndarray:
    """One step of the chain on a batch of flattened tensors (as `chain.fold` composes them)."""
    if isinstance(step, chain.Linear):
        out = step.op.apply(h)
        return out if step.bias is None else out + step.bias
    if isinstance(step, chain.Affine):
        return step.scale * h + step.shift
    if isinstance(step, chain.Act):
        return step.activation(h)
    return h  # a Reshape: the flattened tensor is the same
