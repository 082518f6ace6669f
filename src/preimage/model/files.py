"""Reading generators from files: state dicts in ``.safetensors`` or ``.pt`` / ``.pth``.

Model files are never unpickled with code execution: ``.pt`` files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.torch_io import tensor_dtype, tensor_to_numpy


def read_state_dict(
    path: str | Path, layers: Sequence[str] | None
) -> tuple[Mapping[str, Any], list[str]]:
    """The state dict in `path` and the names of G's linear layers in it.

    Without `layers`, every 2-D ``*.weight`` in file order, which must chain
    (each layer's input width the previous one's output width).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            state: Any = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip / header errors: say which file and why
        kind = "safetensors file" if path.suffix == ".safetensors" else (
            "PyTorch state dict that loads with weights_only=True"
        )
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{path} is not a {kind} ({type(exc).__name__}: {first}).") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{path} holds a {type(state).__name__}, not a state dict; save "
            "`model.state_dict()` or pass the module to `Network.from_torch`."
        )
    if layers is not None:
        return state, list(layers)
    names = [
        k[: -len(".weight")]
        for k, v in state.items()
        if k.endswith(".weight") and len(getattr(v, "shape", ())) == 2
    ]
    if not names:
        raise ValueError(f"{path} has no 2-D '*.weight' entries (no linear layers).")
    shapes = [tuple(state[f"{name}.weight"].shape) for name in names]
    for i in range(len(names) - 1):
        out_a, in_b = shapes[i][0], shapes[i + 1][1]
        if out_a != in_b:
            raise ValueError(
                f"The linear layers of {path} do not form one chain ({names[i]} gives "
                f"{out_a} outputs, {names[i + 1]} takes {in_b} inputs): name the "
                f"layers of G, e.g. {names[-2:]} (`--layers` on the command line)."
            )
    return state, names


def layers_from_state_dict(
    state: Mapping[str, Any], names: Sequence[str], *, activation: Activation
) -> tuple[list[Layer], str]:
    """The layers ``name.weight`` (and ``name.bias``) of `state`, `activation` after each.

    Returns the layers and the dtype the weights were stored in.
    """
    if not names:
        raise ValueError("`layers` must name at least one linear layer.")
    layers, dtype = [], "float64"
    for name in names:
        key = f"{name}.weight"
        if key not in state:
            known = sorted({k.rsplit(".", 1)[0] for k in state})
            raise KeyError(f"The state dict has no {key!r}; its layers are {known}.")
        w = state[key]
        dtype = tensor_dtype(w)
        b = state.get(f"{name}.bias")
        bias = None if b is None else tensor_to_numpy(b)
        layers.append(Layer(DenseOperator(tensor_to_numpy(w), name=key), bias, activation))
    for i in range(1, len(layers)):
        if layers[i].in_width != layers[i - 1].out_width:
            raise ValueError(
                f"Layer {names[i]!r} takes inputs of width {layers[i].in_width} but "
                f"{names[i - 1]!r} outputs width {layers[i - 1].out_width}."
            )
    return layers, dtype
