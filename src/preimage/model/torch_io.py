"""PyTorch interop: a generator's layers read out of an ``nn.Module``, and back.

`layers_from_module` follows the module's computation with ``torch.fx``
(symbolic tracing, then shapes from one forward pass of an example code) or,
where tracing meets Python control flow (the DCGAN generator of PyTorch's
examples tests ``input.is_cuda``), by recording the leaf modules one forward
pass calls, in order, checking that each takes exactly the output of the one
before (or a view of it in another shape), unchanged in place, and that the
forward reads no value off the data (``if h.sum() > 0:`` would make the layers
differ from code to code; a branch on shapes or the device is fine). TorchScript
modules are refused: pass the nn.Module they came from. Each operation
becomes a step of `preimage.model.chain`, which folds them into layers.
Supported: Linear, Conv2d and ConvTranspose2d (groups = 1, zero padding),
BatchNorm1d/2d in eval mode, Upsample / interpolate (nearest, bilinear; no
antialias), Flatten, Unflatten, view / reshape (to a fixed shape or to
``h.size(0)`` first), Dropout and Identity in eval mode, and the activations
ReLU, LeakyReLU, ELU, Softplus, Tanh, Sigmoid (as modules, as ``torch`` / ``F``
functions or as tensor methods). Anything else raises a TypeError that names
the operation and its module path. Last, the layers read are run against the
module's own forward on a few random codes: whatever the reading missed is
refused there (a TypeError) rather than inverted as a different function.

Kept apart so that the solvers themselves work on NumPy arrays only.
"""

from __future__ import annotations

import contextlib
import io
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from preimage.model import chain
from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.structured import Conv2dOperator, UpsampleOperator
from preimage.model.validation import check_finite, to_float_array

Shape = tuple[int, ...]


def default_device() -> Any:
    """CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_to_numpy(t: Any, name: str = "tensor") -> np.ndarray:
    """A float64 NumPy copy of a tensor or array of real numbers (else a TypeError
    naming it, `preimage.model.validation.to_float_array`)."""
    return to_float_array(t, name)


def _finite(t: Any, name: str) -> np.ndarray:
    """tensor_to_numpy, refusing NaN, inf and huge values by name."""
    arr = tensor_to_numpy(t, name)
    check_finite(arr, name)
    return arr


def tensor_dtype(t: Any) -> str:
    """The dtype name of a tensor or array ("float32", "float64", ...)."""
    return str(getattr(t, "dtype", "float64")).replace("torch.", "")


def torch_dtype(value: Any, name: str = "dtype") -> Any:
    """A torch floating dtype from itself or its name ("float32"), else a TypeError
    naming `name`."""
    import torch

    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value, None) if value.isidentifier() else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f'`{name}` must be a torch floating dtype such as torch.float32 (or '
                        f'its name, "float32"); got {value!r:.40}.')
    return dtype


# --- activations ------------------------------------------------------------------


def _activation_of_module(mod: Any) -> Activation | None:
    import torch.nn as nn

    if isinstance(mod, nn.ReLU):
        return Activation("relu")
    if isinstance(mod, nn.LeakyReLU):
        return _leaky(float(mod.negative_slope))
    if isinstance(mod, nn.ELU):
        return Activation("elu", alpha=float(mod.alpha))
    if isinstance(mod, nn.Softplus):
        return Activation("softplus", beta=float(mod.beta), threshold=float(mod.threshold))
    if isinstance(mod, nn.Tanh):
        return Activation("tanh")
    if isinstance(mod, nn.Sigmoid):
        return Activation("sigmoid")
    return None


def _leaky(slope: float) -> Activation:
    """A LeakyReLU of this slope (0: a ReLU, which torch computes then)."""
    return Activation("relu") if slope == 0 else Activation("leaky_relu", slope)


def _activation_of_function(target: Any, args: tuple, kwargs: dict) -> Activation | None:
    import torch
    import torch.nn.functional as F

    def arg(position: int, name: str, default: float) -> float:
        return float(kwargs.get(name, args[position] if len(args) > position else default))

    if target in (F.relu, torch.relu, "relu", "relu_"):
        return Activation("relu")
    if target in (F.leaky_relu, "leaky_relu"):
        return _leaky(arg(1, "negative_slope", 0.01))
    if target in (F.elu, "elu"):
        return Activation("elu", alpha=arg(1, "alpha", 1.0))
    if target in (F.softplus, "softplus"):
        return Activation("softplus", beta=arg(1, "beta", 1.0), threshold=arg(2, "threshold", 20.0))
    if target in (torch.tanh, F.tanh, "tanh"):
        return Activation("tanh")
    if target in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return Activation("sigmoid")
    return None


# --- one operation -> one step ------------------------------------------------------


def _check_eval(mod: Any, where: str) -> None:
    if mod.training:
        raise ValueError(
            f"{where!r} ({type(mod).__name__}) is in training mode, where its output depends on "
            "the batch (or is random); call `.eval()` on the module first."
        )


def _steps_of_module(mod: Any, where: str, in_shape: Shape, out_shape: Shape) -> list[chain.Step]:
    """The steps of one leaf module that maps inputs of in_shape to out_shape (no batch)."""
    import torch.nn as nn

    if isinstance(mod, nn.Linear):
        if len(in_shape) != 1:
            raise TypeError(f"{where!r} (Linear) gets inputs of shape {in_shape}; preimage needs a "
                            "Linear layer on flat vectors (add nn.Flatten before it).")
        bias = None if mod.bias is None else _finite(mod.bias, f"{where}.bias")
        return [chain.Linear(DenseOperator(tensor_to_numpy(mod.weight), name=f"{where}.weight"),
                             bias, where)]
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
        transposed = isinstance(mod, nn.ConvTranspose2d)
        kind = type(mod).__name__
        if mod.groups != 1:
            raise TypeError(f"{where!r} ({kind}) has groups={mod.groups}; preimage supports "
                            "groups = 1 only.")
        if getattr(mod, "padding_mode", "zeros") != "zeros" or isinstance(mod.padding, str):
            raise TypeError(f"{where!r} ({kind}) pads with {mod.padding_mode!r} / "
                            f"{mod.padding!r}; preimage supports zero padding given as numbers.")
        if len(in_shape) != 3:
            raise TypeError(f"{where!r} ({kind}) gets inputs of shape {in_shape}, not (C, H, W).")
        extra = {"output_padding": mod.output_padding} if transposed else {}
        op = Conv2dOperator(_finite(mod.weight, f"{where}.weight"), in_shape, stride=mod.stride,
                            padding=mod.padding, dilation=mod.dilation, transposed=transposed,
                            **extra)
        if tuple(op.out_shape) != tuple(out_shape):
            raise TypeError(f"{where!r} ({kind}): output shape {op.out_shape} differs from "
                            f"torch's {out_shape}.")
        bias = None
        if mod.bias is not None:
            bias = np.repeat(_finite(mod.bias, f"{where}.bias"), op.out_shape[1] * op.out_shape[2])
        return [chain.Linear(op, bias, where)]
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        _check_eval(mod, where)
        if mod.running_mean is None:
            raise TypeError(f"{where!r} (BatchNorm) keeps no running statistics "
                            "(track_running_stats=False): its output depends on the batch.")
        weight = _finite(mod.weight, f"{where}.weight") if mod.affine else None
        bias = _finite(mod.bias, f"{where}.bias") if mod.affine else None
        return [chain.batch_norm_affine(_finite(mod.running_mean, f"{where}.running_mean"),
                                        _finite(mod.running_var, f"{where}.running_var"),
                                        mod.eps, weight, bias,
                                        in_shape, where)]
    if isinstance(mod, nn.Upsample):
        return [_upsample_step(f"{where!r} (Upsample)", where, in_shape, out_shape, size=mod.size,
                               scale_factor=mod.scale_factor, mode=mod.mode,
                               align_corners=mod.align_corners,
                               recompute_scale_factor=mod.recompute_scale_factor)]
    if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
        _check_eval(mod, where)
        return []
    if isinstance(mod, nn.Identity):
        return []
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return [chain.Reshape(tuple(out_shape), where)]
    try:
        act = _activation_of_module(mod)
    except ValueError as exc:  # a setting preimage cannot invert (a negative slope)
        raise ValueError(f"{where!r} ({type(mod).__name__}): {exc}") from exc
    if act is not None:
        return [chain.Act(act, where)]
    raise TypeError(
        f"Unsupported layer {where!r} ({type(mod).__name__}): preimage handles Linear, Conv2d, "
        "ConvTranspose2d, BatchNorm, Upsample, Flatten/Unflatten, Dropout, Identity and the "
        "activations ReLU, LeakyReLU, ELU, Softplus, Tanh, Sigmoid."
    )


def _readable(mod: Any) -> bool:
    """Whether `_steps_of_module` knows this kind of module."""
    import torch.nn as nn

    kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.Upsample, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
             nn.Flatten, nn.Unflatten)
    if isinstance(mod, (*kinds, nn.LeakyReLU)):  # (a bad slope is named when it is read)
        return True
    return _activation_of_module(mod) is not None


_RESHAPES = ("view", "reshape", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze")


def _steps_of_function(
    node: Any, where: str, in_shape: Shape, out_shape: Shape
) -> list[chain.Step]:
    import torch
    import torch.nn.functional as F

    target = node.target
    try:
        act = _activation_of_function(target, tuple(node.args), dict(node.kwargs))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{node.format_node()} ({where}): {exc}") from exc
    if act is not None:
        return [chain.Act(act, where)]
    if target in (operator.pos,) or target in _RESHAPES or target in (
        torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze
    ):
        return [chain.Reshape(tuple(out_shape), where)] if in_shape != out_shape else []
    if target is F.interpolate:
        return [_interpolate_step(node, where, in_shape, out_shape)]
    raise TypeError(
        f"Unsupported operation {node.format_node()} ({where}): preimage handles linear "
        "layers, batch norm, reshapes and elementwise monotone activations."
    )


def _upsample_step(
    what: str, where: str, in_shape: Shape, out_shape: Shape, *, size: Any, scale_factor: Any,
    mode: str, align_corners: bool | None, recompute_scale_factor: bool | None,
) -> chain.Linear:
    """The step of one ``F.interpolate`` / ``nn.Upsample`` (`what` names it in errors)."""
    if len(in_shape) != 3:
        raise TypeError(f"{what} gets inputs of shape {in_shape}, not (C, H, W).")
    if recompute_scale_factor and size is None and scale_factor is not None:
        # torch then takes the size floor(in * scale) and interpolates with the ratio
        # in / out, as if called with that size: not with 1 / scale_factor.
        factors = (tuple(scale_factor) if isinstance(scale_factor, (tuple, list))
                   else (scale_factor, scale_factor))
        if len(factors) != 2:
            raise TypeError(f"{what} has {len(factors)} scale factors for (C, H, W) inputs.")
        size = tuple(int(np.floor(n * float(f)))
                     for n, f in zip(in_shape[1:], factors, strict=True))
        scale_factor = None
    try:
        op = UpsampleOperator(in_shape, size=size, scale_factor=scale_factor, mode=mode,
                              align_corners=align_corners)
    except (TypeError, ValueError) as exc:  # an unsupported mode, no size nor scale
        raise TypeError(f"{what}: {exc}") from exc
    if tuple(op.out_shape) != tuple(out_shape):
        raise TypeError(f"{what}: output shape {op.out_shape} differs from torch's {out_shape}.")
    return chain.Linear(op, None, where)


#: The arguments of ``F.interpolate`` that `_upsample_step` reads; any other one must keep
#: its default (``antialias=True`` low-pass filters first, which UpsampleOperator does not).
_INTERPOLATE_READ = ("input", "size", "scale_factor", "mode", "align_corners",
                     "recompute_scale_factor")


def _interpolate_step(node: Any, where: str, in_shape: Shape, out_shape: Shape) -> chain.Linear:
    """The step of an ``F.interpolate`` node, its arguments read by name or position."""
    import inspect

    import torch.fx as fx
    import torch.nn.functional as F

    what = f"{node.format_node()} ({where})"
    signature = inspect.signature(F.interpolate)
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise TypeError(f"{what}: cannot read its arguments ({exc}).") from exc
    for name, value in bound.arguments.items():
        if name == "input":
            continue
        if isinstance(value, fx.Node) or (
            isinstance(value, (tuple, list)) and any(isinstance(v, fx.Node) for v in value)
        ):
            raise TypeError(f"{what}: its {name} is computed from a tensor; preimage needs a "
                            "fixed size or scale_factor.")
        if name not in _INTERPOLATE_READ and value != signature.parameters[name].default:
            raise TypeError(f"{what}: {name}={value!r} is not supported; preimage's upsampling "
                            f"reads {', '.join(_INTERPOLATE_READ[1:])} only.")
    args = {name: bound.arguments.get(name, signature.parameters[name].default)
            for name in _INTERPOLATE_READ[1:]}
    return _upsample_step(what, where, in_shape, out_shape, **args)


# --- following the module ----------------------------------------------------------


def _example_input(
    module: Any, input_shape: Sequence[int] | None, first: Sequence[Any] = ()
) -> tuple[Shape, Any]:
    """The code shape (given, or read off the first layer) and the module's parameter dtype.

    `first`: the modules in the order the computation uses them, where known
    (else the module's own order).
    """
    import torch
    import torch.nn as nn

    params = list(module.parameters())
    dtype = params[0].dtype if params else torch.float32
    if input_shape is not None:
        return tuple(int(v) for v in input_shape), dtype
    for mod in [*first, *module.modules()]:
        if isinstance(mod, nn.Linear):
            return (int(mod.in_features),), dtype
        if isinstance(mod, nn.ConvTranspose2d):
            return (int(mod.in_channels), 1, 1), dtype  # DCGAN codes: (nz, 1, 1)
        if isinstance(mod, nn.Conv2d):
            raise TypeError(
                f"{type(module).__name__} starts with a Conv2d: pass the shape of its input, "
                "`input_shape=(C, H, W)`."
            )
    raise TypeError(f"No linear layer found in {type(module).__name__}.")


def _candidate_shapes(shape: Shape, input_shape: Sequence[int] | None) -> list[Shape]:
    """The code shapes to try, in order: the one given, else the one guessed, except that a
    guess of DCGAN codes (nz, 1, 1) tries the flat (nz,) first.

    Why: a generator whose forward takes (B, nz) and views it as (B, nz, 1, 1) for its
    first ConvTranspose2d accepts both, and its codes are the flat ones (as its ONNX
    export says); one that takes (B, nz, 1, 1) fails on flat codes (a ConvTranspose2d
    takes no 2-D input), so the first shape whose forward runs is the model's own.
    """
    if input_shape is None and len(shape) == 3 and shape[1:] == (1, 1):
        return [shape[:1], shape]
    return [shape]


def _first_shape_that_runs(candidates: list[Shape], attempt: Callable[[Shape], Any],
                           errors: type[BaseException]) -> tuple[Shape, Any]:
    """(shape, attempt(shape)) for the first of `candidates` on which `attempt` raises no
    `errors`; the last one's error is raised (a flat DCGAN code refused by a generator
    that takes (nz, 1, 1) moves on to the next shape)."""
    for shape in candidates[:-1]:
        try:
            return shape, attempt(shape)
        except errors:
            continue
    return candidates[-1], attempt(candidates[-1])


class _Untraceable(Exception):
    """torch.fx could not trace the forward (the message says why; the cause is chained).

    Not a TypeError, which `layers_from_module` passes on as a refusal of the loader's own.
    """


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def _size_kind(node: Any, tensors: set[Any], sizes: set[Any]) -> str | None:
    """"sizes" for x.shape / x.size() of a tensor x of the chain, "batch" for their entry 0
    and x.size(0) (the batch size), "other" for another entry, else None."""
    import torch.fx as fx

    args = tuple(node.args)
    if not args or not isinstance(args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target == "size" and args[0] in tensors:
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None:
            return "sizes"
        return "batch" if dim == 0 else "other"
    if node.op == "call_function" and node.target is getattr and len(args) == 2 and (
        args[0] in tensors and args[1] == "shape"
    ):
        return "sizes"
    if node.op == "call_function" and node.target is operator.getitem and args[0] in sizes:
        return "batch" if len(args) == 2 and isinstance(args[1], int) and args[1] == 0 else (
            "other")
    return None


def _reshape_with_batch_first(node: Any, batch: set[Any]) -> bool:
    """Whether node is a view / reshape to (batch size, fixed sizes...)."""
    import torch
    import torch.fx as fx

    args = tuple(node.args)
    if node.op == "call_method" and node.target in ("view", "reshape") and not node.kwargs:
        dims = args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
    elif node.op == "call_function" and node.target is torch.reshape:
        dims = args[1] if len(args) > 1 else node.kwargs.get("shape")
    else:
        return False
    if not isinstance(dims, (tuple, list)) or not dims or not (
        isinstance(dims[0], fx.Node) and dims[0] in batch
    ):
        return False
    return not any(isinstance(d, fx.Node) for d in dims[1:])


def _traced_steps(
    module: Any, entry: str, input_shape: Sequence[int] | None
) -> tuple[list[chain.Step], Shape]:
    """Steps from torch.fx: symbolic tracing, shapes from one forward pass; and the code shape."""
    import torch
    import torch.fx as fx
    import torch.nn as nn
    from torch.fx.passes.shape_prop import ShapeProp

    class Entry(nn.Module):
        def __init__(self, root: nn.Module) -> None:
            super().__init__()
            self.root = root

        def forward(self, x: Any) -> Any:
            return getattr(self.root, entry)(x)

    wrapper = Entry(module) if entry != "forward" else module
    try:
        graph_module = fx.symbolic_trace(wrapper)
    except Exception as exc:  # control flow, or user code meeting a Proxy (int(z.size(0)))
        # Not a refusal of ours, though it may be a TypeError: the caller falls back on
        # recording the modules one forward pass calls.
        raise _Untraceable(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    submodules = dict(graph_module.named_modules())
    used = [submodules[n.target] for n in graph_module.graph.nodes if n.op == "call_module"]
    prefix = "root." if entry != "forward" else ""
    for node in graph_module.graph.nodes:  # name what cannot be read before running it
        if node.op == "call_module" and not _readable(submodules[node.target]):
            where = str(node.target)[len(prefix):] if str(node.target).startswith(prefix) else (
                str(node.target))
            _steps_of_module(submodules[node.target], where, (), ())  # raises, naming it
    guess, dtype = _example_input(module, input_shape, used)
    candidates = _candidate_shapes(guess, input_shape)

    def propagate(shape: Shape) -> io.StringIO:
        # ShapeProp prints the traceback of a failing node to stderr (traceback.print_exc)
        # before raising; the error below names it, and chains the original.
        printed = io.StringIO()
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(graph_module).propagate(torch.zeros((2, *shape), dtype=dtype))
        return printed

    try:
        shape, printed = _first_shape_that_runs(candidates, propagate, Exception)
    except Exception as exc:  # the module's own error on the example input
        cause = exc.__cause__ or exc  # (ShapeProp wraps it: "ShapeProp error for: node=")
        raise TypeError(
            f"{type(module).__name__}.{entry} fails on codes of shape {candidates[-1]} "
            f"({type(cause).__name__}: {_first_line(cause)}); pass "
            "the shape of one code as `input_shape`."
        ) from exc
    sys.stderr.write(printed.getvalue())  # what the forward itself printed, if anything
    prefix = "root." if entry != "forward" else ""
    steps: list[chain.Step] = []
    previous = None
    tensors: set[Any] = set()  # the chain's results so far, each with the batch first
    sizes: set[Any] = set()  # x.shape / x.size() of one of them
    batch: set[Any] = set()  # x.size(0), x.shape[0]: the batch size
    other: set[Any] = set()  # x.size(1), x.shape[1:], ...: read only to be refused
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            previous = node
            tensors.add(node)
            continue
        kind = _size_kind(node, tensors, sizes)
        if kind is not None:
            {"batch": batch, "sizes": sizes, "other": other}[kind].add(node)
            continue
        read = [a for a in node.all_input_nodes if a in sizes or a in batch or a in other]
        if read and not _reshape_with_batch_first(node, batch):
            raise TypeError(
                f"{type(module).__name__}.{entry}: operation {node.format_node()} uses a "
                f"tensor's size ({', '.join(str(a) for a in read)}); preimage reads sizes only "
                "as the batch dimension of a view / reshape (h.view(h.size(0), C, H, W))."
            )
        if node.op == "output":
            if node.args[0] is not previous:
                raise TypeError(f"{type(module).__name__}.{entry} does not return the result of "
                                "its last operation.")
            break
        if node.op == "get_attr":
            raise TypeError(f"{type(module).__name__}.{entry} uses a tensor attribute "
                            f"({node.target}) directly: not a chain of layers.")
        inputs = [a for a in node.all_input_nodes if a not in batch]
        if len(inputs) != 1 or inputs[0] is not previous:
            raise TypeError(
                f"{type(module).__name__}.{entry} is not a simple chain of layers: operation "
                f"{node.format_node()} does not take exactly the previous result."
            )
        in_shape = tuple(previous.meta["tensor_meta"].shape[1:])
        out_shape = tuple(node.meta["tensor_meta"].shape[1:])
        previous = node
        tensors.add(node)
        if node.op == "call_module":
            where = str(node.target)
            where = where[len(prefix):] if where.startswith(prefix) else where
            steps += _steps_of_module(submodules[node.target], where, in_shape, out_shape)
        else:
            steps += _steps_of_function(node, str(node.name), in_shape, out_shape)
    return steps, shape


#: Tensor methods and torch functions whose result is a Python value read off a tensor's
#: entries (not its shape, dtype or device): what control flow on the data goes through.
_VALUE_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "__complex__",
                          "item", "tolist", "numpy", "__array__", "equal", "allclose",
                          "is_nonzero"})


class _BranchesOnData(Exception):
    """A forward read a value off a tensor computed from the code (the message says how)."""


def _watch_data_reads(code: Any) -> Any:
    """A torch function mode that raises `_BranchesOnData` where the forward reads a Python
    value off a tensor computed from `code` (``if h.sum() > 0:``, ``h.max().item()``).

    Why: with such a branch the forward computes a different chain of layers for different
    codes, and one recorded pass sees only the branch its example took; a branch on shapes
    (``if z.dim() == 2``, ``input.is_cuda``) reads no entries and passes. Which tensors come
    from the code is followed through every torch function the forward calls (one whose
    arguments hold such a tensor returns such tensors); the mode is off inside each call, so
    torch's own code (F.interpolate's checks) is not watched, only the module's.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    def tensors(value: Any) -> list[Any]:
        """The tensors in a function's arguments or result (nested in tuples, lists, dicts)."""
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (tuple, list)):
            return [t for v in value for t in tensors(v)]
        return []

    class Watch(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.derived: dict[int, Any] = {id(code): code}  # (kept alive: ids stay unique)

        def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            tainted = any(id(t) in self.derived for t in tensors((args, kwargs)))
            if tainted and getattr(func, "__name__", "") in _VALUE_READS:
                raise _BranchesOnData(getattr(func, "__name__", str(func)))
            result = func(*args, **kwargs)
            if tainted:
                self.derived.update((id(t), t) for t in tensors(result))
            return result

    return Watch()


def _recorded_steps(module: Any, entry: str, shape: Shape) -> list[chain.Step]:
    """Steps from the leaf modules one forward pass calls, checked to form a chain.

    Between two modules the tensor may only be viewed in another shape (h.view(B, C, H, W));
    an operation in place (F.relu(h, inplace=True), h.mul_(2)) keeps the tensor object but
    bumps its version counter, which is how it is caught. A forward that reads values off
    the data (a branch on them) is refused: the pass would record one branch only.
    """
    import torch

    # (name, module, its input and the input's version when called, its output and the
    # output's version when it returned)
    calls: list[tuple[str, Any, Any, int, Any, int]] = []
    versions: dict[Any, int] = {}
    handles = []
    names = {mod: name for name, mod in module.named_modules()}

    def before(m: Any, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            versions[m] = args[0]._version

    def after(m: Any, args: tuple, out: Any) -> None:
        given = args[0] if args else None
        calls.append((names[m], m, given, versions.pop(m, -1), out,
                      out._version if isinstance(out, torch.Tensor) else -1))

    for mod in module.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_pre_hook(before))
            handles.append(mod.register_forward_hook(after))
    x = torch.zeros((2, *shape), dtype=_example_input(module, shape)[1])
    name = type(module).__name__
    try:
        with torch.no_grad(), _watch_data_reads(x):
            out = getattr(module, entry)(x)
    except _BranchesOnData as exc:
        after = f"after {calls[-1][0]!r} ({type(calls[-1][1]).__name__})" if calls else (
            "before its first layer")
        raise TypeError(
            f"{name}.{entry} branches on its input: it reads the value of a tensor computed "
            f"from the code ({exc}() {after}), as `if h.sum() > 0:` or `h.max().item()` do, so "
            "its layers differ from code to code and cannot be read as one fixed chain. Pass "
            "the nn.Sequential of the layers it applies."
        ) from None
    except Exception as exc:  # the module's own error on the example input
        raise TypeError(
            f"{name}.{entry} fails on codes of shape {shape} ({type(exc).__name__}: "
            f"{_first_line(exc)}); pass the shape of one code as `input_shape`."
        ) from exc
    finally:
        for h in handles:
            h.remove()
    steps: list[chain.Step] = []
    previous, previous_version, previous_name = x, x._version, "the code"
    for where, mod, given, given_version, result, result_version in calls:
        if given is not previous and not _viewed(given, previous):
            raise TypeError(
                f"{name}.{entry} is not a chain of layers: {where} "
                f"({type(mod).__name__}) does not take the output of the layer before it "
                "(an operation between them that is not a module?). Pass an nn.Sequential."
            )
        if given_version != previous_version:
            raise TypeError(
                f"{name}.{entry} changes {previous_name} in place before {where} "
                f"({type(mod).__name__}) takes it (an in-place operation that is not a module, "
                "such as F.relu(h, inplace=True) or h.mul_(2)); preimage cannot read it."
            )
        if given is not previous:
            steps.append(chain.Reshape(tuple(given.shape[1:]), where))
        steps += _steps_of_module(mod, where, tuple(given.shape[1:]), tuple(result.shape[1:]))
        previous, previous_version, previous_name = result, result_version, f"the output of {where}"
    if out is not previous and not _viewed(out, previous):
        raise TypeError(f"{name}.{entry} does not return the output of its last "
                        "layer. Pass an nn.Sequential.")
    if isinstance(out, torch.Tensor) and out._version != previous_version:
        raise TypeError(f"{name}.{entry} changes {previous_name} in place before returning it "
                        "(an in-place operation that is not a module, such as h.tanh_()); "
                        "preimage cannot read it.")
    if out is not previous:
        steps.append(chain.Reshape(tuple(out.shape[1:]), "the output"))
    return steps


def _viewed(t: Any, base: Any) -> bool:
    """Whether tensor t is base's values, batch first, seen in another shape (a view / reshape
    of a contiguous tensor: the same memory, the same order)."""
    import torch

    return (isinstance(t, torch.Tensor) and isinstance(base, torch.Tensor)
            and t.dim() >= 1 and base.dim() >= 1 and t.shape[0] == base.shape[0]
            and t.numel() == base.numel() and t.is_contiguous() and base.is_contiguous()
            and t.data_ptr() == base.data_ptr() and t.dtype == base.dtype)


#: How far the layers read may be from the module's own forward, relative to the scale of the
#: outputs, by the module's dtype: its own rounding, a few hundred units of its last place.
_FORWARD_RTOL = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _check_forward(module: Any, entry: str, layers: Sequence[Layer], shape: Shape,
                   dtype: Any) -> None:
    """Refuse (TypeError) when the layers do not compute the module's own forward.

    Catches whatever the reading missed (an operation hidden from the hooks, an argument
    not read). One forward pass of each on three random codes (a batch other than the two
    shapes were read with), under no_grad: the module is left as it was (a batch norm in
    training mode was refused before).
    """
    import torch

    name = type(module).__name__
    generator = torch.Generator().manual_seed(0)  # (torch's global generator left alone)
    z = torch.randn((3, *shape), generator=generator, dtype=torch.float64).to(dtype)
    try:
        with torch.no_grad():
            out = getattr(module, entry)(z)
    except Exception as exc:  # a forward that hard-codes the batch size
        raise TypeError(f"{name}.{entry} fails on a batch of 3 codes ({type(exc).__name__}: "
                        f"{_first_line(exc)}); preimage needs a batch dimension first.") from exc
    x = tensor_to_numpy(out, f"the output of {name}.{entry}").reshape(3, -1)
    h = tensor_to_numpy(z, "the codes").reshape(3, -1)  # the values the module was given
    scale = float(np.abs(x).max(initial=0.0))
    for layer in layers:  # `preimage.Network.forward`
        h = layer.forward(h)
        scale = max(scale, float(np.abs(h).max(initial=0.0)))  # (each layer's outputs)
    if h.shape != x.shape:
        raise TypeError(f"{name}.{entry} returns {x.shape[1]} values per code, the layers read "
                        f"from it {h.shape[1]}: it does something the chain of layers does not.")
    diff = float(np.abs(h - x).max(initial=0.0))
    rtol = _FORWARD_RTOL.get(str(dtype).replace("torch.", ""), 1e-2)
    if not diff <= rtol * scale:  # (NaN included)
        raise TypeError(
            f"{name}.{entry} does something the chain of layers read from it does not: on random "
            f"codes their outputs differ by up to {diff:.3g} ({diff / scale if scale else diff:.2g}"
            f" of the outputs' scale {scale:.3g}; {str(dtype).replace('torch.', '')} allows "
            f"{rtol:g}). An operation preimage did not see (in place, between modules)?"
        )


def layers_from_module(
    module: Any, *, entry: str = "forward", input_shape: Sequence[int] | None = None
) -> tuple[list[Layer], str, Shape, Shape]:
    """The layers of a module's computation, its parameters' dtype and its input / output shapes."""
    import torch
    import torch.nn as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module; got {type(module).__name__}.")
    # torch.compile's wrapper: the layers are those of the module it compiled (tracing the
    # wrapper fails inside dynamo)
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    from torch.nn.modules.lazy import LazyModuleMixin

    for where, mod in module.named_modules():
        what = type(module).__name__ if not where else (
            f"{type(module).__name__}.{where} ({type(mod).__name__})")
        # TorchScript keeps a compiled graph, not the Python forward that fx traces and the
        # hooks record (it takes no forward hooks either): refused before any of them is tried
        if isinstance(mod, torch.jit.ScriptModule):
            raise TypeError(
                f"{what} is a TorchScript module (from torch.jit.script, torch.jit.trace or "
                "torch.jit.load), which preimage cannot read: pass the original nn.Module, or "
                "export it to ONNX and read that with Network.from_onnx."
            )
        # a lazy module (nn.LazyLinear, ...) takes its shapes from its first input: the
        # loader's example codes would fix them for good, in the caller's module
        if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
            raise TypeError(
                f"{what} is a lazy module whose weights are not made yet: run the model once "
                "on a batch of its codes (or load its weights) first, so that its shapes are "
                "its own and not those of preimage's example input."
            )
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise TypeError(f"{type(module).__name__} has weights on the 'meta' device, which hold "
                        "no values: load its weights first (e.g. module.to_empty(device='cpu') "
                        "then load_state_dict).")
    if not isinstance(entry, str) or not callable(getattr(module, entry, None)):
        raise TypeError(f"`entry`: the module {type(module).__name__} has no method "
                        f"{entry!r:.40}.")
    # Before any forward pass (the shapes come from one): a batch norm in training mode
    # would update its running statistics, changing the caller's module.
    for where, mod in module.named_modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout1d,
                            nn.Dropout2d, nn.AlphaDropout)):
            _check_eval(mod, where)
    if input_shape is not None and (
        isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence)
        or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in input_shape)
    ):
        raise TypeError(
            f"`input_shape` must be the shape of one code, positive integers such as (20,) or "
            f"(100, 1, 1); got {input_shape!r:.40}."
        )
    # Reading runs the module's forward: a module that updates its own state there (a
    # spectral norm's power iteration in training mode) is put back as it was and refused
    # (first: the reading may fail because of the change, nn.utils.spectral_norm's forward
    # check then blamed "an operation preimage did not see")
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    error: BaseException | None = None
    try:
        read = _read(module, entry, input_shape)
    except BaseException as exc:  # (re-raised below unless the buffers say why)
        error = exc
    changed = _restore_buffers(module, buffers)
    if changed:
        raise ValueError(
            f"{type(module).__name__}.{entry} changes its buffers when run "
            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): a module in "
            "training mode is not one function; call .eval() on it first."
        ) from error
    if error is not None:
        raise error
    layers, dtype, shape, out_shape = read
    return layers, str(dtype).replace("torch.", ""), shape, out_shape


def _read(module: Any, entry: str, input_shape: Sequence[int] | None
          ) -> tuple[list[Layer], Any, Shape, Shape]:
    """`layers_from_module` once the module is checked: layers, dtype, shapes."""
    try:
        steps, shape = _traced_steps(module, entry, input_shape)
    except TypeError:  # a refusal of the loader's own (fx's failures come as _Untraceable)
        raise
    except Exception as traced:  # fx raises many kinds on data-dependent control flow
        why = str(traced) if isinstance(traced, _Untraceable) else (
            f"{type(traced).__name__}: {_first_line(traced)}")
        candidates = _candidate_shapes(_example_input(module, input_shape)[0], input_shape)
        try:
            shape, steps = _first_shape_that_runs(
                candidates, lambda shape: _recorded_steps(module, entry, shape), TypeError)
        except TypeError as exc:
            raise TypeError(f"{exc} (symbolic tracing failed too: {why})") from exc
    layers, out_shape = chain.fold(steps, shape)
    dtype = _example_input(module, shape)[1]
    _check_forward(module, entry, layers, shape, dtype)
    return layers, dtype, shape, out_shape


def _restore_buffers(module: Any, saved: dict[str, Any]) -> list[str]:
    """Put the module's buffers back to `saved`; the names of those that had changed."""
    import torch

    changed = []
    with torch.no_grad():
        for name, b in module.named_buffers():
            old = saved.get(name)
            if old is not None and old.shape == b.shape and not torch.equal(old, b):
                b.copy_(old)
                changed.append(name)
    return changed


def module_from_layers(layers: Sequence[Layer], dtype: Any = None) -> Any:
    """An ``nn.Sequential`` computing the layers on flattened inputs (float64 by default)."""
    import torch

    dtype = dtype or torch.float64
    with torch.random.fork_rng(devices=[]):  # (nn.Linear's initial draw: not the caller's RNG)
        return _sequential(layers, dtype)


def _sequential(layers: Sequence[Layer], dtype: Any) -> Any:
    import torch
    import torch.nn as nn

    mods: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer.weight, DenseOperator):
            lin = nn.Linear(layer.in_width, layer.out_width, bias=layer.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(np.asarray(layer.weight.matrix())))
                if layer.bias is not None:
                    lin.bias.copy_(torch.tensor(layer.bias))
            mods.append(lin)
        else:
            mods.append(layer.weight.torch_module())
            if layer.bias is not None:
                mods.append(_Bias(layer.bias))
        act = layer.activation.module()
        if act is not None:
            mods.append(act)
    return nn.Sequential(*mods).to(dtype)


def _Bias(bias: np.ndarray) -> Any:
    import torch
    from torch import nn

    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("bias", torch.tensor(np.array(bias), dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias

    return Bias()
