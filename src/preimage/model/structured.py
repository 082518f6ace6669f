"""Structured linear operators: convolutions, transposed convolutions, upsampling, diagonals.

Each acts on the flattened (C, H, W) tensor of one sample, a row of a batch
(B, C H W), and implements `preimage.model.operators.LinearOperator`:

- ``apply`` and ``adjoint`` through torch's own functional ops (float64 on
  the CPU), so they are what the module computes;
- ``matrix()``: a ``scipy.sparse`` CSR matrix built directly from the kernel
  by index arithmetic (no dense matrix, no probing with unit vectors), for the
  LPs; ``rows(index)`` reads dense rows from it;
- ``torch_module()``: a differentiable ``nn.Module`` on flattened inputs, for
  the gradient methods (`preimage.model.torch_io.module_from_layers`).

`ComposedOperator` chains operators that follow each other without an
activation (an upsampling then a convolution; batch norm folded into a
`DiagonalOperator`), `DenseOperator` is the dense case.

Convolutions follow ``torch.nn.Conv2d`` / ``ConvTranspose2d``:

    conv:       out[o, y, x] = sum_{i, ky, kx} K[o, i, ky, kx] in[i, y s - p + ky d, x s - p + kx d]
    transposed: out[o, y s - p + ky d, x s - p + kx d] += K[i, o, ky, kx] in[i, y, x]

(groups = 1), with output sizes as torch computes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse

Shape = tuple[int, ...]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class _Structured:
    """Shared parts: shapes, rows from the sparse matrix (built once), the adjoint by it."""

    in_shape: Shape
    out_shape: Shape
    _csr: sparse.csr_matrix | None = None
    _csc: sparse.csc_matrix | None = None
    _float64: dict[str, Any] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(np.prod(self.out_shape)), int(np.prod(self.in_shape))

    def _build(self) -> sparse.csr_matrix:
        raise NotImplementedError

    def matrix(self) -> sparse.csr_matrix:
        """The operator as an (m, n) ``scipy.sparse`` CSR matrix (built once, read-only use)."""
        if self._csr is None:
            self._csr = sparse.csr_matrix(self._build())
            self._csr.sum_duplicates()
        return self._csr

    def rows(self, index: np.ndarray) -> np.ndarray:
        return self.matrix()[np.asarray(index)].toarray()

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        if self._csc is None:
            self._csc = self.matrix().tocsc()
        return np.asarray(self._csc.T @ np.asarray(y, dtype=np.float64).T).T

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_shape} -> {self.out_shape})"


def _torch_call(op: Any, h: np.ndarray) -> np.ndarray:
    """op applied to a NumPy batch (B, n) through its torch function, in float64."""
    import torch

    batch = np.ascontiguousarray(h, dtype=np.float64)
    if not batch.flags.writeable:  # (torch warns on read-only memory; it only reads it here)
        batch = batch.copy()
    x = torch.from_numpy(batch).reshape(batch.shape[0], *op.in_shape)
    if op._float64 is None:  # the float64 parameters, converted once
        op._float64 = op.torch_parameters(torch.float64)
    with torch.no_grad():
        out = op.torch_forward(x, op._float64)
    return out.reshape(batch.shape[0], -1).numpy()


class _OperatorModule:
    """Factory of the nn.Module of an operator (its parameters as buffers: `.to(dtype)` works)."""

    @staticmethod
    def make(op: Any) -> Any:
        import torch
        from torch import nn

        class OperatorModule(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                for name, value in op.torch_parameters(torch.float64).items():
                    self.register_buffer(name, value)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                params = {name: getattr(self, name) for name, _ in self.named_buffers()}
                out = op.torch_forward(x.reshape(x.shape[0], *op.in_shape), params)
                return out.reshape(x.shape[0], -1)

            def extra_repr(self) -> str:
                return repr(op)

        return OperatorModule()


def _axis_triples(size_in: int, size_out: int, kernel: int, stride: int, pad: int,
                  dilation: int, transposed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, every valid (output index, kernel index, input index) of the kernel."""
    if transposed:
        i, k = np.meshgrid(np.arange(size_in), np.arange(kernel), indexing="ij")
        o = i * stride - pad + k * dilation
        valid = (o >= 0) & (o < size_out)
    else:
        o, k = np.meshgrid(np.arange(size_out), np.arange(kernel), indexing="ij")
        i = o * stride - pad + k * dilation
        valid = (i >= 0) & (i < size_in)
    return o[valid], k[valid], i[valid]


class Conv2dOperator(_Structured):
    """``torch.nn.Conv2d`` (groups = 1, no bias: the layer keeps it) on (C_in, H, W) inputs.

    Parameters
    ----------
    weight : array of shape (C_out, C_in, KH, KW)
    in_shape : (C_in, H, W)
    stride, padding, dilation : ints or pairs, as in torch (padding as numbers)
    transposed : ``ConvTranspose2d`` instead (weight (C_in, C_out, KH, KW)), with
        ``output_padding``
    """

    def __init__(
        self,
        weight: Any,
        in_shape: Sequence[int],
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        transposed: bool = False,
        output_padding: Any = 0,
    ) -> None:
        w = np.array(weight, dtype=np.float64, copy=True)
        if w.ndim != 4:
            raise ValueError(f"A convolution kernel must be 4-D; got shape {w.shape}.")
        if not np.all(np.isfinite(w)):
            raise ValueError("A convolution kernel contains NaN or inf.")
        w.setflags(write=False)
        self.weight = w
        self.transposed = bool(transposed)
        c_in = w.shape[0] if transposed else w.shape[1]
        c_out = w.shape[1] if transposed else w.shape[0]
        if len(in_shape) != 3 or int(in_shape[0]) != c_in:
            raise ValueError(
                f"A convolution with {c_in} input channels needs inputs of shape "
                f"({c_in}, H, W); got {tuple(in_shape)}."
            )
        self.in_shape = tuple(int(v) for v in in_shape)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.dilation, self.output_padding = _pair(dilation), _pair(output_padding)
        _, h, wd = self.in_shape
        sizes = []
        for axis, size in enumerate((h, wd)):
            k, s, p, d = (w.shape[2 + axis], self.stride[axis], self.padding[axis],
                          self.dilation[axis])
            if transposed:
                sizes.append((size - 1) * s - 2 * p + d * (k - 1) + self.output_padding[axis] + 1)
            else:
                sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        if min(sizes) < 1:
            raise ValueError(f"The convolution leaves no output for inputs of shape {in_shape}.")
        self.out_shape = (c_out, sizes[0], sizes[1])

    def _build(self) -> sparse.coo_matrix:
        c_out, oh, ow = self.out_shape
        c_in, h, wd = self.in_shape
        kh, kw = self.weight.shape[2:]
        oy, ky, iy = _axis_triples(h, oh, kh, self.stride[0], self.padding[0],
                                   self.dilation[0], self.transposed)
        ox, kx, ix = _axis_triples(wd, ow, kw, self.stride[1], self.padding[1],
                                   self.dilation[1], self.transposed)
        co = np.arange(c_out)[:, None, None, None]
        ci = np.arange(c_in)[None, :, None, None]
        oy_, ky_, iy_ = (a[None, None, :, None] for a in (oy, ky, iy))
        ox_, kx_, ix_ = (a[None, None, None, :] for a in (ox, kx, ix))
        rows = (co * oh + oy_) * ow + ox_
        cols = (ci * h + iy_) * wd + ix_
        vals = (self.weight[ci, co, ky_, kx_] if self.transposed
                else self.weight[co, ci, ky_, kx_])
        full = np.broadcast_shapes(rows.shape, cols.shape, vals.shape)
        return sparse.coo_matrix(
            (np.broadcast_to(vals, full).ravel(),
             (np.broadcast_to(rows, full).ravel(), np.broadcast_to(cols, full).ravel())),
            shape=self.shape,
        )

    def torch_parameters(self, dtype: Any) -> dict[str, Any]:
        import torch

        return {"weight": torch.tensor(np.array(self.weight), dtype=dtype)}

    def torch_forward(self, x: Any, params: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        if self.transposed:
            return F.conv_transpose2d(
                x, params["weight"], stride=self.stride, padding=self.padding,
                output_padding=self.output_padding, dilation=self.dilation,
            )
        return F.conv2d(x, params["weight"], stride=self.stride, padding=self.padding,
                        dilation=self.dilation)

    def apply(self, h: np.ndarray) -> np.ndarray:
        return _torch_call(self, h)

    def torch_module(self) -> Any:
        return _OperatorModule.make(self)


def _interpolation_matrix(size_in: int, size_out: int, mode: str, align_corners: bool,
                          scale: float | None) -> sparse.csr_matrix:
    """The (size_out, size_in) matrix of torch's 1-D nearest / linear interpolation.

    scale: torch's source-per-destination ratio (1 / scale_factor when one was
    given), else size_in / size_out. An axis whose size the scale leaves unchanged (3 at a
    scale of 1.2) is copied, as torch's kernels do.
    """
    if size_in == size_out:  # torch copies such an axis, whatever the scale factor
        return sparse.identity(size_in, format="csr")
    dst = np.arange(size_out, dtype=np.float64)
    ratio = size_in / size_out if scale is None else scale
    if mode == "nearest":
        src = np.minimum(np.floor(dst * ratio).astype(np.int64), size_in - 1)
        return sparse.csr_matrix((np.ones(size_out), (np.arange(size_out), src)),
                                 shape=(size_out, size_in))
    if align_corners:
        ratio = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        pos = dst * ratio
    else:
        pos = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = pos - i0
    rows = np.concatenate([np.arange(size_out)] * 2)
    return sparse.csr_matrix(
        (np.concatenate([1.0 - frac, frac]), (rows, np.concatenate([i0, i1]))),
        shape=(size_out, size_in),
    )


class UpsampleOperator(_Structured):
    """``torch.nn.Upsample`` (modes "nearest" and "bilinear") on (C, H, W) inputs."""

    def __init__(
        self,
        in_shape: Sequence[int],
        *,
        size: Any = None,
        scale_factor: Any = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
    ) -> None:
        if mode not in ("nearest", "bilinear"):
            raise TypeError(f"Upsampling mode {mode!r} is not supported (nearest, bilinear).")
        if len(in_shape) != 3:
            raise ValueError(f"Upsampling needs inputs of shape (C, H, W); got {tuple(in_shape)}.")
        self.in_shape = tuple(int(v) for v in in_shape)
        self.mode = mode
        self.align_corners = bool(align_corners) if mode == "bilinear" else None
        c, h, w = self.in_shape
        if size is not None:
            out = _pair(size)
            self.size: tuple[int, int] | None = out
            self.scale_factor: tuple[float, float] | None = None
        elif scale_factor is not None:
            factors = (scale_factor if isinstance(scale_factor, (tuple, list))
                       else (scale_factor, scale_factor))
            self.scale_factor = (float(factors[0]), float(factors[1]))
            self.size = None
            out = (int(np.floor(h * self.scale_factor[0])), int(np.floor(w * self.scale_factor[1])))
        else:
            raise ValueError("Upsampling needs a `size` or a `scale_factor`.")
        self.out_shape = (c, out[0], out[1])

    def _build(self) -> sparse.csr_matrix:
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        scales = (None, None) if self.scale_factor is None else (
            1.0 / self.scale_factor[0], 1.0 / self.scale_factor[1])
        ry = _interpolation_matrix(h, oh, self.mode, bool(self.align_corners), scales[0])
        rx = _interpolation_matrix(w, ow, self.mode, bool(self.align_corners), scales[1])
        return sparse.kron(sparse.identity(c, format="csr"), sparse.kron(ry, rx), format="csr")

    def torch_parameters(self, dtype: Any) -> dict[str, Any]:
        return {}

    def torch_forward(self, x: Any, params: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        kwargs: dict[str, Any] = {"mode": self.mode}
        if self.mode == "bilinear":
            kwargs["align_corners"] = self.align_corners
        if self.size is not None:
            return F.interpolate(x, size=self.size, **kwargs)
        return F.interpolate(x, scale_factor=self.scale_factor, **kwargs)

    def apply(self, h: np.ndarray) -> np.ndarray:
        return _torch_call(self, h)

    def torch_module(self) -> Any:
        return _OperatorModule.make(self)


class DiagonalOperator(_Structured):
    """h -> d * h elementwise (a folded batch norm's scale), on inputs of any shape."""

    def __init__(self, diagonal: Any, shape: Sequence[int]) -> None:
        d = np.array(diagonal, dtype=np.float64, copy=True).ravel()
        if d.size != int(np.prod(shape)) or not np.all(np.isfinite(d)):
            raise ValueError(f"A diagonal for shape {tuple(shape)} needs {int(np.prod(shape))} "
                             "finite entries.")
        d.setflags(write=False)
        self.diagonal = d
        self.in_shape = self.out_shape = tuple(int(v) for v in shape)

    def _build(self) -> sparse.csr_matrix:
        return sparse.diags(self.diagonal, format="csr")

    def apply(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, dtype=np.float64) * self.diagonal

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float64) * self.diagonal

    def torch_parameters(self, dtype: Any) -> dict[str, Any]:
        import torch

        return {"diagonal": torch.tensor(np.array(self.diagonal), dtype=dtype)}

    def torch_forward(self, x: Any, params: dict[str, Any]) -> Any:
        return x * params["diagonal"].reshape(self.in_shape)

    def torch_module(self) -> Any:
        return _OperatorModule.make(self)


class ComposedOperator(_Structured):
    """ops[-1] o ... o ops[0]: linear maps that follow each other without an activation."""

    def __init__(self, ops: Sequence[Any]) -> None:
        ops = list(ops)
        if not ops:
            raise ValueError("A composition needs at least one operator.")
        for first, second in itertools.pairwise(ops):
            if first.shape[0] != second.shape[1]:
                raise ValueError(f"{second!r} does not take the output of {first!r}.")
        self.ops = ops
        self.in_shape = tuple(getattr(ops[0], "in_shape", (ops[0].shape[1],)))
        self.out_shape = tuple(getattr(ops[-1], "out_shape", (ops[-1].shape[0],)))

    def _build(self) -> sparse.csr_matrix:
        product = sparse.csr_matrix(self.ops[0].matrix())
        for op in self.ops[1:]:
            product = sparse.csr_matrix(op.matrix()) @ product
        return product

    def apply(self, h: np.ndarray) -> np.ndarray:
        for op in self.ops:
            h = op.apply(h)
        return h

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def torch_module(self) -> Any:
        from torch import nn

        return nn.Sequential(*(op.torch_module() for op in self.ops))
