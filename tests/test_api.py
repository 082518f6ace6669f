"""`invert`'s routing: every argument used or refused, the method named, one type per input kind."""

from __future__ import annotations

import numpy as np
import pytest

import preimage
from preimage import GlobalSettings, invert, random_network
from preimage.methods import search
from preimage.results import SearchOutcome


@pytest.fixture(scope="module")
def small() -> tuple[preimage.Network, np.ndarray]:
    net = random_network([6, 30, 90], seed=3)
    return net, net.forward(np.random.default_rng(3).standard_normal((3, 6)))


@pytest.fixture(scope="module")
def failing() -> tuple[preimage.Network, np.ndarray]:
    """Samples the layer-wise method alone leaves "failed" and the cell search settles."""
    net = random_network([20, 60, 90], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((12, 20)))
    alone = invert(net, x, fallback=GlobalSettings(enabled=False))
    failed = np.asarray(alone.status) == "failed"
    assert failed.sum() >= 2
    return net, x[failed]


def test_the_search_keeps_to_its_time_budget(failing: tuple) -> None:
    net, x = failing
    found = invert(net, x)  # the global search settles them
    assert set(found.status) == {"unique"} and found.success.all()
    assert np.all(found.residual < 1e-8) and not found.out_of_time.any()
    assert all(d for d in found.proof_domain)  # each says which z its proof covers
    out_of_time = invert(net, x, fallback=GlobalSettings(seconds=0.0))
    assert set(out_of_time.status) == {"failed"} and out_of_time.out_of_time.all()
    assert all("out of time" in m for m in out_of_time.message)
    reference = invert(net, x, batched=False, fallback=GlobalSettings(seconds=0.0))
    assert list(reference.status) == list(out_of_time.status)
    cells = invert(net, x, fallback=GlobalSettings(search="cells", cell_seconds=0.0))
    assert set(cells.status) == {"failed"}
    assert all("ran out of its 0 s after 0 of" in m for m in cells.message)


def test_a_sample_whose_search_breaks_costs_no_other(
    failing: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, x = failing
    real = search.settle
    calls: list[int] = []

    def first_breaks(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("forced")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "settle", first_breaks)
    res = invert(net, x, batched=False)
    assert res.status[0] == "failed" and "RuntimeError: forced" in res.message[0]
    assert set(res.status[1:]) == {"unique"} and np.all(res.residual[1:] < 1e-8)


def test_global_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="`search` must be one of"):
        GlobalSettings(search="fast")
    with pytest.raises(ValueError, match="`seconds` must be a number of seconds >= 0"):
        GlobalSettings(seconds=-1)
    with pytest.raises(ValueError, match="`latent_bound` must be > 0"):
        GlobalSettings(latent_bound=0)


@pytest.mark.parametrize(
    ("kwargs", "unused"),
    [
        ({"method": "adam", "fallback": GlobalSettings()}, "`fallback`"),
        ({"method": "adam", "rtol": 1e-6}, "`rtol`"),
        ({"method": "negation", "batched": False}, "`batched`"),
        ({"method": "clipping", "n_jobs": 2}, "`n_jobs`"),
        ({"noise": "linf", "batched": False}, "`batched`"),
        ({"noise": "l2", "fallback": GlobalSettings()}, "`fallback`"),
        ({"noise": "linf", "rtol": 1e-6}, "`rtol`"),
        ({"method": "layerwise", "noise": "linf", "batch_size": 10, "n_jobs": 1},
         "`batch_size`, `n_jobs` are"),
        ({"method": "hybrid", "batch_size": 10}, "`batch_size`"),
        ({"A": np.eye(90)[:40], "device": "cpu"}, "`device`"),
    ],
)
def test_arguments_a_method_does_not_use_are_refused(
    small: tuple, kwargs: dict, unused: str
) -> None:
    net, x = small
    if "A" in kwargs:
        x = x @ kwargs["A"].T
    with pytest.raises(TypeError, match=f"{unused}.* not used by method"):
        invert(net, x, **kwargs)


def test_arguments_are_passed_where_they_are_used(
    small: tuple, failing: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, x = failing
    seen: list[GlobalSettings] = []
    real = search.invert_below

    def spy(*args: object, **kwargs: object) -> SearchOutcome:
        seen.append(kwargs["settings"])  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    settings = GlobalSettings(starts=1, seconds=30.0)  # ample: both runs settle every sample
    monkeypatch.setattr("preimage.methods.layerwise.invert_below", spy)
    everything = np.ones(net.output_dim, dtype=bool)
    partial = invert(net, x, observe=everything, fallback=settings, batched=False, n_jobs=1)
    assert seen and all(s is settings for s in seen)  # the search got these settings
    assert list(partial.status) == list(invert(net, x).status)
    net, x = small
    sensed = invert(net, x @ np.eye(90)[:60].T, A=np.eye(90)[:60], rtol=1e-7)
    assert sensed.method == "pgd"


@pytest.mark.parametrize(
    ("kwargs", "method"),
    [
        ({}, "exact"),
        ({"noise": "linf"}, "descent"),
        ({"noise": "l2", "noise_level": 1e-3}, "descent"),
        ({"method": "layerwise", "noise": "linf"}, "noisy"),
        ({"A": "gauss"}, "pgd"),
        ({"method": "adam", "options": {"steps": 20, "restarts": 1}}, "adam"),
        ({"method": "clipping", "options": {"steps": 20, "restarts": 1, "bound": 3.0}},
         "clipping"),
        ({"method": "negation", "options": {"steps": 20, "restarts": 1}}, "negation"),
        ({"method": "hybrid", "options": {"steps": 20}}, "hybrid"),
        ({"observe": "half"}, "exact"),
        ({"observe": "half", "noise": "linf"}, "descent"),
    ],
)
def test_one_type_per_input_kind_and_the_method_that_ran(
    small: tuple, kwargs: dict, method: str
) -> None:
    net, x = small
    kwargs = dict(kwargs)
    if kwargs.get("A") == "gauss":
        kwargs["A"] = preimage.GaussianMatrix(60, 90, seed=0)
        x = kwargs["A"].apply(x)
    if kwargs.get("observe") == "half":
        kwargs["observe"] = np.arange(90) % 2 == 0
    calls: list[tuple[int, int]] = []
    batch = invert(net, x, progress=lambda d, t: calls.append((d, t)), **kwargs)
    assert batch.method == method
    b = x.shape[0]
    for name in ("status", "success", "residual", "message", "misfit", "z_error_bound", "steps"):
        value = getattr(batch, name)
        assert isinstance(value, np.ndarray) and value.shape == (b,), name
    assert batch.z.shape == batch.witness.shape == (b, net.latent_dim)
    assert calls and calls[-1] == (b, b)  # progress counts samples
    one = invert(net, x[0], **kwargs)
    assert one.method == method
    assert isinstance(one.status, str) and isinstance(one.message, str)
    assert isinstance(one.success, bool) and isinstance(one.steps, int)
    for name in ("residual", "misfit", "z_error_bound"):
        assert isinstance(getattr(one, name), float), name
    assert one.z.shape == one.witness.shape == (net.latent_dim,)


def test_unknown_options_and_bad_shared_arguments(small: tuple) -> None:
    net, x = small
    with pytest.raises(TypeError, match=r"\['steps'\] are not settings .* no options"):
        invert(net, x, options={"steps": 3})
    with pytest.raises(TypeError, match="`fallback` must be a GlobalSettings"):
        invert(net, x, fallback={"seconds": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`rtol` must be a finite number > 0"):
        invert(net, x, rtol=-1.0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        invert(net, x, method="magic")


def test_a_device_this_torch_cannot_use_is_named_not_raised_from_inside_torch() -> None:
    import torch

    net = random_network([3, 12, 30], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal(3))
    for device, rule in (("bogus", "torch device such as"), ("meta", "of type cpu or cuda")):
        with pytest.raises(ValueError, match=f"`device`.*{rule}"):
            invert(net, x, method="adam", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            invert(net, x, method="adam", device="cuda")
    with pytest.raises(TypeError, match="meta device"):
        invert(net, torch.empty(30, device="meta"))
    assert invert(net, x, device="cpu").status == "unique"


def test_an_observation_near_float64s_subnormals_is_refused_not_called_unique() -> None:
    # x of 1e-308 was "unique" with z = 0 (G(0) = 0, a 100% misfit the relative check
    # missed); an all-zero x is still an observation
    net = random_network([3, 6, 10], seed=1)
    x = net.forward(np.random.default_rng(0).standard_normal(3))
    with pytest.raises(ValueError, match=r"`x` has sample\(s\) \[1\] of largest magnitude"):
        invert(net, np.stack([x, x * 1e-308]))
    assert invert(net, np.zeros(10)).status in ("unique", "non_unique")
    assert invert(net, x * 1e-90).status == invert(net, x).status


def test_a_progress_that_is_not_callable_is_refused_before_any_work() -> None:
    # it failed with "'int' object is not callable" after the first chunk was computed
    net = random_network([4, 20, 60], seed=0)
    x = net.forward(np.ones((2, 4)))
    for method in ("exact", "adam"):
        with pytest.raises(TypeError, match="`progress`"):
            invert(net, x, method=method, progress=3)
