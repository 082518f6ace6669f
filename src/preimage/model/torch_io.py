"""PyTorch interop: reading a generator's layers out of an nn.Module and back.

Kept apart so that the solvers themselves work on NumPy arrays only.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator


def default_device() -> Any:
    """CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.array(t, dtype=np.float64, copy=True)


def tensor_dtype(t: Any) -> str:
    """The dtype name of a tensor or array ("float32", "float64", ...)."""
    return str(getattr(t, "dtype", "float64")).replace("torch.", "")


def _activation_of_module(mod: Any) -> tuple[str, float] | None:
    import torch.nn as nn

    if isinstance(mod, nn.ReLU):
        return ("relu", 0.0)
    if isinstance(mod, nn.LeakyReLU):
        return ("leaky_relu", float(mod.negative_slope))
    if isinstance(mod, nn.Tanh):
        return ("tanh", 0.0)
    if isinstance(mod, nn.Sigmoid):
        return ("sigmoid", 0.0)
    return None


def _activation_of_function(target: Any, args: tuple, kwargs: dict) -> tuple[str, float] | None:
    import torch
    import torch.nn.functional as F

    if target in (F.relu, torch.relu, "relu", "relu_"):
        return ("relu", 0.0)
    if target in (F.leaky_relu, "leaky_relu"):
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return ("leaky_relu", float(slope))
    if target in (torch.tanh, F.tanh, "tanh"):
        return ("tanh", 0.0)
    if target in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return ("sigmoid", 0.0)
    return None


def _ops_of_child(name: str, child: Any) -> list[tuple[str, Any]]:
    """One submodule as ops: a Linear, an activation, nothing (Identity, Flatten, Dropout)."""
    import torch.nn as nn

    if isinstance(child, nn.Linear):
        return [("linear", child)]
    if isinstance(child, (nn.Identity, nn.Flatten, nn.Dropout)):
        return []
    if (act := _activation_of_module(child)) is not None:
        return [("act", act)]
    raise TypeError(
        f"Unsupported layer {name!r} ({type(child).__name__}): preimage handles Linear "
        "layers followed by ReLU, LeakyReLU, Tanh, Sigmoid or nothing."
    )


def _ops_from_module(module: Any, entry: str) -> list[tuple[str, Any]]:
    """The module's computation as a flat list of ("linear", nn.Linear) / ("act", (kind, slope))."""
    import torch.fx as fx
    import torch.nn as nn

    if isinstance(module, nn.Sequential) and entry == "forward":
        ops: list[tuple[str, Any]] = []
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential):
                ops.extend(_ops_from_module(child, "forward"))
            else:
                ops.extend(_ops_of_child(name, child))
        return ops

    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module; got {type(module).__name__}.")
    if not hasattr(module, entry):
        raise TypeError(f"The module {type(module).__name__} has no method {entry!r}.")

    class _Entry(nn.Module):
        def __init__(self, root: nn.Module) -> None:
            super().__init__()
            self.root = root

        def forward(self, x: Any) -> Any:
            return getattr(self.root, entry)(x)

    wrapper = _Entry(module) if entry != "forward" else module
    try:
        graph = fx.symbolic_trace(wrapper).graph
    except Exception as exc:  # fx raises many kinds on data-dependent control flow
        raise TypeError(
            f"Could not trace {type(module).__name__}.{entry} as a chain of layers "
            f"({type(exc).__name__}: {exc}). Pass an nn.Sequential instead."
        ) from exc
    submodules = dict(wrapper.named_modules())
    ops = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            previous = node
            continue
        if node.op == "output":
            break
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if len(inputs) != 1 or inputs[0] is not previous:
            raise TypeError(
                f"{type(module).__name__}.{entry} is not a simple chain of layers: operation "
                f"{node.format_node()} does not take exactly the previous result."
            )
        previous = node
        if node.op == "call_module":
            ops.extend(_ops_of_child(str(node.target), submodules[node.target]))
        elif node.op in ("call_function", "call_method"):
            act = _activation_of_function(node.target, tuple(node.args), dict(node.kwargs))
            if act is not None:
                ops.append(("act", act))
            elif node.target in (operator.pos,) or node.target in ("contiguous", "flatten"):
                continue
            else:
                raise TypeError(
                    f"Unsupported operation {node.format_node()} in {type(module).__name__}."
                    f"{entry}: preimage handles Linear layers and elementwise activations."
                )
        else:
            raise TypeError(f"Unsupported operation {node.format_node()}.")
    return ops


def layers_from_module(module: Any, *, entry: str = "forward") -> tuple[list[Layer], str]:
    """The layers of a chain of Linear layers and activations, and the weights' dtype."""
    ops = _ops_from_module(module, entry)
    layers: list[Layer] = []
    i = 0
    dtype = "float64"
    while i < len(ops):
        kind, obj = ops[i]
        if kind != "linear":
            raise TypeError(
                f"Activation {obj[0]} at position {i} does not follow a Linear layer; preimage "
                "needs the chain Linear, activation, Linear, activation, ..."
            )
        act = ("identity", 0.0)
        if i + 1 < len(ops) and ops[i + 1][0] == "act":
            act = ops[i + 1][1]
            i += 1
            if i + 1 < len(ops) and ops[i + 1][0] == "act":
                raise TypeError(
                    f"Two activations in a row after Linear layer {len(layers)}; not supported."
                )
        i += 1
        dtype = tensor_dtype(obj.weight)
        bias = None if obj.bias is None else tensor_to_numpy(obj.bias)
        layers.append(
            Layer(DenseOperator(tensor_to_numpy(obj.weight)), bias, Activation(act[0], act[1]))
        )
    if not layers:
        raise TypeError(f"No Linear layer found in {type(module).__name__}.{entry}.")
    return layers, dtype


def module_from_layers(layers: Sequence[Layer], dtype: Any = None) -> Any:
    """An ``nn.Sequential`` of Linear layers and activation modules computing the layers."""
    import torch
    import torch.nn as nn

    dtype = dtype or torch.float64
    mods: list[nn.Module] = []
    for layer in layers:
        lin = nn.Linear(layer.in_width, layer.out_width, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.asarray(layer.weight.matrix())))
            if layer.bias is not None:
                lin.bias.copy_(torch.tensor(layer.bias))
        mods.append(lin)
        act = layer.activation.module()
        if act is not None:
            mods.append(act)
    return nn.Sequential(*mods).to(dtype)
