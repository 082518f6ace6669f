"""Reading generators from files: state dicts in ``.safetensors`` or ``.pt`` / ``.pth``.

Model files are untrusted input, and nothing in them runs. ``.safetensors``
holds tensors only; ``.pt`` / ``.pth`` files are pickles, read with
``torch.load(weights_only=True)``: its unpickler builds tensors, dicts, lists
and numbers and refuses every other class or function a pickle names, so a
crafted file that would run code when unpickled is refused with a ValueError
saying which callable it asked for (`read_state_dict`). Pickles are still
read (rather than refused outright) because the state dicts of trained models,
the paper authors' decoders among them, are ``.pt`` files. Every tensor is
then checked: a 2-D weight per layer, biases of the layer's width, real
numbers, nothing NaN, infinite or beyond `preimage.model.validation.MAX_MAGNITUDE`;
a missing tensor is named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.torch_io import tensor_dtype, tensor_to_numpy
from preimage.model.validation import check_finite, coarsest, precision_of


def read_state_dict(
    path: str | Path, layers: Sequence[str] | None
) -> tuple[Mapping[str, Any], list[str]]:
    """The state dict in `path` and the names of G's linear layers in it.

    Without `layers`, every 2-D ``*.weight`` in file order, which must chain
    (each layer's input width the previous one's output width).
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"`path` must be a file path (str or Path); got {type(path).__name__}.")
    names = check_layer_names(layers)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a model file.")
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    state = load_state_file(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{path} holds a {type(state).__name__}, not a state dict; save "
            "`model.state_dict()` or pass the module to `Network.from_torch`."
        )
    odd = [k for k, v in state.items() if not isinstance(k, str) or not hasattr(v, "shape")]
    if odd:
        raise ValueError(
            f"{path} is not a state dict of named tensors: entry {odd[0]!r} is a "
            f"{type(state[odd[0]]).__name__}."
        )
    if names is not None:
        return state, names
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


def load_state_file(path: Path) -> Any:
    """The object in a model file, with no code run (module docstring)."""
    import pickle
    import warnings

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # (torch, for bfloat16 tensors too)

            return load_file(str(path))
        import torch

        with warnings.catch_warnings():  # (torch warns of pickle protocols it may not read)
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        wanted = re.search(r"GLOBAL ([\w.]+)", text)
        reason = re.search(r"(Unsupported [^\n.]*)", text)
        what = (f"call `{wanted.group(1)}`, which could run code" if wanted else
                "need more than the tensors, dicts and numbers of a state dict"
                + (f" ({reason.group(1).strip()})" if reason else ""))
        raise ValueError(
            f"{path} was refused: unpickling it would {what}. Model files are read with "
            "torch.load(weights_only=True), which builds tensors only and runs no code; "
            "save `model.state_dict()` with torch.save, or as .safetensors."
        ) from exc
    except Exception as exc:  # zip / header / truncation errors: say which file and why
        kind = "safetensors file" if path.suffix == ".safetensors" else (
            "PyTorch state dict that loads with weights_only=True"
        )
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a {kind} ({type(exc).__name__}: {first}).") from exc


def check_layer_names(layers: Any) -> list[str] | None:
    """`layers` as a list of names (None stays None), or a TypeError saying what it must be."""
    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not all(
        isinstance(name, str) for name in layers
    ):
        raise TypeError(
            f"`layers` must be a list of layer names, e.g. ['fc3', 'fc4']; got {layers!r:.60}."
        )
    return list(layers)


def layers_from_state_dict(
    state: Mapping[str, Any], names: Sequence[str], *, activation: Activation,
    source: str = "The state dict",
) -> tuple[list[Layer], str]:
    """The layers ``name.weight`` (and ``name.bias``) of `state`, `activation` after each.

    Returns the layers and the least precise dtype the weights were stored in.
    Errors name `source` (the file) and the tensor.
    """
    names = check_layer_names(names)
    if not isinstance(state, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors; got "
                        f"{type(state).__name__}.")
    if not names:
        raise ValueError("`layers` must name at least one linear layer.")
    layers, precisions = [], []
    for name in names:
        key = f"{name}.weight"
        if key not in state:
            known = sorted({str(k).rsplit(".", 1)[0] for k in state})
            raise ValueError(f"{source} has no {key!r}; its layers are {known}.")
        w = state[key]
        precisions.append(precision_of(tensor_dtype(w)))
        try:
            weight = DenseOperator(tensor_to_numpy(w, key), name=key)
            b = state.get(f"{name}.bias")
            bias = None if b is None else tensor_to_numpy(b, f"{name}.bias")
            if bias is not None:
                if bias.shape != (weight.shape[0],):
                    raise ValueError(
                        f"`{name}.bias` must have shape ({weight.shape[0]},) to match "
                        f"`{key}` of shape {weight.shape}; got {bias.shape}."
                    )
                check_finite(bias, f"{name}.bias")
            layers.append(Layer(weight, bias, activation))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{source}: {exc}") from exc
    for i in range(1, len(layers)):
        if layers[i].in_width != layers[i - 1].out_width:
            raise ValueError(
                f"{source}: layer {names[i]!r} takes inputs of width {layers[i].in_width} but "
                f"{names[i - 1]!r} outputs width {layers[i - 1].out_width}."
            )
    dtype = coarsest(*precisions)
    return layers, dtype
