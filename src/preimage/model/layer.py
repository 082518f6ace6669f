"""One layer y = act(W h + b) of a generator.

One layer object is the single source of truth for both the forward pass and
the solvers (the slope of a LeakyReLU, the bias), so they can never drift
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from preimage.model.activations import Activation
from preimage.model.operators import LinearOperator
from preimage.model.validation import check_finite, check_rtol, to_float_array


@dataclass(frozen=True)
class Layer:
    """One layer y = act(W h + b).

    Attributes
    ----------
    weight : LinearOperator of shape (m, n)
    bias : ndarray of shape (m,) or None
    activation : Activation
    """

    weight: LinearOperator
    bias: np.ndarray | None
    activation: Activation

    def __post_init__(self) -> None:
        if not isinstance(self.weight, LinearOperator):
            raise TypeError(
                f"A layer's `weight` must be a LinearOperator (e.g. DenseOperator(matrix)); got "
                f"{type(self.weight).__name__}."
            )
        if not isinstance(self.activation, Activation):
            raise TypeError(
                f"A layer's `activation` must be an Activation; got "
                f"{type(self.activation).__name__}."
            )
        if self.bias is not None:
            b = to_float_array(self.bias, "bias")
            if b.shape != (self.out_width,):
                raise ValueError(
                    f"A bias must have shape ({self.out_width},) to match a weight of shape "
                    f"{self.weight.shape}; got {b.shape}."
                )
            check_finite(b, "bias")
            b.setflags(write=False)
            object.__setattr__(self, "bias", b)

    @property
    def in_width(self) -> int:
        return self.weight.shape[1]

    @property
    def out_width(self) -> int:
        return self.weight.shape[0]

    def bias_or_zero(self) -> np.ndarray:
        return self.bias if self.bias is not None else np.zeros(self.out_width)

    def preactivation(self, h: np.ndarray) -> np.ndarray:
        """W h + b for a batch h of shape (B, n) -> (B, m)."""
        pre = self.weight.apply(h)
        return pre + self.bias if self.bias is not None else pre

    def forward(self, h: np.ndarray) -> np.ndarray:
        """act(W h + b) for a batch h of shape (B, n) -> (B, m)."""
        return self.activation(self.preactivation(h))


def check_layer_input(layer: Any, y: Any, nonneg: Any, rtol: Any) -> tuple[np.ndarray, float]:
    """The arguments of the one-layer solvers: y as a float64 (m,) copy and rtol, or an
    error naming the bad argument (``layer`` a preimage Layer, ``nonneg`` a bool)."""
    if not isinstance(layer, Layer):
        raise TypeError(f"`layer` must be a preimage.Layer; got {type(layer).__name__}.")
    if not isinstance(nonneg, (bool, np.bool_)):
        raise TypeError(f"`nonneg` must be True or False; got {nonneg!r:.40}.")
    rtol = check_rtol(rtol)
    arr = to_float_array(y, "y")
    if arr.shape != (layer.out_width,):
        raise ValueError(
            f"`y` must have shape ({layer.out_width},): one observation of the layer's "
            f"{layer.out_width} outputs; got an array of shape {arr.shape}."
        )
    check_finite(arr, "y")
    return arr, rtol
