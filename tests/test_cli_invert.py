"""`preimage invert`: models from files, observations from .npy, clear errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from preimage import Network, random_network
from preimage.apps.cli import main


def _save_state(net: Network, path: Path, names: list[str], extra: bool = False) -> None:
    """net's weights as a torch state dict (optionally with an unrelated encoder layer)."""
    state = {}
    if extra:  # an encoder layer that does not chain into the decoder
        state["enc.weight"] = torch.zeros(7, 3, dtype=torch.float64)
    for name, layer in zip(names, net.layers, strict=True):
        state[f"{name}.weight"] = torch.tensor(np.array(layer.weight.matrix()))
    torch.save(state, path)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def test_invert_a_state_dict_and_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = random_network([6, 30, 80], seed=3)
    _save_state(net, tmp_path / "g.pt", ["fc1", "fc2"])
    z = np.random.default_rng(1).standard_normal((4, 6))
    x = net.forward(z)
    np.save(tmp_path / "x.npy", x)
    before = x.copy()
    out = tmp_path / "res" / "r.npz"
    assert main(["invert", str(tmp_path / "g.pt"), str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "unique" in text and "answers (z with its checks passed): 4/4" in text
    saved = np.load(out)
    assert saved["z"].shape == (4, 6)
    assert np.all(_rel(saved["z"], z) < 1e-8)
    assert list(saved["status"]) == ["unique"] * 4
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), before)


def test_invert_shipped_decoder_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.npz"
    assert main(["invert", "mnist-relu", "--codes", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    saved = np.load(out)
    recovered = int(np.sum(_rel(saved["z"], saved["z_true"]) < 1e-6))
    assert f"recovered the true code (relative error < 1e-6): {recovered}/10" in text
    unique = saved["status"] == "unique"
    assert unique.sum() >= 5  # most codes of the shipped decoder are identifiable
    assert np.all(_rel(saved["z"][unique], saved["z_true"][unique]) < 1e-8)


def test_invert_with_noise_and_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = random_network([5, 40, 120], seed=4)
    _save_state(net, tmp_path / "g.pt", ["a", "b"])
    mask = np.random.default_rng(0).random(120) < 0.8
    np.save(tmp_path / "mask.npy", mask)
    args = ["invert", str(tmp_path / "g.pt"), "--codes", "3", "--mask", str(tmp_path / "mask.npy")]
    assert main(args) == 0
    assert "answers (z with its checks passed): 3/3" in capsys.readouterr().out
    args = ["invert", str(tmp_path / "g.pt"), "--codes", "3", "--noise", "linf",
            "--noise-level", "1e-6"]
    assert main(args) == 0
    assert "noise linf <= 1e-06" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda d: ["invert", str(d / "g.pt"), str(d / "wide.npy")], "80"),
        (lambda d: ["invert", str(d / "g.pt"), str(d / "nan.npy")], "NaN"),
        (lambda d: ["invert", str(d / "enc.pt"), "--codes", "2"], "--layers"),
        (lambda d: ["invert", str(d / "enc.pt"), "--codes", "2", "--layers", "fc9"], "fc9"),
        (lambda d: ["invert", str(d / "g.pt"), "--codes", "2", "--layers", " , "], "at least one"),
        (lambda d: ["invert", str(d / "g.pt"), str(d / "x.npy"), "--codes", "2"], "either"),
        (lambda d: ["invert", str(d / "g.pt"), "--codes", "2", "--noise-level", "0.1"],
         "--noise"),
        (lambda d: ["invert", str(d / "missing.pt"), "--codes", "2"], "No model file"),
        (lambda d: ["invert", str(d / "x.npy"), "--codes", "2"], "state dict"),
        (lambda d: ["invert", str(d / "bad.safetensors"), "--codes", "2"], "safetensors"),
    ],
)
def test_invert_errors_name_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_args, needle: str
) -> None:
    net = random_network([6, 30, 80], seed=3)
    _save_state(net, tmp_path / "g.pt", ["fc1", "fc2"])
    _save_state(net, tmp_path / "enc.pt", ["fc1", "fc2"], extra=True)
    np.save(tmp_path / "x.npy", net.forward(np.ones((2, 6))))
    np.save(tmp_path / "wide.npy", np.ones((2, 81)))
    bad = net.forward(np.ones((2, 6)))
    bad[0, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert main(make_args(tmp_path)) == 2
    # the last line on stderr (a progress bar, if any, was erased with "\r")
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("preimage invert: ") and needle in last


def test_from_file_reads_the_shipped_safetensors() -> None:
    from importlib.resources import files

    from preimage.model.mnist import DECODER_LAYERS, WEIGHT_FILES, shipped_decoder

    path = files("preimage") / "models" / WEIGHT_FILES["leaky_relu"]
    net = Network.from_file(
        str(path), DECODER_LAYERS["leaky_relu"], activation="leaky_relu", negative_slope=0.1
    )
    ref = shipped_decoder("leaky_relu")
    z = np.random.default_rng(0).standard_normal((3, 20))
    assert net.widths == [20, 200, 500, 784]
    np.testing.assert_allclose(net.forward(z), ref.forward(z), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="do not form one chain"):
        Network.from_file(str(path))  # encoder and decoder layers together


def test_invert_into_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out DIR: chunks written as they finish, a rerun resumes, another model is refused."""
    from preimage.jobs import load_results

    net = random_network([6, 30, 80], seed=3)
    _save_state(net, tmp_path / "g.pt", ["fc1", "fc2"])
    _save_state(random_network([6, 30, 80], seed=5), tmp_path / "h.pt", ["fc1", "fc2"])
    z = np.random.default_rng(1).standard_normal((10, 6))
    np.save(tmp_path / "x.npy", net.forward(z))
    out = tmp_path / "res"
    args = ["invert", str(tmp_path / "g.pt"), str(tmp_path / "x.npy"), "--out", str(out),
            "--chunk-size", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "3 chunks of 4 samples, on this process" in text
    assert "answers (z with its checks passed): 10/10" in text
    assert np.all(_rel(load_results(out).z, z) < 1e-8)
    assert main(args) == 0
    assert "resumed: 3 of 3 chunks were already done (10 samples), skipped" in \
        capsys.readouterr().out
    args[1] = str(tmp_path / "h.pt")
    assert main(args) == 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("preimage invert: ") and "another model" in last
    assert main(["invert", str(tmp_path / "g.pt"), "--codes", "5", "--out",
                 str(tmp_path / "codes")]) == 0
    assert "recovered the true code (relative error < 1e-6): 5/5" in capsys.readouterr().out
    assert (tmp_path / "codes" / "z_true.npy").exists()
    if Path("/sys").is_dir():
        assert main(["invert", str(tmp_path / "g.pt"), str(tmp_path / "x.npy"), "--out",
                     "/sys/preimage-results"]) == 2
        assert "cannot write the results folder" in capsys.readouterr().err


def test_an_unwritable_out_file_is_refused_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.npz").mkdir()
    for out, says in ((tmp_path / "afile" / "z.npz", "is not a writable folder"),
                      (tmp_path / "adir.npz", "is a folder")):
        assert main(["invert", "mnist-relu", "--codes", "2", "--out", str(out)]) == 2
        text = capsys.readouterr()
        assert says in text.err and "inverting" not in text.out
    # without a noise level the summary names the noise alone (it read "<= None")
    assert main(["invert", "mnist-relu", "--codes", "2", "--noise", "l2"]) == 0
    assert "None" not in capsys.readouterr().out


def test_a_file_that_is_not_npy_and_ctrl_c_get_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.npy").write_text("not a numpy file")  # NumPy's message spoke of a pickle
    assert main(["invert", "mnist-relu", str(tmp_path / "x.npy")]) == 2
    assert "not a .npy file" in capsys.readouterr().err

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    import preimage.apps.cli as cli

    monkeypatch.setattr(cli, "invert", interrupted)
    assert main(["invert", "mnist-relu", "--codes", "2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
