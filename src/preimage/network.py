"""The network model: a generator G(z) as an ordered list of layers.

Each layer is an affine map followed by an elementwise activation,

    x_{i} = act_i(W_i x_{i-1} + b_i),      x_0 = z,   G(z) = x_d,

and one layer object is the single source of truth for both the forward pass
and the solvers (the slope of a LeakyReLU, the bias) so they can never drift
apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from preimage._validation import check_latent
from preimage.operators import DenseOperator, LinearOperator

ActivationKind = Literal["relu", "leaky_relu", "identity", "tanh", "sigmoid"]
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "identity", "tanh", "sigmoid")


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

    def __call__(self, pre: np.ndarray) -> np.ndarray:
        if self.kind == "relu":
            return np.maximum(pre, 0.0)
        if self.kind == "leaky_relu":
            return np.where(pre >= 0, pre, self.negative_slope * pre)
        if self.kind == "tanh":
            return np.tanh(pre)
        if self.kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-pre))
        return np.array(pre, copy=True)

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

    def __str__(self) -> str:
        if self.kind == "leaky_relu":
            return f"leaky_relu({self.negative_slope:g})"
        return self.kind


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
        if self.bias is not None:
            b = np.array(self.bias, dtype=np.float64, copy=True)
            if b.shape != (self.out_width,):
                raise ValueError(
                    f"A bias must have shape ({self.out_width},) to match a weight of shape "
                    f"{self.weight.shape}; got {b.shape}."
                )
            if not np.all(np.isfinite(b)):
                raise ValueError("A bias contains NaN or inf.")
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


@dataclass(frozen=True)
class Network:
    """A generator G: an ordered tuple of layers, latent first.

    Build one with `random_network`, `Network.from_torch`,
    `Network.from_state_dict` or `Network.from_weights`.
    """

    layers: tuple[Layer, ...]
    source_dtype: str = "float64"

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("A network needs at least one layer.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Layer {i} is a {type(layer).__name__}, not a preimage.Layer.")
        for i in range(1, len(layers)):
            if layers[i].in_width != layers[i - 1].out_width:
                raise ValueError(
                    f"Layer {i} takes inputs of width {layers[i].in_width} but layer {i - 1} "
                    f"outputs width {layers[i - 1].out_width}."
                )
        object.__setattr__(self, "layers", layers)

    @property
    def widths(self) -> list[int]:
        """[k, n_1, ..., n_d]: latent width, then each layer's output width."""
        return [self.layers[0].in_width] + [layer.out_width for layer in self.layers]

    @property
    def latent_dim(self) -> int:
        return self.layers[0].in_width

    @property
    def output_dim(self) -> int:
        return self.layers[-1].out_width

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        acts = ", ".join(str(layer.activation) for layer in self.layers)
        widths = "-".join(str(w) for w in self.widths)
        bias = any(layer.bias is not None for layer in self.layers)
        return f"Network({widths}, activations=[{acts}], bias={bias})"

    def forward(self, z: np.ndarray) -> np.ndarray:
        """G(z) in float64.

        Parameters
        ----------
        z : array-like of shape (k,) or (B, k)

        Returns
        -------
        ndarray of shape (n,) or (B, n)
        """
        zb, single = check_latent(z, self.latent_dim)
        h = zb
        for layer in self.layers:
            h = layer.forward(h)
        return h[0] if single else h

    def forward_all(self, z: np.ndarray) -> list[np.ndarray]:
        """Every layer's output for a batch z of shape (B, k): [z, x_1, ..., x_d]."""
        zb, _ = check_latent(z, self.latent_dim)
        outs = [zb]
        for layer in self.layers:
            outs.append(layer.forward(outs[-1]))
        return outs

    # --- construction -------------------------------------------------------------

    @classmethod
    def from_weights(
        cls,
        weights: Sequence[np.ndarray],
        biases: Sequence[np.ndarray | None] | None = None,
        *,
        activation: ActivationKind | Sequence[ActivationKind] = "relu",
        negative_slope: float = 0.1,
    ) -> Network:
        """A network from weight matrices W_1 (n_1, k), ..., W_d (n_d, n_{d-1}).

        ``activation`` is one kind for every layer or one per layer.
        """
        weights = list(weights)
        if not weights:
            raise ValueError("`weights` must hold at least one matrix.")
        if biases is None:
            biases = [None] * len(weights)
        if len(biases) != len(weights):
            raise ValueError(
                f"`biases` has {len(biases)} entries but `weights` has {len(weights)}."
            )
        kinds = [activation] * len(weights) if isinstance(activation, str) else list(activation)
        if len(kinds) != len(weights):
            raise ValueError(
                f"`activation` lists {len(kinds)} kinds but there are {len(weights)} layers."
            )
        layers = []
        for w, b, kind in zip(weights, biases, kinds, strict=True):
            slope = negative_slope if kind == "leaky_relu" else 0.0
            layers.append(Layer(DenseOperator(np.asarray(w)), b, Activation(kind, slope)))
        return cls(tuple(layers))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        layers: Sequence[str],
        *,
        activation: ActivationKind = "relu",
        negative_slope: float = 0.1,
    ) -> Network:
        """A network from named linear layers of a PyTorch state dict.

        For example the decoder of the paper authors' VAE:
        ``Network.from_state_dict(sd, ["fc3", "fc4"], activation="relu")``
        reads ``fc3.weight``, ``fc4.weight`` (and ``.bias`` where present) and
        puts ``activation`` after every layer, the output layer too.
        """
        from preimage._torch import tensor_to_numpy

        weights, biases, dtype = [], [], "float64"
        for name in layers:
            key = f"{name}.weight"
            if key not in state_dict:
                known = sorted({k.rsplit(".", 1)[0] for k in state_dict})
                raise KeyError(f"The state dict has no {key!r}; its layers are {known}.")
            w = state_dict[key]
            dtype = str(getattr(w, "dtype", "float64")).replace("torch.", "")
            weights.append(tensor_to_numpy(w))
            b = state_dict.get(f"{name}.bias")
            biases.append(None if b is None else tensor_to_numpy(b))
        net = cls.from_weights(
            weights, biases, activation=activation, negative_slope=negative_slope
        )
        return cls(net.layers, source_dtype=dtype)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        layers: Sequence[str] | None = None,
        *,
        activation: ActivationKind = "relu",
        negative_slope: float = 0.1,
    ) -> Network:
        """A network from a saved state dict: ``.safetensors``, or ``.pt`` / ``.pth``.

        ``.pt`` files are read with ``torch.load(weights_only=True)`` (no code
        runs); a checkpoint dict holding its weights under ``"state_dict"`` is
        unwrapped. ``layers`` names the linear layers of G in order (e.g.
        ``["fc3", "fc4"]``: the decoder of a VAE); without it every 2-D
        ``*.weight`` of the file is taken, in file order, and they must chain
        (each layer's input width the previous one's output width). Then as
        `from_state_dict`.
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
        if layers is None:
            layers = [
                k[: -len(".weight")]
                for k, v in state.items()
                if k.endswith(".weight") and len(getattr(v, "shape", ())) == 2
            ]
            if not layers:
                raise ValueError(f"{path} has no 2-D '*.weight' entries (no linear layers).")
            shapes = [tuple(state[f"{name}.weight"].shape) for name in layers]
            for i in range(len(layers) - 1):
                out_a, in_b = shapes[i][0], shapes[i + 1][1]
                if out_a != in_b:
                    raise ValueError(
                        f"The linear layers of {path} do not form one chain ({layers[i]} gives "
                        f"{out_a} outputs, {layers[i + 1]} takes {in_b} inputs): name the "
                        f"layers of G, e.g. {layers[-2:]} (`--layers` on the command line)."
                    )
        return cls.from_state_dict(
            state, list(layers), activation=activation, negative_slope=negative_slope
        )

    @classmethod
    def from_torch(cls, module: Any, *, entry: str = "forward") -> Network:
        """A network from a PyTorch module.

        Accepts an ``nn.Sequential`` or any module whose ``entry`` method (default
        ``forward``; ``entry="decode"`` takes the decoder of a VAE) is a chain of
        ``nn.Linear`` layers and activations (ReLU, LeakyReLU, Tanh, Sigmoid,
        Identity, Flatten of a flat input, as modules or as ``torch``/``F``
        functions). Anything else raises a TypeError naming the operation.
        """
        from preimage._torch import network_from_module

        return network_from_module(module, entry=entry)

    def to_torch(self, dtype: Any = None) -> Any:
        """An ``nn.Sequential`` computing the same G (float64 unless ``dtype``)."""
        from preimage._torch import module_from_network

        return module_from_network(self, dtype=dtype)


def random_network(
    widths: Sequence[int],
    *,
    activation: ActivationKind = "relu",
    negative_slope: float = 0.1,
    bias: bool = False,
    bias_scale: float = 1.0,
    seed: int | np.random.Generator | None = 0,
) -> Network:
    """The paper's random generator: W_i with i.i.d. N(0, 1/n_i) entries.

    Parameters
    ----------
    widths : [k, n_1, ..., n_d]
        Latent width followed by each layer's output width.
    activation : the activation after every layer, the output layer too.
    bias : add a Gaussian bias b_i ~ N(0, bias_scale^2 / n_i).
    seed : an int or a numpy Generator; the same seed gives the same network.
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(
            f"`widths` must list at least two positive widths [k, n_1, ...]; got {widths}."
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(widths):
        weights.append(rng.standard_normal((n_out, n_in)) / np.sqrt(n_out))
        biases.append(rng.standard_normal(n_out) * bias_scale / np.sqrt(n_out) if bias else None)
    return Network.from_weights(
        weights, biases, activation=activation, negative_slope=negative_slope
    )
