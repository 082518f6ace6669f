"""Elementwise activations: every formula a kind needs, in one place.

The forward pass (NumPy and torch), the inverse of the bijective kinds, the
slope d act / d pre at an output, the linear pieces of the piecewise-linear
kinds: the solvers, the batched path and the gradient baselines all read them
from here, so they can never disagree on a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ActivationKind = Literal["relu", "leaky_relu", "identity", "tanh", "sigmoid"]
#: Every activation kind, in the order the CLI lists them.
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "identity", "tanh", "sigmoid")
#: Kinds that are linear on each side of 0 (an activation cell fixes them to one slope).
PIECEWISE_LINEAR: tuple[str, ...] = ("relu", "leaky_relu", "identity")


@dataclass(frozen=True)
class Activation:
    """An elementwise activation.

    ``relu`` loses information (all negatives map to 0) and is inverted by a
    linear program; the others are bijections onto their range and are
    inverted elementwise (``../NOTES-math.md`` section 5).
    """

    kind: ActivationKind
    negative_slope: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(
                f"The activation must be one of {ACTIVATIONS}; got {self.kind!r}."
            )
        if self.kind == "leaky_relu" and not (
            np.isfinite(self.negative_slope) and self.negative_slope > 0
        ):
            raise ValueError(
                "The negative_slope of a LeakyReLU must be a finite number > 0; "
                f"got {self.negative_slope!r}."
            )

    @property
    def is_bijective(self) -> bool:
        """True when act is invertible elementwise (everything but ReLU)."""
        return self.kind != "relu"

    @property
    def output_nonnegative(self) -> bool:
        """True when every output is >= 0, so the next layer's input is too."""
        return self.kind in ("relu", "sigmoid")

    @property
    def is_piecewise_linear(self) -> bool:
        """True when act is linear on pre >= 0 and on pre <= 0 (ReLU, LeakyReLU, identity)."""
        return self.kind in PIECEWISE_LINEAR

    def off_slope(self) -> float:
        """The slope on pre < 0 of a piecewise-linear kind (0 for ReLU, 1 for identity)."""
        if self.kind == "identity":
            return 1.0
        if self.kind == "leaky_relu":
            return self.negative_slope
        if self.kind == "relu":
            return 0.0
        raise ValueError(f"{self} is not piecewise linear.")

    def __call__(self, pre: np.ndarray) -> np.ndarray:
        """act(pre) in NumPy (a new array)."""
        if self.kind == "relu":
            return np.maximum(pre, 0.0)
        if self.kind == "leaky_relu":
            return np.where(pre >= 0, pre, self.negative_slope * pre)
        if self.kind == "tanh":
            return np.tanh(pre)
        if self.kind == "sigmoid":
            with np.errstate(over="ignore"):
                return 1.0 / (1.0 + np.exp(-pre))
        return np.array(pre, copy=True)

    def torch(self, pre: Any) -> Any:
        """act(pre) for a torch tensor (the same formulas as `__call__`)."""
        import torch

        if self.kind == "relu":
            return torch.clamp(pre, min=0.0)
        if self.kind == "leaky_relu":
            return torch.where(pre >= 0, pre, self.negative_slope * pre)
        if self.kind == "tanh":
            return torch.tanh(pre)
        if self.kind == "sigmoid":
            return torch.sigmoid(pre)
        return pre

    def module(self) -> Any:
        """The torch.nn module computing act (None for identity)."""
        import torch.nn as nn

        if self.kind == "relu":
            return nn.ReLU()
        if self.kind == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        if self.kind == "tanh":
            return nn.Tanh()
        if self.kind == "sigmoid":
            return nn.Sigmoid()
        return None

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Pre-activation from output, for bijective activations.

        Values outside the open range of tanh / sigmoid map to +-inf, which the
        caller reports as "infeasible".
        """
        if self.kind == "leaky_relu":
            return np.where(y >= 0, y, y / self.negative_slope)
        if self.kind == "identity":
            return np.array(y, copy=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kind == "tanh":
                return np.where(np.abs(y) < 1, np.arctanh(np.clip(y, -1, 1)), np.inf)
            if self.kind == "sigmoid":
                inside = (y > 0) & (y < 1)
                return np.where(inside, np.log(y) - np.log1p(-y), np.inf)
        raise ValueError("A ReLU is not invertible elementwise; use the layer LP.")

    def clipped_inverse(self, y: np.ndarray, margin: float = 1e-12) -> np.ndarray:
        """`inverse` of y clipped into the open range first (for noisy fits: always finite)."""
        if self.kind == "tanh":
            y = np.clip(y, -1 + margin, 1 - margin)
        elif self.kind == "sigmoid":
            y = np.clip(y, margin, 1 - margin)
        return self.inverse(y)

    def slope(self, y: np.ndarray) -> np.ndarray:
        """d act / d pre at the pre-activation act^{-1}(y), for a bijective activation.

        Floored at 1e-12 for tanh and sigmoid (their slope vanishes at the ends).
        """
        if self.kind == "leaky_relu":
            return np.where(y >= 0, 1.0, self.negative_slope)
        if self.kind == "tanh":
            return np.maximum(1 - np.clip(y, -1, 1) ** 2, 1e-12)
        if self.kind == "sigmoid":
            c = np.clip(y, 0, 1)
            return np.maximum(c * (1 - c), 1e-12)
        return np.ones_like(y)

    def gain(self, on: np.ndarray) -> np.ndarray:
        """The slope of each unit of a piecewise-linear kind given its on/off state (on: 1)."""
        return np.where(on, 1.0, self.off_slope())

    def __str__(self) -> str:
        if self.kind == "leaky_relu":
            return f"leaky_relu({self.negative_slope:g})"
        return self.kind
