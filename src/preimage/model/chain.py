"""A generator's computation as a chain of steps, folded into layers y = act(W h + b).

The PyTorch and ONNX readers (`preimage.model.torch_io`, `preimage.model.onnx_io`)
translate each operation of a model into one `Step`:

- `Linear`: a linear operator and its bias (Linear, Gemm, MatMul + Add, Conv,
  ConvTranspose, Upsample / Resize);
- `Affine`: an elementwise h -> scale h + shift (batch norm in eval mode);
- `Act`: an elementwise activation;
- `Reshape`: a change of shape only (Flatten, Unflatten, view, reshape).

`fold` then composes every run of linear and affine steps between two
activations into one layer: batch norm after a convolution is folded into its
kernel (per-channel scale) and bias, consecutive linear maps are composed, so
the solvers see one affine map per activation. A chain that ends without an
activation gets an identity one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.structured import ComposedOperator, Conv2dOperator, DiagonalOperator

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Linear:
    """h -> op h + bias (bias of shape (m,) or None)."""

    op: Any
    bias: np.ndarray | None
    where: str


@dataclass(frozen=True)
class Affine:
    """h -> scale * h + shift, elementwise over the flattened shape."""

    scale: np.ndarray
    shift: np.ndarray
    shape: Shape
    where: str


@dataclass(frozen=True)
class Act:
    activation: Activation
    where: str


@dataclass(frozen=True)
class Reshape:
    shape: Shape
    where: str


Step = Linear | Affine | Act | Reshape


def batch_norm_affine(
    mean: np.ndarray, var: np.ndarray, eps: float, weight: np.ndarray | None,
    bias: np.ndarray | None, shape: Shape, where: str,
) -> Affine:
    """The eval-mode batch norm gamma (h - mean) / sqrt(var + eps) + beta, per channel of shape."""
    channels = shape[0]
    if np.asarray(mean).size != channels:
        raise ValueError(f"{where}: a batch norm over {np.asarray(mean).size} channels gets "
                         f"inputs of shape {shape}.")
    gamma = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    beta = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    scale = gamma / np.sqrt(np.asarray(var, dtype=np.float64) + float(eps))
    shift = beta - np.asarray(mean, dtype=np.float64) * scale
    spread = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise ValueError(f"{where}: the batch norm's statistics give NaN or inf.")
    return Affine(np.repeat(scale, spread), np.repeat(shift, spread), shape, where)


def _scale_rows(op: Any, scale: np.ndarray) -> Any:
    """diag(scale) o op, folded into the operator where its structure allows."""
    if isinstance(op, DenseOperator):
        return DenseOperator(scale[:, None] * op.matrix())
    if isinstance(op, Conv2dOperator):
        c, h, w = op.out_shape
        per_channel = scale.reshape(c, h * w)
        if np.all(per_channel == per_channel[:, :1]):
            factor = per_channel[:, 0]
            kernel = (op.weight * factor[None, :, None, None] if op.transposed
                      else op.weight * factor[:, None, None, None])
            return Conv2dOperator(
                kernel, op.in_shape, stride=op.stride, padding=op.padding, dilation=op.dilation,
                transposed=op.transposed, output_padding=op.output_padding,
            )
    return ComposedOperator([op, DiagonalOperator(scale, op.out_shape)])


def _compose(ops: Sequence[Any]) -> Any:
    """One operator for a run of linear maps (dense ones multiplied out)."""
    merged: list[Any] = []
    for op in ops:
        if merged and isinstance(op, DenseOperator) and isinstance(merged[-1], DenseOperator):
            merged[-1] = DenseOperator(op.matrix() @ merged[-1].matrix())
        else:
            merged.append(op)
    return merged[0] if len(merged) == 1 else ComposedOperator(merged)


def fold(steps: Sequence[Step], input_shape: Shape) -> tuple[list[Layer], Shape]:
    """The layers of a chain of steps, and the shape of its output."""
    layers: list[Layer] = []
    ops: list[Any] = []
    bias: np.ndarray | None = None
    shape = tuple(input_shape)
    for step in steps:
        if isinstance(step, Reshape):
            if int(np.prod(step.shape)) != int(np.prod(shape)):
                raise ValueError(f"{step.where}: cannot reshape {shape} to {step.shape}.")
            shape = step.shape
            continue
        if isinstance(step, Act):
            if not ops:
                where = "the latent code" if not layers else "the previous activation"
                raise TypeError(
                    f"{step.where}: activation {step.activation} applied to {where} without a "
                    "linear layer in between; preimage needs linear map, activation, linear "
                    "map, activation, ..."
                )
            layers.append(Layer(_compose(ops), bias, step.activation))
            ops, bias = [], None
            continue
        if isinstance(step, Affine):
            if step.scale.size != int(np.prod(shape)):
                raise ValueError(f"{step.where}: an elementwise map of {step.scale.size} entries "
                                 f"gets inputs of shape {shape}.")
            if ops:
                ops[-1] = _scale_rows(ops[-1], step.scale)
            else:
                ops.append(DiagonalOperator(step.scale, shape))
            bias = step.shift + (0.0 if bias is None else step.scale * bias)
            continue
        op = step.op
        if op.shape[1] != int(np.prod(shape)):
            raise ValueError(f"{step.where}: takes {op.shape[1]} inputs but gets shape {shape}.")
        if bias is not None:
            bias = op.apply(bias[None])[0]
        if step.bias is not None:
            bias = step.bias + (0.0 if bias is None else bias)
        ops.append(op)
        shape = tuple(getattr(op, "out_shape", (op.shape[0],)))
    if ops:
        layers.append(Layer(_compose(ops), bias, Activation("identity")))
    if not layers:
        raise TypeError("The model has no linear layer.")
    return layers, shape
