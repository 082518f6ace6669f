"""The network model: a generator G(z) as an ordered list of layers.

Each layer is an affine map followed by an elementwise activation
(`preimage.model.layer.Layer`),

    x_{i} = act_i(W_i x_{i-1} + b_i),      x_0 = z,   G(z) = x_d.

Built from weight matrices, a PyTorch module (`preimage.model.torch_io`), a
state dict or a model file (`preimage.model.files`), or at random.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preimage.model import files, onnx_io, torch_io
from preimage.model.activations import Activation, ActivationKind
from preimage.model.layer import Layer
from preimage.model.operators import DenseOperator
from preimage.model.validation import check_count, check_latent, coarsest, input_precision


@dataclass(frozen=True)
class Network:
    """A generator G: an ordered tuple of layers, latent first.

    Build one with `random_network`, `Network.from_torch`, `Network.from_onnx`,
    `Network.from_state_dict`, `Network.from_file` or `Network.from_weights`.

    Attributes
    ----------
    layers : tuple of Layer
    source_dtype : the dtype of the weights it came from ("float32" for a float32
        module or file): the default tolerance of `preimage.invert` follows it
    input_shape, output_shape : the shapes of one code and one output as the
        model sees them (DCGAN: (nz, 1, 1) and (C, H, W)); the layers work on
        their flattenings, of widths `latent_dim` and `output_dim`
    """

    layers: tuple[Layer, ...]
    source_dtype: str = "float64"
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None

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
        for name, width in (("input_shape", layers[0].in_width),
                            ("output_shape", layers[-1].out_width)):
            shape = getattr(self, name)
            shape = (width,) if shape is None else tuple(int(v) for v in shape)
            if int(np.prod(shape)) != width:
                raise ValueError(f"`{name}` {shape} does not have {width} entries.")
            object.__setattr__(self, name, shape)

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
        """G(z) in float64, flattened.

        Parameters
        ----------
        z : array-like of shape (k,) or (B, k), or (*input_shape) or (B, *input_shape)

        Returns
        -------
        ndarray of shape (n,) or (B, n) (reshape to `output_shape` for the model's view)
        """
        zb, single = check_latent(flatten_samples(z, self.input_shape, "z"), self.latent_dim)
        h = self.apply(zb)
        return h[0] if single else h

    def apply(self, zb: np.ndarray) -> np.ndarray:
        """G(z) (B, n) of a float64 batch zb (B, k) the library computed itself, unchecked:
        an answer may exceed the magnitudes `forward` accepts of a caller's z where x is
        near them (x of magnitude 9e99 through a 5-20-50 net: z up to 1.9e100)."""
        h = zb
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def forward_all(self, z: np.ndarray) -> list[np.ndarray]:
        """Every layer's output for a batch z of shape (B, k): [z, x_1, ..., x_d]."""
        zb, _ = check_latent(flatten_samples(z, self.input_shape, "z"), self.latent_dim)
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

        ``activation`` is one kind for every layer or one per layer. The network's
        ``source_dtype`` is the least precise dtype among the matrices and biases (float32
        weights: float32 rounding in its outputs, `preimage.results.default_rtol`).
        """
        if not isinstance(weights, Sequence) or isinstance(weights, str):
            raise TypeError(
                f"`weights` must be a list of matrices W_1, ..., W_d; got "
                f"{type(weights).__name__}."
            )
        weights = list(weights)
        if not weights:
            raise ValueError("`weights` must hold at least one matrix.")
        if biases is None:
            biases = [None] * len(weights)
        if not isinstance(biases, Sequence) or isinstance(biases, str):
            raise TypeError(
                f"`biases` must be a list of vectors (or None), one per layer; got "
                f"{type(biases).__name__}."
            )
        if len(biases) != len(weights):
            raise ValueError(
                f"`biases` has {len(biases)} entries but `weights` has {len(weights)}."
            )
        kinds = [activation] * len(weights) if isinstance(activation, str) else (
            list(activation) if isinstance(activation, Sequence) else [activation])
        if len(kinds) != len(weights):
            raise ValueError(
                f"`activation` lists {len(kinds)} kinds but there are {len(weights)} layers."
            )
        layers = []
        for w, b, kind in zip(weights, biases, kinds, strict=True):
            slope = negative_slope if kind == "leaky_relu" else 0.0
            layers.append(Layer(DenseOperator(w), b, Activation(kind, slope)))
        dtype = coarsest(*(input_precision(a) for a in [*weights, *biases] if a is not None))
        return cls(tuple(layers), source_dtype=dtype)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        layers: Sequence[str],
        *,
        activation: ActivationKind = "relu",
        negative_slope: float = 0.1,
        source: str = "The state dict",
    ) -> Network:
        """A network from named linear layers of a PyTorch state dict.

        For example the decoder of the paper authors' VAE:
        ``Network.from_state_dict(sd, ["fc3", "fc4"], activation="relu")``
        reads ``fc3.weight``, ``fc4.weight`` (and ``.bias`` where present) and
        puts ``activation`` after every layer, the output layer too. A missing,
        misshapen or non-finite tensor raises a ValueError naming it (and
        `source`, the file it came from).
        """
        found, dtype = files.layers_from_state_dict(
            state_dict, layers, activation=Activation(
                activation, negative_slope if activation == "leaky_relu" else 0.0
            ), source=source,
        )
        return cls(tuple(found), source_dtype=dtype)

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

        ``.pt`` files are read with ``torch.load(weights_only=True)``: no code
        runs, and a pickle that asks for any class or function other than
        tensors is refused (`preimage.model.files`); a checkpoint dict holding
        its weights under ``"state_dict"`` is
        unwrapped. ``layers`` names the linear layers of G in order (e.g.
        ``["fc3", "fc4"]``: the decoder of a VAE); without it every 2-D
        ``*.weight`` of the file is taken, in file order, and they must chain
        (each layer's input width the previous one's output width). Then as
        `from_state_dict`.
        """
        state, names = files.read_state_dict(path, layers)
        return cls.from_state_dict(
            state, names, activation=activation, negative_slope=negative_slope,
            source=str(path),
        )

    @classmethod
    def from_torch(
        cls, module: Any, *, entry: str = "forward", input_shape: Sequence[int] | None = None
    ) -> Network:
        """A network from a PyTorch module (in eval mode).

        Accepts any module whose ``entry`` method (default ``forward``;
        ``entry="decode"`` takes the decoder of a VAE) is a chain of linear
        layers (Linear, Conv2d, ConvTranspose2d, Upsample), batch norms, reshapes
        and monotone activations (`preimage.model.torch_io` lists them): a
        DCGAN generator, a Conv2d + Upsample decoder, an MLP. ``input_shape``:
        the shape of one code, read off the first layer when not given ((nz, 1, 1)
        before a ConvTranspose2d). Anything else raises a TypeError naming the
        operation and its module path; a batch norm in training mode a
        ValueError asking for ``.eval()``.
        """
        layers, dtype, shape_in, shape_out = torch_io.layers_from_module(
            module, entry=entry, input_shape=input_shape
        )
        return cls(tuple(layers), source_dtype=dtype, input_shape=shape_in, output_shape=shape_out)

    @classmethod
    def from_onnx(cls, path: str | Path) -> Network:
        """A network from an ONNX file (`preimage.model.onnx_io`: the operators it reads)."""
        layers, dtype, shape_in, shape_out = onnx_io.layers_from_onnx(path)
        return cls(tuple(layers), source_dtype=dtype, input_shape=shape_in, output_shape=shape_out)

    def to_torch(self, dtype: Any = None) -> Any:
        """An ``nn.Sequential`` computing the same G (float64 unless ``dtype``: a torch
        floating dtype or its name, "float32")."""
        dtype = None if dtype is None else torch_io.torch_dtype(dtype)
        return torch_io.module_from_layers(self.layers, dtype=dtype)

    def input_nonnegative(self, i: int) -> bool:
        """Whether layer i's input is known to be >= 0 (the output of a ReLU or sigmoid)."""
        return i > 0 and self.layers[i - 1].activation.output_nonnegative

    def below(self, top: int) -> Network:
        """The network of layers 0..top-1 (the generator of layer `top`'s input)."""
        return Network(self.layers[:top], source_dtype=self.source_dtype,
                       input_shape=self.input_shape)

    def shape_codes(self, z: np.ndarray) -> np.ndarray:
        """Flat codes (..., k) in the model's own `input_shape` (..., *input_shape)."""
        return np.asarray(z).reshape(*np.shape(z)[:-1], *self.input_shape)


def flatten_samples(value: object, shape: Sequence[int], name: str) -> object:
    """An array of one sample (*shape) or a batch (B, *shape) flattened to (n,) or (B, n).

    Anything else (already flat, or of the wrong shape: the validators report it)
    is returned as it is.
    """
    shape = tuple(shape)
    try:
        arr_shape = tuple(getattr(value, "shape", np.shape(value) if isinstance(value, list)
                                  else ()))
    except ValueError:  # a ragged nested list: the validators say so
        return value
    if len(shape) <= 1 or not arr_shape:
        return value
    n = int(np.prod(shape))
    if arr_shape == shape:
        return np.reshape(value, (n,)) if not hasattr(value, "detach") else value.reshape(n)
    if len(arr_shape) == len(shape) + 1 and arr_shape[1:] == shape:
        batch = arr_shape[0]
        return (value.reshape(batch, n) if hasattr(value, "reshape")
                else np.reshape(value, (batch, n)))
    if len(arr_shape) > 2:
        raise ValueError(
            f"`{name}` must have shape {shape} or (batch, {', '.join(map(str, shape))}), or be "
            f"flat: ({n},) or (batch, {n}); got an array of shape {arr_shape}."
        )
    return value


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
    if isinstance(widths, str) or np.ndim(widths) != 1 or len(widths) < 2:
        raise ValueError(
            f"`widths` must list at least two positive widths [k, n_1, ...]; got {widths!r:.60}."
        )
    widths = [check_count(w, f"widths[{i}]", 1) for i, w in enumerate(widths)]
    if not isinstance(seed, np.random.Generator) and seed is not None:
        seed = check_count(seed, "seed", 0)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(widths):
        weights.append(rng.standard_normal((n_out, n_in)) / np.sqrt(n_out))
        biases.append(rng.standard_normal(n_out) * bias_scale / np.sqrt(n_out) if bias else None)
    return Network.from_weights(
        weights, biases, activation=activation, negative_slope=negative_slope
    )
