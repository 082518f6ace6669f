"""The generators users have: convolutions, batch norm, smooth activations, shapes, ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import preimage
from preimage import Network, invert
from preimage.model.activations import Activation
from preimage.model.structured import (
    ComposedOperator,
    Conv2dOperator,
    DiagonalOperator,
    UpsampleOperator,
)


def dcgan(nz: int = 100, ngf: int = 4, nc: int = 3) -> nn.Module:
    """The DCGAN generator of PyTorch's examples (64 x 64 images), with ngf as given."""
    torch.manual_seed(0)
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    for m in g.modules():  # trained-looking statistics, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return g.eval()


class ExamplesGenerator(nn.Module):
    """As in PyTorch's dcgan example: `forward` tests `input.is_cuda` (no symbolic tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ngpu = 1
        self.main = dcgan(nz=16, ngf=2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_cuda and self.ngpu > 1:
            return nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        return self.main(input)


def upsample_decoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(8, 16 * 4 * 4), nn.Unflatten(1, (16, 4, 4)), nn.BatchNorm2d(16), nn.ELU(),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid(),
    ).eval()


class SoftplusDecoder(nn.Module):
    """The CSGM MNIST VAE's decoder shape: softplus hidden units, a sigmoid output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc3 = nn.Linear(10, 60)
        self.fc4 = nn.Linear(60, 120)
        self.fc5 = nn.Linear(120, 200)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = nn.functional.softplus(self.fc3(z))
        h = nn.functional.softplus(self.fc4(h), beta=2.0)
        return torch.sigmoid(self.fc5(h))


def _module_output(module: nn.Module, z: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.as_tensor(z.reshape(len(z), *shape), dtype=torch.float32))
    return out.reshape(len(z), -1).double().numpy()


@pytest.mark.parametrize("factory", [dcgan, ExamplesGenerator, upsample_decoder, SoftplusDecoder])
def test_forward_equals_the_module(factory: object) -> None:
    module = factory()  # type: ignore[operator]
    net = Network.from_torch(module)
    assert net.source_dtype == "float32"
    z = np.random.default_rng(0).standard_normal((3, net.latent_dim))
    ref = _module_output(module, z, net.input_shape)
    assert np.max(np.abs(net.forward(z) - ref)) < 1e-5 * max(1.0, np.abs(ref).max())
    assert np.allclose(net.forward(net.shape_codes(z)), net.forward(z))  # shaped codes too


def test_dcgan_layout() -> None:
    net = Network.from_torch(dcgan(nz=100, ngf=4, nc=3))
    assert net.input_shape == (100, 1, 1) and net.output_shape == (3, 64, 64)
    assert net.widths == [100, 32 * 16, 16 * 64, 8 * 256, 4 * 1024, 3 * 4096]
    assert [str(layer.activation) for layer in net.layers] == ["relu"] * 4 + ["tanh"]
    # batch norms folded into the transposed convolutions' kernels and biases
    assert all(isinstance(layer.weight, Conv2dOperator) for layer in net.layers)
    assert all(layer.bias is not None for layer in net.layers[:4])


def _operators() -> list[object]:
    rng = np.random.default_rng(0)
    conv = Conv2dOperator(rng.standard_normal((3, 2, 3, 3)), (2, 7, 6), stride=2, padding=1)
    return [
        conv,
        Conv2dOperator(rng.standard_normal((2, 3, 4, 4)), (2, 5, 5), stride=2, padding=1,
                       transposed=True, output_padding=1),
        Conv2dOperator(rng.standard_normal((3, 2, 3, 2)), (2, 8, 9), stride=(1, 2),
                       padding=(2, 0), dilation=(2, 1)),
        UpsampleOperator((2, 3, 4), scale_factor=2, mode="nearest"),
        UpsampleOperator((2, 3, 4), scale_factor=2, mode="bilinear", align_corners=False),
        UpsampleOperator((2, 3, 4), size=(7, 5), mode="bilinear", align_corners=True),
        UpsampleOperator((2, 3, 4), scale_factor=1.5, mode="bilinear"),
        UpsampleOperator((2, 3, 4), scale_factor=2.5, mode="nearest"),
        # a scale that leaves an axis's size as it is (3 at 1.2): torch copies that axis
        UpsampleOperator((2, 3, 4), scale_factor=(1.2, 1.6), mode="bilinear"),
        UpsampleOperator((2, 3, 4), scale_factor=1.2, mode="nearest"),
        DiagonalOperator(rng.standard_normal(24), (2, 3, 4)),
        ComposedOperator([UpsampleOperator((2, 3, 4), scale_factor=2), conv.__class__(
            rng.standard_normal((1, 2, 3, 3)), (2, 6, 8), padding=1)]),
    ]


@pytest.mark.parametrize("op", _operators(), ids=repr)
def test_operators_are_adjoint_and_sparse_equals_dense(op: object) -> None:
    rng = np.random.default_rng(1)
    m, n = op.shape  # type: ignore[attr-defined]
    h, y = rng.standard_normal((3, n)), rng.standard_normal((3, m))
    dense = op.matrix().toarray()  # type: ignore[attr-defined]
    applied = op.apply(h)  # type: ignore[attr-defined]
    assert np.allclose(applied, h @ dense.T, atol=1e-12)
    assert abs(np.sum(applied * y) - np.sum(h * op.adjoint(y))) < 1e-10 * n  # type: ignore[attr-defined]
    rows = np.array([0, m // 2, m - 1])
    assert np.array_equal(op.rows(rows), dense[rows])  # type: ignore[attr-defined]


@given(
    c_in=st.integers(1, 3), c_out=st.integers(1, 3), size=st.integers(3, 7),
    kernel=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
    dilation=st.integers(1, 2), transposed=st.booleans(), seed=st.integers(0, 99),
)
def test_convolution_matrix_matches_torch(c_in: int, c_out: int, size: int, kernel: int,
                                          stride: int, pad: int, dilation: int,
                                          transposed: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c_in, c_out, kernel, kernel) if transposed
                                 else (c_out, c_in, kernel, kernel))
    extra = {"output_padding": min(stride, dilation) - 1} if transposed else {}
    try:
        op = Conv2dOperator(weight, (c_in, size, size), stride=stride, padding=pad,
                            dilation=dilation, transposed=transposed, **extra)
    except ValueError:
        return  # no output for this size: torch refuses it too
    h = rng.standard_normal((2, op.shape[1]))
    assert np.allclose(op.matrix() @ h.T, op.apply(h).T, atol=1e-12)


def test_shapes_in_and_out_of_invert() -> None:
    """A DCGAN-shaped net: x as (B, C, H, W) or flat, z back as (B, nz, 1, 1)."""
    torch.manual_seed(3)
    g = nn.Sequential(nn.ConvTranspose2d(3, 16, 3), nn.ReLU(), nn.ConvTranspose2d(16, 24, 3),
                      nn.ReLU()).eval()
    net = Network.from_torch(g)
    assert net.input_shape == (3, 1, 1) and net.output_shape == (24, 5, 5)
    z = np.random.default_rng(0).standard_normal((4, 3, 1, 1))
    x = net.forward(z).reshape(4, 24, 5, 5)
    shaped = invert(net, x, rtol=1e-9)
    flat = invert(net, x.reshape(4, -1), rtol=1e-9)
    assert shaped.z.shape == (4, 3, 1, 1) and shaped.witness.shape == (4, 3, 1, 1)
    assert np.array_equal(shaped.z, flat.z) and list(shaped.status) == list(flat.status)
    assert list(shaped.status) == ["unique"] * 4 and np.allclose(shaped.z, z, atol=1e-9)
    one = invert(net, x[0], rtol=1e-9)
    assert one.z.shape == (3, 1, 1) and isinstance(one.status, str)
    with pytest.raises(ValueError, match=r"`x` must have shape \(24, 5, 5\) or \(batch, 24, "):
        invert(net, x[:, :, :4])
    with pytest.raises(ValueError, match=r"`x` has 599 entries per sample"):
        invert(net, x.reshape(4, -1)[:, 1:])


def test_a_small_convolutional_net_is_inverted_exactly_through_its_sparse_operators() -> None:
    torch.manual_seed(4)
    g = nn.Sequential(nn.Linear(4, 2 * 3 * 3), nn.Unflatten(1, (2, 3, 3)), nn.ReLU(),
                      nn.ConvTranspose2d(2, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU()).eval()
    g[4].running_mean.uniform_(-0.3, 0.3)
    net = Network.from_torch(g)
    z = np.random.default_rng(5).standard_normal((20, 4))
    x = net.forward(z)
    fast = invert(net, x, rtol=1e-9)
    ref = invert(net, x, rtol=1e-9, batched=False)
    assert list(fast.status) == list(ref.status)
    assert not np.any(fast.status == "infeasible")
    unique = fast.status == "unique"
    assert unique.sum() >= 10 and np.allclose(fast.z[unique], z[unique], atol=1e-8)


def test_the_convolutional_decoder_runs_the_hybrid_and_says_so() -> None:
    """A contracting last layer (an image generator's): the layer-wise method cannot run."""
    torch.manual_seed(6)
    g = nn.Sequential(nn.Linear(3, 8 * 4 * 4), nn.Unflatten(1, (8, 4, 4)), nn.ReLU(),
                      nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1), nn.Sigmoid()).eval()
    net = Network.from_torch(g)  # 3 -> 128 -> 64: the last layer contracts by 64 > ...
    assert net.widths == [3, 128, 64]
    from preimage.methods import layerwise

    reason_free = layerwise.layerwise_obstacle(net)
    assert reason_free is None  # ... MAX_NULLITY: small; force the route by lowering it
    old = layerwise.MAX_NULLITY
    layerwise.MAX_NULLITY = 10
    try:
        z = np.random.default_rng(7).standard_normal((3, 3))
        res = invert(net, net.forward(z), rtol=1e-9, options={"steps": 200, "restarts": 2})
        # method="hybrid" asked for by name, with noise too: no LP start on that layer
        # (the per-layer LPs over every unit), random starts as above, and it says why
        named = invert(net, net.forward(z), method="hybrid", noise="linf",
                       options={"steps": 200, "restarts": 2})
    finally:
        layerwise.MAX_NULLITY = old
    assert res.method == "hybrid"
    assert all("contracts" in m and "hybrid ran instead" in m for m in res.message)
    assert not np.any(res.status == "unique")  # nothing proved about uniqueness
    recovered = np.linalg.norm(res.z - z, axis=1) < 1e-6 * np.linalg.norm(z, axis=1)
    assert recovered.sum() >= 2 and np.all(res.residual[recovered] < 1e-8)
    assert all("LP estimate" not in m and "contracts" in m for m in named.message)
    assert np.all(named.misfit < 1e-6)


@pytest.mark.parametrize("kind", ["relu", "leaky_relu"])
def test_float32_modules_and_their_data(kind: str) -> None:
    """The shipped decoders as the float32 modules they are: x as a float32 tensor or as
    float64 NumPy (`.double().numpy()`): the network's precision sets the tolerance, so no
    false "infeasible", answers reproduce x to float32 precision, no wrong "unique"."""
    from preimage.model.mnist import load_vae

    vae = load_vae(kind)
    net = Network.from_torch(vae, entry="decode")
    assert net.source_dtype == "float32"
    z = np.random.default_rng(0).standard_normal((40, net.latent_dim))
    with torch.no_grad():
        x32 = vae.decode(torch.as_tensor(z, dtype=torch.float32))
    for x in (x32, x32.double().numpy()):
        res = invert(net, x)
        assert res.rtol == 1e-5
        assert not np.any(res.status == "infeasible")
        in_range = res.success & (res.residual <= 10 * res.rtol)  # G(z_hat) = x in float32
        assert in_range.mean() >= 0.92
        err = np.linalg.norm(res.z - z, axis=1) / np.linalg.norm(z, axis=1)
        assert np.all(err[res.status == "unique"] < 1e-3)


def test_training_mode_groups_and_unsupported_layers_are_refused() -> None:
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode.*\.eval\(\)"):
        Network.from_torch(bn)
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.ReLU()).eval()
    with pytest.raises(TypeError, match="groups=2"):
        Network.from_torch(grouped)
    with pytest.raises(TypeError, match="input_shape"):
        Network.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval())
    net = Network.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(),
                             input_shape=(1, 5, 5))
    assert net.output_shape == (2, 3, 3)


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 3), nn.GELU())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


@pytest.mark.parametrize(
    ("activation", "outside"), [("tanh", 1.5), ("sigmoid", -0.2), ("elu", -1.5),
                                ("softplus", -0.1)]
)
def test_outputs_outside_an_activations_range_get_a_clear_verdict(
    activation: str, outside: float
) -> None:
    net = Network.from_weights([np.random.default_rng(0).standard_normal((6, 2))],
                               activation=activation)  # type: ignore[arg-type]
    x = net.forward(np.ones(2))
    x[0] = outside
    res = invert(net, x)
    assert res.status == "infeasible"
    assert "outside the range" in res.message and res.misfit > 0
    assert np.isfinite(res.misfit)


@pytest.mark.parametrize("act", [Activation("elu", alpha=0.7), Activation("softplus", beta=2.0),
                                 Activation("tanh"), Activation("sigmoid")])
def test_smooth_activations_invert_and_match_torch(act: Activation) -> None:
    pre = np.linspace(-6, 6, 97)
    y = act(pre)
    assert np.allclose(act.torch(torch.tensor(pre)).numpy(), y, atol=1e-15)
    assert np.allclose(act.inverse(y), pre, atol=1e-9)
    lo, hi = act.range
    assert act.inverse(np.array([lo - 1.0]))[0] == -np.inf
    if np.isfinite(hi):
        assert act.inverse(np.array([hi]))[0] == np.inf



def test_a_softplus_whose_jump_makes_it_two_to_one_is_refused() -> None:
    # torch's Softplus(threshold=1) jumps down by 0.31 at pre = 1 (to pre itself): 0.8 and
    # 1.17 map to the same output, so no inversion of it can say "unique"
    act = nn.Softplus(beta=1.0, threshold=1.0)
    pre = torch.tensor([0.8, 1.1711006659477776], dtype=torch.float64)
    assert abs(float(act(pre)[0] - act(pre)[1])) < 1e-12
    with pytest.raises(ValueError, match="threshold 1 is not invertible"):
        Activation("softplus", threshold=1.0)
    g = nn.Sequential(nn.Linear(3, 30), act).double().eval()
    with pytest.raises(ValueError, match=r"'1' \(Softplus\).*not invertible"):
        Network.from_torch(g)
    # the default threshold's jump (2e-9) is far below every tolerance: read as before
    smooth = nn.Sequential(nn.Linear(3, 30), nn.Softplus()).eval()
    assert Network.from_torch(smooth).widths == [3, 30]


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["z"],
                          output_names=["x"], dynamic_axes={"z": {0: "b"}, "x": {0: "b"}})


@pytest.mark.parametrize("factory", [dcgan, upsample_decoder])
def test_onnx_gives_the_forward_pass_and_inversion_of_from_torch(
    factory: object, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    module = factory()  # type: ignore[operator]
    net = Network.from_torch(module)
    path = tmp_path / "g.onnx"
    _export(module, torch.zeros((1, *net.input_shape)), path)
    onnx_net = Network.from_onnx(path)
    assert onnx_net.input_shape == net.input_shape and onnx_net.output_shape == net.output_shape
    z = np.random.default_rng(0).standard_normal((3, net.latent_dim))
    ref = _module_output(module, z, net.input_shape)
    assert np.max(np.abs(onnx_net.forward(z) - ref)) < 1e-6 * max(1.0, np.abs(ref).max())
    # (the exporter folds batch norms itself, in float32: agreement to float32 rounding)
    assert np.max(np.abs(onnx_net.forward(z) - net.forward(z))) < 1e-6


def test_onnx_small_net_inverts_like_from_torch(tmp_path: Path) -> None:
    torch.manual_seed(8)
    module = nn.Sequential(nn.Linear(5, 30), nn.ReLU(), nn.Linear(30, 80), nn.LeakyReLU(0.1),
                           nn.Linear(80, 60), nn.Tanh()).eval()
    path = tmp_path / "mlp.onnx"
    _export(module, torch.zeros((1, 5)), path)
    a, b = Network.from_torch(module), Network.from_onnx(path)
    x = a.forward(np.random.default_rng(1).standard_normal((6, 5)))
    ra, rb = invert(a, x), invert(b, x)
    assert list(ra.status) == list(rb.status)
    assert np.allclose(ra.z, rb.z, atol=1e-9, equal_nan=True)


def test_bad_onnx_files_get_clear_errors(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        Network.from_onnx(junk)
    with pytest.raises(FileNotFoundError):
        Network.from_onnx(tmp_path / "missing.onnx")
    module = nn.Sequential(nn.Linear(3, 4), nn.GELU()).eval()
    path = tmp_path / "gelu.onnx"
    _export(module, torch.zeros((1, 3)), path)
    with pytest.raises(TypeError, match=r"unsupported node .*\((Gelu|Erf|Div|Mul)\)|Gelu|Erf"):
        Network.from_onnx(path)


def test_the_cli_reads_onnx_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    from preimage.apps.cli import main

    torch.manual_seed(9)
    module = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 50), nn.ReLU()).eval()
    path = tmp_path / "g.onnx"
    _export(module, torch.zeros((1, 4)), path)
    assert main(["invert", str(path), "--codes", "5"]) == 0
    assert "recovered the true code" in capsys.readouterr().out


def test_an_unsupported_op_names_its_module_path() -> None:
    with pytest.raises(TypeError, match=r"'body.1' \(GELU\)"):
        Network.from_torch(_Wrapped())
    assert isinstance(preimage.Network.from_torch(nn.Sequential(nn.Linear(2, 3))), Network)
