"""Elementwise activations: every formula a kind needs, in one place.

The forward pass (NumPy and torch), the inverse of the bijective kinds, the
slope d act / d pre at an output, the linear pieces of the piecewise-linear
kinds: the solvers, the batched path and the gradient baselines all read them
from here, so they can never disagree on a constant.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ActivationKind = Literal["relu", "leaky_relu", "identity", "tanh", "sigmoid", "elu", "softplus"]
#: Every activation kind, in the order the CLI lists them.
ACTIVATIONS: tuple[str, ...] = (
    "relu", "leaky_relu", "identity", "tanh", "sigmoid", "elu", "softplus",
)
#: Kinds that are linear on each side of 0 (an activation cell fixes them to one slope).
PIECEWISE_LINEAR: tuple[str, ...] = ("relu", "leaky_relu", "identity")


#: A Softplus's jump at its threshold (torch's switch to the identity), relative to the
#: output there, below which it counts as invertible (threshold >= 18; the default 20:
#: 1e-10).
SOFTPLUS_JUMP = 1e-9


@dataclass(frozen=True)
class Activation:
    """An elementwise activation.

    ``relu`` loses information (all negatives map to 0) and is inverted by a
    linear program; the others are strictly monotone bijections onto their
    range (`range`) and are inverted elementwise (``../NOTES-math.md`` section 5).

    Attributes
    ----------
    kind : one of `ACTIVATIONS`
    negative_slope : the slope of ``leaky_relu`` for pre < 0
    alpha : ``elu``: alpha (exp(pre) - 1) for pre <= 0
    beta, threshold : ``softplus``: log(1 + exp(beta pre)) / beta, and pre itself
        where beta pre > threshold (as ``torch.nn.Softplus``)
    """

    kind: ActivationKind
    negative_slope: float = 0.0
    alpha: float = 1.0
    beta: float = 1.0
    threshold: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in ACTIVATIONS:
            raise ValueError(
                f"The activation must be one of {ACTIVATIONS}; got {self.kind!r:.40}."
            )
        for name in ("negative_slope", "alpha", "beta", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"The {name} of an activation must be a number; got {value!r:.40}.")
        if self.kind == "leaky_relu" and not (
            np.isfinite(self.negative_slope) and self.negative_slope > 0
        ):
            raise ValueError(
                "The negative_slope of a LeakyReLU must be a finite number > 0 (a slope of 0 "
                f"is a ReLU, a negative one is not monotone); got {self.negative_slope!r}."
            )
        for name, value in (("alpha", self.alpha), ("beta", self.beta),
                            ("threshold", self.threshold)):
            if not (np.isfinite(value) and value > 0):
                raise ValueError(
                    f"The {name} of an activation must be a finite number > 0; got {value!r}."
                )

        if self.kind == "softplus" and np.log1p(np.exp(-self.threshold)) > (
            SOFTPLUS_JUMP * self.threshold
        ):
            # past beta pre = threshold torch's Softplus is pre itself, below it the smooth
            # curve, which lies log(1 + exp(-threshold)) / beta above: the output jumps
            # down there, and the outputs just past the jump have two pre-activations
            raise ValueError(
                f"A Softplus with threshold {self.threshold:g} is not invertible: it jumps "
                f"down by {np.log1p(np.exp(-self.threshold)) / self.beta:.3g} where beta pre "
                "= threshold (to pre itself), so outputs just past it have two "
                "pre-activations; a threshold of at least 18 keeps the jump below 1e-9 of "
                "the output (the default is 20)."
            )

    @property
    def range(self) -> tuple[float, float]:
        """The open interval of the outputs of a bijective kind (ReLU: [0, inf))."""
        return {
            "relu": (0.0, np.inf),
            "tanh": (-1.0, 1.0),
            "sigmoid": (0.0, 1.0),
            "elu": (-self.alpha, np.inf),
            "softplus": (0.0, np.inf),
        }.get(self.kind, (-np.inf, np.inf))

    @property
    def is_bijective(self) -> bool:
        """True when act is invertible elementwise (everything but ReLU)."""
        return self.kind != "relu"

    @property
    def output_nonnegative(self) -> bool:
        """True when every output is >= 0, so the next layer's input is too."""
        return self.kind in ("relu", "sigmoid", "softplus")

    @property
    def is_piecewise_linear(self) -> bool:
        """True when act is linear on pre >= 0 and on pre <= 0 (ReLU, LeakyReLU, identity)."""
        return self.kind in PIECEWISE_LINEAR

    def target_scale(self, y: np.ndarray) -> np.ndarray:
        """The scale, in pre-activation units, of the rounding of observed outputs y
        (..., m): max_i |y_i| / slope(y_i) for a curved kind (tanh, sigmoid, ELU,
        softplus), whose inverse stretches an output's relative rounding by |y_i| /
        slope there (sigmoid outputs at 0.5: 2; near 1: 1 / (1 - y)); 0 for the
        piecewise-linear kinds, whose targets are the outputs themselves."""
        y = np.asarray(y, dtype=np.float64)
        if self.is_piecewise_linear:
            return np.zeros(y.shape[:-1])
        return np.max(np.abs(y) / self.slope(y), axis=-1, initial=0.0)

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
        if self.kind == "elu":
            return np.where(pre > 0, pre, self.alpha * np.expm1(np.minimum(pre, 0.0)))
        if self.kind == "softplus":
            scaled = self.beta * pre
            soft = np.logaddexp(0.0, np.minimum(scaled, self.threshold)) / self.beta
            return np.where(scaled > self.threshold, pre, soft)
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
        if self.kind == "elu":
            return torch.nn.functional.elu(pre, alpha=self.alpha)
        if self.kind == "softplus":
            return torch.nn.functional.softplus(pre, beta=self.beta, threshold=self.threshold)
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
        if self.kind == "elu":
            return nn.ELU(self.alpha)
        if self.kind == "softplus":
            return nn.Softplus(self.beta, self.threshold)
        return None

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Pre-activation from output, for bijective activations.

        Values at or beyond the ends of the open `range` map to -inf (below)
        and +inf (above): the pre-activation that would reach them is
        unbounded, and the caller turns them into one-sided constraints or a
        clear "outside the range" message, never a NaN.
        """
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "leaky_relu":
            return np.where(y >= 0, y, y / self.negative_slope)
        if self.kind == "identity":
            return np.array(y, copy=True)
        if self.kind == "relu":
            raise ValueError("A ReLU is not invertible elementwise; use the layer LP.")
        lo, hi = self.range
        inside = (y > lo) & (y < hi)
        c = np.where(inside, y, (max(lo, -1e300) + min(hi, 1e300)) / 2)  # any point inside
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.kind == "tanh":
                pre = np.arctanh(c)
            elif self.kind == "sigmoid":
                pre = np.log(c) - np.log1p(-c)
            elif self.kind == "elu":
                pre = np.where(c > 0, c, np.log1p(c / self.alpha))
            else:  # softplus (and its linear part past the threshold)
                scaled = self.beta * c
                pre = np.where(scaled > self.threshold, c, np.log(np.expm1(scaled)) / self.beta)
        return np.where(inside, pre, np.where(y <= lo, -np.inf, np.inf))

    def clipped_inverse(self, y: np.ndarray, margin: float = 1e-12) -> np.ndarray:
        """`inverse` of y clipped into the open range first (for noisy fits: always finite)."""
        lo, hi = self.range
        width = min(hi - lo, 1.0) if np.isfinite(hi - lo) else 1.0
        y = np.clip(y, lo + margin * width if np.isfinite(lo) else -np.inf,
                    hi - margin * width if np.isfinite(hi) else np.inf)
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
        if self.kind == "elu":
            return np.where(y > 0, 1.0, np.maximum(y + self.alpha, 1e-12))
        if self.kind == "softplus":  # sigmoid(beta pre) = 1 - exp(-beta y)
            return np.maximum(-np.expm1(-self.beta * np.maximum(y, 0.0)), 1e-12)
        return np.ones_like(y)

    def gain(self, on: np.ndarray) -> np.ndarray:
        """The slope of each unit of a piecewise-linear kind given its on/off state (on: 1)."""
        return np.where(on, 1.0, self.off_slope())

    def __str__(self) -> str:
        if self.kind == "leaky_relu":
            return f"leaky_relu({self.negative_slope:g})"
        if self.kind == "elu" and self.alpha != 1.0:
            return f"elu({self.alpha:g})"
        if self.kind == "softplus" and (self.beta, self.threshold) != (1.0, 20.0):
            return f"softplus(beta={self.beta:g}, threshold={self.threshold:g})"
        return self.kind
