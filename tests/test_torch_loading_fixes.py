"""`Network.from_torch` on what it used to misread or refuse: interpolation settings, in-place
operations between modules, reshapes to the batch size read off the tensor, forwards fx
cannot trace, and the stderr noise of a wrong `input_shape`."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from preimage import Network
from preimage.model import torch_io


def _assert_reads_forward(module: nn.Module, net: Network, k: int, atol: float = 1e-5) -> None:
    """net.forward computes what the module computes, on random codes."""
    z = torch.randn(3, k, dtype=torch.float64)
    with torch.no_grad():
        x = module(z.to(next(module.parameters()).dtype)).reshape(3, -1).double().numpy()
    assert np.abs(net.forward(z.numpy()) - x).max() <= atol * max(1.0, np.abs(x).max())


class _Interp(nn.Module):
    """F.interpolate with the given arguments (positional after the input, then keywords)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(h, *self.args, **self.kwargs)


def _around(up: nn.Module, side: int = 7) -> nn.Module:
    """Linear -> (2, side, side) -> up -> Linear."""
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(4, 2 * side * side), nn.ReLU(), nn.Unflatten(1, (2, side, side)),
                        up, nn.Flatten()).eval()
    with torch.no_grad():
        width = mod(torch.zeros(1, 4)).shape[1]
    return mod.append(nn.Linear(width, 30)).eval()


# --- 1. interpolation settings -------------------------------------------------------------


@pytest.mark.parametrize("up", [
    nn.Upsample(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
    nn.Upsample(scale_factor=1.7, mode="nearest", recompute_scale_factor=True),
    _Interp(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
    _Interp(None, (1.7, 1.3), "nearest", None, True),  # every argument by position
    _Interp(None, 2.0, "bilinear", False),
], ids=["Upsample-bilinear", "Upsample-nearest", "interpolate", "positional", "positional-2"])
def test_interpolation_reads_recompute_scale_factor_and_positional_arguments(
    up: nn.Module,
) -> None:
    mod = _around(up)
    _assert_reads_forward(mod, Network.from_torch(mod), 4)


def test_interpolation_refuses_antialias_by_name() -> None:
    with pytest.raises(TypeError, match=r"interpolate.*antialias=True is not supported"):
        Network.from_torch(_around(_Interp(size=(5, 5), mode="bilinear", antialias=True), 12))


def test_interpolation_refuses_an_unsupported_mode_naming_the_module() -> None:
    with pytest.raises(TypeError, match=r"'3' \(Upsample\).*bicubic"):
        Network.from_torch(_around(nn.Upsample(scale_factor=2, mode="bicubic")))


# --- 2. the layers read are checked against the module's own forward --------------------------


class _Untraceable(nn.Module):
    """fc1, an operation in place, fc2, behind a branch on the code's shape (no fx tracing)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.op = nn.Linear(4, 20), nn.Linear(20, 30), op

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:  # (flat codes of any shape)
            z = z.reshape(len(z), -1)
        h = self.fc1(z)
        if self.op == "relu":
            F.relu(h, inplace=True)
        elif self.op == "tanh":
            h.tanh_()
        elif self.op == "mul":
            h.mul_(2.0)
        h = self.fc2(h)
        if self.op == "last":
            h.tanh_()
        return h


@pytest.mark.parametrize("op", ["relu", "tanh", "mul", "last"])
def test_an_operation_in_place_between_modules_is_refused(op: str) -> None:
    with pytest.raises(TypeError, match=r"_Untraceable.forward changes the output of fc[12] in "
                                        r"place.*symbolic tracing failed too"):
        Network.from_torch(_Untraceable(op).eval())


def test_an_untraceable_chain_is_still_read() -> None:
    mod = _Untraceable("none").eval()
    _assert_reads_forward(mod, Network.from_torch(mod), 4)


class _Doubled(nn.Linear):
    """A Linear whose own forward doubles it: read as a plain Linear where fx cannot look in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _Branching(nn.Module):
    """_Doubled, Tanh, Linear, behind a branch on the code's shape (no fx tracing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = _Doubled(4, 20), nn.Tanh(), nn.Linear(20, 30)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:
            z = z.reshape(len(z), -1)
        return self.fc2(self.act(self.fc1(z)))


def test_a_misread_is_refused_by_the_forward_check() -> None:
    with pytest.raises(TypeError, match=r"_Branching.forward does something the chain of layers "
                                        r"read from it does not.*differ by up to"):
        Network.from_torch(_Branching().eval())


def test_the_forward_check_catches_a_misread_in_the_traced_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = nn.Sequential(nn.Linear(4, 20), nn.LeakyReLU(0.2), nn.Linear(20, 30)).eval()
    monkeypatch.setattr(torch_io, "_leaky", lambda slope: torch_io.Activation("leaky_relu", 0.3))
    with pytest.raises(TypeError, match="does something the chain of layers"):
        Network.from_torch(mod)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_forward_check_passes_faithful_reads_and_leaves_the_module_alone(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                        nn.Tanh(), nn.Linear(64, 100), nn.Sigmoid())
    with torch.no_grad():
        mod[1].running_mean.uniform_(-0.5, 0.5)
        mod[1].running_var.uniform_(0.5, 2.0)
    mod = mod.eval().to(dtype)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    rng_state = torch.get_rng_state()
    net = Network.from_torch(mod)
    assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own generator, not torch's
    assert not any(p.grad is not None for p in mod.parameters())
    assert net.source_dtype == str(dtype).replace("torch.", "")


# --- 3. reshapes to the batch size read off the tensor ----------------------------------------


class _ViewGenerator(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 8 * 2 * 2)
        self.ct = nn.ConvTranspose2d(8, 1, 4, 2, 1)
        self.how = how

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z))
        if self.how == "size(0)":
            h = h.view(h.size(0), 8, 2, 2)
        elif self.how == "shape[0]":
            h = h.reshape(h.shape[0], 8, 2, 2)
        elif self.how == "size()[0] of z":
            h = torch.reshape(h, (z.size()[0], 8, 2, 2))
        else:  # a size other than the batch's
            h = h.view(-1, h.size(1) // 4, 2, 2)
        return torch.tanh(self.ct(h)).view(h.size(0), -1)


@pytest.mark.parametrize("how", ["size(0)", "shape[0]", "size()[0] of z"])
def test_a_view_to_the_batch_size_read_off_the_tensor_is_read(how: str) -> None:
    mod = _ViewGenerator(how).eval()
    net = Network.from_torch(mod)
    assert net.widths == [4, 32, 16] and net.output_shape == (16,)
    _assert_reads_forward(mod, net, 4)


def test_other_uses_of_a_tensor_size_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"uses a tensor's size \(size\).*batch dimension"):
        Network.from_torch(_ViewGenerator("size(1)").eval())


# --- 4. a TypeError of user code under fx tracing -----------------------------------------------


class _IntOfSize(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.act, self.out = nn.Linear(4, 10), act, nn.Linear(10, 6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(z.reshape(int(z.size(0)), 4))))


def test_a_type_error_under_tracing_falls_back_on_recording() -> None:
    mod = _IntOfSize(nn.ReLU()).eval()
    net = Network.from_torch(mod)
    assert net.widths == [4, 10, 6]
    _assert_reads_forward(mod, net, 4)


def test_after_the_fallback_an_unsupported_module_is_still_named() -> None:
    with pytest.raises(TypeError, match=r"'act' \(GELU\).*symbolic tracing failed too: "
                                        r"TypeError: int\(\)"):
        Network.from_torch(_IntOfSize(nn.GELU()).eval())


# --- 5. a wrong input_shape: one clear error, nothing printed ---------------------------------


def test_a_wrong_input_shape_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    mod = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 50)).eval()
    stderr = sys.stderr
    with pytest.raises(TypeError, match=r"fails on codes of shape \(6,\) \(RuntimeError: mat1 "
                                        r"and mat2 shapes cannot be multiplied"):
        Network.from_torch(mod, input_shape=(6,))
    assert sys.stderr is stderr
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 50), nn.ReLU())


def test_a_compiled_module_is_read_as_the_module_it_compiled() -> None:
    g = _mlp()
    net = Network.from_torch(torch.compile(g))
    _assert_reads_forward(g, net, 4)


@pytest.mark.parametrize("spectral_norm", [nn.utils.parametrizations.spectral_norm,
                                           nn.utils.spectral_norm])
def test_a_module_that_changes_its_buffers_when_run_is_refused_and_put_back(
    spectral_norm: Any,
) -> None:
    # a spectral norm in training mode runs its power iteration on every forward: reading
    # the module changed its buffers _u and _v (with the classic nn.utils.spectral_norm
    # the refusal blamed "an operation preimage did not see" instead)
    g = _mlp()
    g[0] = spectral_norm(g[0])
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with pytest.raises(ValueError, match=r"changes its buffers.*\.eval\(\)"):
        Network.from_torch(g)
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())
    _assert_reads_forward(g.eval(), Network.from_torch(g), 4)


def test_an_entry_that_is_no_method_is_named() -> None:
    with pytest.raises(TypeError, match="`entry`"):
        Network.from_torch(_mlp(), entry="training")


def test_reading_and_rebuilding_a_network_leave_torchs_random_numbers_alone() -> None:
    net = Network.from_torch(_mlp())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    net.to_torch()
    assert torch.equal(torch.rand(3), expected)


def test_a_module_on_the_meta_device_is_refused_by_what_it_lacks() -> None:
    # it was told to "pass the shape of one code as input_shape", which cannot help
    with pytest.raises(TypeError, match="'meta' device"):
        Network.from_torch(_mlp().to("meta"))


# --- 6. a forward that branches on the data; TorchScript; flat DCGAN codes ------------------


class _DataBranch(nn.Module):
    """Linear, a rescaling taken or not by the values of the data, ReLU, Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b, self.how = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 20), how

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.a(z)
        if self.how == "bool":
            if h.sum() > 0:
                h = h * 0.5
        elif self.how == "float":
            if float(h.max()) > 1.0:
                h = h * 0.5
        elif torch.equal(h, torch.zeros_like(h)):
            h = h + 1.0
        return self.b(self.act(h))


@pytest.mark.parametrize("how", ["bool", "float", "equal"])
def test_a_forward_that_branches_on_the_data_is_refused(how: str) -> None:
    # one recorded pass read one branch: the network then differed from the module on the
    # codes that take the other, and invert called the module's own outputs infeasible
    with pytest.raises(TypeError, match=r"_DataBranch.forward branches on its input.*after 'a' "
                                        r"\(Linear\).*fixed chain.*nn.Sequential"):
        Network.from_torch(_DataBranch(how).eval())


class _ShapeBranch(nn.Module):
    """Branches on the code's rank and device only (as PyTorch's DCGAN on `input.is_cuda`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.main = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 30))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:
            z = z.view(z.size(0), 4)
        if z.is_cuda and z.shape[0] > 1:
            return nn.parallel.data_parallel(self.main, z)
        return self.main(z)


def test_a_forward_that_branches_on_shapes_is_still_read() -> None:
    mod = _ShapeBranch().eval()
    net = Network.from_torch(mod)
    assert net.widths == [4, 20, 30]
    _assert_reads_forward(mod, net, 4)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # made here, on purpose
@pytest.mark.parametrize("how", ["script", "trace", "script, input_shape", "submodule"])
def test_a_torchscript_module_is_refused_up_front(how: str) -> None:
    # it gave torch's "register_forward_pre_hook is not supported on ScriptModules" or a
    # misleading "No linear layer found"
    g = _mlp().eval()
    kwargs: dict[str, Any] = {}
    if how == "trace":
        mod: nn.Module = torch.jit.trace(g, torch.randn(2, 4))
    elif how == "submodule":
        mod = nn.Sequential(torch.jit.script(g[0]), *g[1:])
    else:
        mod = torch.jit.script(g)
        kwargs = {"input_shape": (4,)} if "input_shape" in how else {}
    named = r"Sequential\.0 \(RecursiveScriptModule\)" if how == "submodule" else (
        "TopLevelTracedModule" if how == "trace" else "RecursiveScriptModule")
    with pytest.raises(TypeError, match=rf"{named} is a TorchScript module.*original "
                                        r"nn\.Module.*Network\.from_onnx"):
        Network.from_torch(mod, **kwargs)


class _FlatCodes(nn.Module):
    """A DCGAN generator that takes flat codes (B, nz) and views them as (B, nz, 1, 1)."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.nz, self.traceable = 6, traceable
        self.main = nn.Sequential(nn.ConvTranspose2d(6, 8, 4, 1, 0), nn.ReLU(),
                                  nn.ConvTranspose2d(8, 2, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.size(0) if self.traceable else int(z.size(0))  # (int(): no fx tracing)
        return self.main(z.view(batch, self.nz, 1, 1))


@pytest.mark.parametrize("traceable", [True, False], ids=["traced", "recorded"])
def test_a_generator_of_flat_codes_keeps_their_shape(traceable: bool) -> None:
    # it was read with codes of shape (nz, 1, 1), from its first ConvTranspose2d, where
    # its ONNX export (and the model itself) takes (nz,)
    mod = _FlatCodes(traceable).eval()
    net = Network.from_torch(mod)
    assert net.input_shape == (6,) and net.output_shape == (2, 8, 8)
    _assert_reads_forward(mod, net, 6)


def test_an_uninitialised_lazy_module_is_refused_and_left_lazy() -> None:
    # the loader's example codes of width 0 made the caller's LazyLinear a Linear(0, 32)
    # for good, and the error was about a weight of shape (32, 0)
    from torch.nn.modules.lazy import LazyModuleMixin

    g = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 70)).eval()
    with pytest.raises(TypeError, match=r"Sequential\.0 \(LazyLinear\) is a lazy module"):
        Network.from_torch(g)
    assert isinstance(g[0], LazyModuleMixin) and g[0].has_uninitialized_params()
    g(torch.zeros(2, 6))  # made by the caller's own first batch, it is read
    assert Network.from_torch(g).latent_dim == 6
