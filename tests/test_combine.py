"""`combine_results`: a batch inverted chunk by chunk is the batch inverted at once.

The batched exact method works chunk by chunk (``batch_size``); its polish and
final residuals keep to those chunks, and its pieces do not depend on the
thread count, so the chunks' results combined are the whole call's bit for bit
(every field but the timings). `preimage.jobs` relies on this.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from preimage import InversionResult, invert, random_network
from preimage import results as results_module
from preimage.model.mnist import shipped_decoder
from preimage.results import combine_results

#: The fields that measure time: the only ones a chunked run may change.
TIMINGS = ("time",)


def assert_identical(a: InversionResult, b: InversionResult) -> None:
    """Every field of a and b equal bit for bit (NaN equal to NaN), timings aside."""
    for f in dataclasses.fields(InversionResult):
        if f.name in TIMINGS:
            continue
        if f.name == "layers":
            assert len(a.layers) == len(b.layers)
            for la, lb in zip(a.layers, b.layers, strict=True):
                for g in dataclasses.fields(la):
                    if g.name not in TIMINGS:
                        _same(f"layers[{la.index}].{g.name}", getattr(la, g.name),
                              getattr(lb, g.name))
            continue
        _same(f.name, getattr(a, f.name), getattr(b, f.name))


def _same(name: str, u: object, v: object) -> None:
    if u is None or v is None:
        assert u is None and v is None, name
        return
    x, y = np.asarray(u), np.asarray(v)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    nan = x.dtype.kind == "f"
    assert np.array_equal(x, y, equal_nan=nan), f"{name} differs"


def _chunked(net, x, step, **kwargs) -> InversionResult:
    return combine_results([invert(net, x[lo : lo + step], batch_size=step, **kwargs)
                            for lo in range(0, x.shape[0], step)])


@pytest.mark.parametrize("name", ["20-100-500", "mnist-relu"])
def test_chunks_combined_are_the_whole_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # residuals measured in pieces of 10 samples: pieces and chunks would straddle
    monkeypatch.setattr(results_module, "RESIDUAL_ROWS", 10)
    if name == "mnist-relu":  # unique, non-unique samples and LPs
        net = shipped_decoder("relu")
    else:
        net = random_network([20, 100, 500], seed=0)
    x = net.forward(np.random.default_rng(1).standard_normal((90, net.latent_dim)))
    whole = invert(net, x, batch_size=32, n_jobs=2)
    if name == "mnist-relu":
        assert {"unique", "non_unique"} <= set(whole.status) and whole.layers[0].used_lp.any()
    # other thread counts, the same chunks: the same bits
    assert_identical(_chunked(net, x, 32, n_jobs=1), whole)
    assert_identical(_chunked(net, x, 32, n_jobs=2), whole)


def test_float32_polish_keeps_to_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 data: answers are polished in their cells, chunk by chunk."""
    monkeypatch.setattr(results_module, "RESIDUAL_ROWS", 7)
    net = random_network([10, 60, 200], seed=5)
    x = net.forward(np.random.default_rng(2).standard_normal((50, 10))).astype(np.float32)
    whole = invert(net, x, batch_size=16)
    assert whole.rtol == pytest.approx(1e-5)
    assert_identical(_chunked(net, x, 16), whole)


def test_combine_results_concatenates_and_refuses_mixtures() -> None:
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(0).standard_normal((9, 6)))
    a, b = invert(net, x[:4]), invert(net, x[4:])
    both = combine_results([a, b])
    assert both.z.shape == (9, 6) and both.counts() == {"unique": 9}
    assert both.time == pytest.approx(a.time + b.time)
    assert [r.status.shape for r in both.layers] == [(9,), (9,)]
    with pytest.raises(ValueError, match="at least one"):
        combine_results([])
    with pytest.raises(ValueError, match="scalar"):
        combine_results([invert(net, x[0]), invert(net, x[1])])
    with pytest.raises(ValueError, match="`method`"):
        combine_results([a, invert(net, x[4:], method="adam", options={"steps": 2})])
    with pytest.raises(ValueError, match="`rtol`"):
        combine_results([a, invert(net, x[4:], rtol=1e-6)])
