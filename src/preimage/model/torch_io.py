"""PyTorch interop: a generator's layers read out of an ``nn.Module``, and back.

`layers_from_module` follows the module's computation with ``torch.fx``
(symbolic tracing, then shapes from one forward pass of an example code) or,
where tracing meets Python control flow (the DCGAN generator of PyTorch's
examples tests ``input.is_cuda``), by recording the leaf modules one forward
pass calls, in order, checking that each takes exactly the output of the one
before. Each operation becomes a step of `preimage.model.chain`, which folds
them into layers. Supported: Linear, Conv2d and ConvTranspose2d (groups = 1,
zero padding), BatchNorm1d/2d in eval mode, Upsample (nearest, bilinear),
Flatten, Unflatten, view / reshape, Dropout and Identity in eval mode, and the
activations ReLU, LeakyReLU, ELU, Softplus, Tanh, Sigmoid (as modules, as
``torch`` / ``F`` functions or as tensor methods). Anything else raises a
TypeError that names the operation and its module path.

Kept apart so that the solvers themselves work on NumPy arrays only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
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
        if len(in_shape) != 3:
            raise TypeError(f"{where!r} (Upsample) gets inputs of shape {in_shape}, not (C, H, W).")
        op = UpsampleOperator(in_shape, size=mod.size, scale_factor=mod.scale_factor,
                              mode=mod.mode, align_corners=mod.align_corners)
        if tuple(op.out_shape) != tuple(out_shape):
            raise TypeError(f"{where!r} (Upsample): output shape {op.out_shape} differs from "
                            f"torch's {out_shape}.")
        return [chain.Linear(op, None, where)]
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
        kwargs = dict(node.kwargs)
        op = UpsampleOperator(in_shape, size=kwargs.get("size"),
                              scale_factor=kwargs.get("scale_factor"),
                              mode=kwargs.get("mode", "nearest"),
                              align_corners=kwargs.get("align_corners"))
        return [chain.Linear(op, None, where)]
    raise TypeError(
        f"Unsupported operation {node.format_node()} ({where}): preimage handles linear "
        "layers, batch norm, reshapes and elementwise monotone activations."
    )


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
    graph_module = fx.symbolic_trace(wrapper)
    submodules = dict(graph_module.named_modules())
    used = [submodules[n.target] for n in graph_module.graph.nodes if n.op == "call_module"]
    prefix = "root." if entry != "forward" else ""
    for node in graph_module.graph.nodes:  # name what cannot be read before running it
        if node.op == "call_module" and not _readable(submodules[node.target]):
            where = str(node.target)[len(prefix):] if str(node.target).startswith(prefix) else (
                str(node.target))
            _steps_of_module(submodules[node.target], where, (), ())  # raises, naming it
    shape, dtype = _example_input(module, input_shape, used)
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(torch.zeros((2, *shape), dtype=dtype))
    except Exception as exc:  # the module's own error on the example input
        raise TypeError(
            f"{type(module).__name__}.{entry} fails on codes of shape {shape} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass "
            "the shape of one code as `input_shape`."
        ) from exc
    prefix = "root." if entry != "forward" else ""
    steps: list[chain.Step] = []
    previous = None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                raise TypeError(f"{type(module).__name__}.{entry} does not return the result of "
                                "its last operation.")
            break
        if node.op == "get_attr":
            raise TypeError(f"{type(module).__name__}.{entry} uses a tensor attribute "
                            f"({node.target}) directly: not a chain of layers.")
        inputs = [a for a in node.all_input_nodes]
        if len(inputs) != 1 or inputs[0] is not previous:
            raise TypeError(
                f"{type(module).__name__}.{entry} is not a simple chain of layers: operation "
                f"{node.format_node()} does not take exactly the previous result."
            )
        in_shape = tuple(previous.meta["tensor_meta"].shape[1:])
        out_shape = tuple(node.meta["tensor_meta"].shape[1:])
        previous = node
        if node.op == "call_module":
            where = str(node.target)
            where = where[len(prefix):] if where.startswith(prefix) else where
            steps += _steps_of_module(submodules[node.target], where, in_shape, out_shape)
        else:
            steps += _steps_of_function(node, str(node.name), in_shape, out_shape)
    return steps, shape


def _recorded_steps(module: Any, entry: str, shape: Shape) -> list[chain.Step]:
    """Steps from the leaf modules one forward pass calls, checked to form a chain."""
    import torch

    calls: list[tuple[str, Any, Any, Any]] = []
    handles = []
    names = {mod: name for name, mod in module.named_modules()}
    for mod in module.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(
                lambda m, args, out: calls.append((names[m], m, args[0] if args else None, out))
            ))
    x = torch.zeros((2, *shape), dtype=_example_input(module, shape)[1])
    try:
        with torch.no_grad():
            out = getattr(module, entry)(x)
    finally:
        for h in handles:
            h.remove()
    steps: list[chain.Step] = []
    previous = x
    for where, mod, given, result in calls:
        if given is not previous:
            raise TypeError(
                f"{type(module).__name__}.{entry} is not a chain of layers: {where} "
                f"({type(mod).__name__}) does not take the output of the layer before it "
                "(an operation between them that is not a module?). Pass an nn.Sequential."
            )
        steps += _steps_of_module(mod, where, tuple(given.shape[1:]), tuple(result.shape[1:]))
        previous = result
    if out is not previous:
        raise TypeError(f"{type(module).__name__}.{entry} does not return the output of its last "
                        "layer. Pass an nn.Sequential.")
    return steps


def layers_from_module(
    module: Any, *, entry: str = "forward", input_shape: Sequence[int] | None = None
) -> tuple[list[Layer], str, Shape, Shape]:
    """The layers of a module's computation, its parameters' dtype and its input / output shapes."""
    import torch.nn as nn

    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module; got {type(module).__name__}.")
    if not isinstance(entry, str) or not hasattr(module, entry):
        raise TypeError(f"The module {type(module).__name__} has no method {entry!r:.40}.")
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
    try:
        steps, shape = _traced_steps(module, entry, input_shape)
    except TypeError:
        raise
    except Exception as traced:  # fx raises many kinds on data-dependent control flow
        shape, _ = _example_input(module, input_shape)
        try:
            steps = _recorded_steps(module, entry, shape)
        except TypeError as exc:
            raise TypeError(f"{exc} (symbolic tracing failed too: {type(traced).__name__}: "
                            f"{str(traced).splitlines()[0] if str(traced) else ''})") from exc
    layers, out_shape = chain.fold(steps, shape)
    return layers, str(_example_input(module, shape)[1]).replace("torch.", ""), shape, out_shape


def module_from_layers(layers: Sequence[Layer], dtype: Any = None) -> Any:
    """An ``nn.Sequential`` computing the layers on flattened inputs (float64 by default)."""
    import torch
    import torch.nn as nn

    dtype = dtype or torch.float64
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
