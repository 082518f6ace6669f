"""The global method: domains from the data, the relaxation, the branch and bound, verdicts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from preimage import GlobalSettings, Network, invert, random_network
from preimage.methods.layerwise import _invert_one
from preimage.solvers.exhaustive import global_projection, settle
from preimage.solvers.layer import active_set
from preimage.solvers.milp import milp_projection
from preimage.solvers.relaxation import Relaxation, balanced, data_bounds, exact_top


@pytest.fixture(scope="module")
def shallow() -> tuple[Network, np.ndarray, np.ndarray]:
    """A net where the layer-wise method fails for lack of expansion (10 -> 15 -> 30)."""
    net = random_network([10, 15, 30], seed=0)
    z = np.random.default_rng(0).standard_normal((100, 10))
    return net, z, net.forward(z)


def _left_open(net: Network, x: np.ndarray) -> np.ndarray:
    alone = invert(net, x, rtol=1e-9, fallback=GlobalSettings(enabled=False))
    return np.flatnonzero(~np.isin(np.asarray(alone.status), ["unique", "non_unique"]))


def test_the_data_bound_the_domain_and_the_relaxation_holds_the_true_point(shallow) -> None:
    net, z, x = shallow
    for b in _left_open(net, x)[:2]:
        cons = active_set(net.layers[1], x[b], 1e-9)
        assert not isinstance(cons, str)
        top = exact_top(net, 1, cons, 0.0)
        domain = data_bounds(net, 1, top, box=10.0)
        assert not isinstance(domain, str)
        pre = net.layers[0].preactivation(z[b][None])[0]
        assert np.all(domain.z_lower <= z[b] + 1e-9) and np.all(z[b] <= domain.z_upper + 1e-9)
        assert np.all(domain.lower[0] <= pre + 1e-9) and np.all(pre <= domain.upper[0] + 1e-9)
        relax = Relaxation(net, 1, domain, top)
        assert relax.tighten(deadline=np.inf) == "optimal"
        # tightening keeps the true pre-activations inside, and decides units
        assert np.all(relax.lower <= pre + 1e-7) and np.all(pre <= relax.upper + 1e-7)
        # the network's own point (d = its pattern) satisfies the relaxation
        relax.fix(np.where(relax.stable < 0, (pre > 0).astype(np.int8), -1).astype(np.int8))
        assert relax.solve().optimal


def test_every_sample_left_open_is_settled_and_checked(shallow) -> None:
    net, z, x = shallow
    todo = _left_open(net, x)
    assert todo.size >= 10  # the layer-wise method alone leaves these
    res = invert(net, x[todo], rtol=1e-9)
    assert set(res.status) <= {"unique", "non_unique"}, res.counts()
    unique = res.status == "unique"
    assert np.all(np.max(np.abs(res.z[unique] - z[todo][unique]), axis=1) < 1e-8)
    witness = res.status == "non_unique"
    fw = net.forward(res.witness[witness])
    assert np.all(np.max(np.abs(fw - x[todo][witness]), axis=1) < 1e-8)
    assert np.all(np.max(np.abs(res.witness[witness] - res.z[witness]), axis=1) > 1e-6)
    assert not res.out_of_time.any() and all(res.proof_domain)
    same = invert(net, x[todo], rtol=1e-9, method="global")
    assert same.method == "global" and list(same.status) == list(res.status)


def test_the_milp_engine_agrees_with_the_branch_and_bound(shallow) -> None:
    net, _, x = shallow
    for b in _left_open(net, x)[:3]:
        known = _invert_one(net, x[b], 1e-9).z
        known = known if np.all(np.isfinite(known)) else None
        ours = settle(net, 1, x[b], rtol=1e-9, z_known=known, seconds=20)
        milp = settle(net, 1, x[b], rtol=1e-9, z_known=known, seconds=20, engine="milp")
        assert ours.status == milp.status and ours.status in ("unique", "non_unique")


def test_a_point_off_the_range_but_on_the_output_layers_range_is_proved_infeasible() -> None:
    # 5 outputs of 8 hidden units: the output layer's preimage is a polyhedron, so the
    # layer-wise method cannot tell ("failed"); a random hidden vector is not relu(W_0 z).
    for seed in (3, 18):
        net = random_network([2, 8, 5], bias=False, seed=seed)
        h = np.abs(np.random.default_rng(seed).standard_normal(8))
        x = net.layers[1].forward(h[None])[0]
        assert invert(net, x, fallback=GlobalSettings(enabled=False)).status == "failed"
        res = invert(net, x, method="global")
        assert res.status == "infeasible", res.message
        assert res.proof_domain.startswith("every z (the domain derived from x")
        assert not np.any(np.isfinite(res.z))


def test_out_of_time_samples_say_so_and_the_others_keep_their_answers(shallow) -> None:
    net, _, x = shallow
    todo = _left_open(net, x)[:3]
    batch = np.concatenate([x[:5], x[todo]])
    before = invert(net, x[:5], rtol=1e-9, fallback=GlobalSettings(enabled=False))
    res = invert(net, batch, rtol=1e-9, fallback=GlobalSettings(seconds=0.0))
    assert list(res.status[:5]) == list(before.status)
    assert not res.out_of_time[:5].any() and res.out_of_time[5:].all()
    assert all("out of time" in m for m in res.message[5:])
    assert set(res.status[5:]) <= {"failed", "feasible"}
    # a preimage the layer-wise method found is kept
    kept = res.status[5:] == "feasible"
    assert np.all(res.residual[5:][kept] < 1e-8)


def test_float32_data_are_settled_at_their_precision() -> None:
    import torch

    net64 = random_network([10, 15, 30], seed=0)
    module = net64.to_torch(torch.float32)
    net = Network.from_torch(module)
    z = np.random.default_rng(0).standard_normal((100, 10))
    with torch.no_grad():
        x32 = module(torch.as_tensor(z, dtype=torch.float32))
    todo = _left_open(net, x32.double().numpy())[:6]
    res = invert(net, x32[todo], method="global")
    assert res.rtol == pytest.approx(1e-5)
    assert set(res.status) <= {"unique", "non_unique"}, res.counts()
    assert np.all(res.residual < 1e-4)
    unique = res.status == "unique"
    assert np.all(np.max(np.abs(res.z[unique] - z[todo][unique]), axis=1) < 1e-3)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_saturated_outputs_bound_their_pre_activations_on_one_side_only(precision) -> None:
    """tanh outputs at 1.0 (pre-activations 10 to 100): the global search must not hold
    them at the clipped target (it proved "infeasible" for x = G(z) that way)."""
    import torch

    rng = np.random.default_rng(5)
    w0, w1 = rng.standard_normal((12, 4)), 100 * rng.standard_normal((30, 12))
    net = Network.from_weights([w0, w1], activation=["relu", "tanh"])
    z = rng.standard_normal((6, 4))
    x = net.forward(z)
    if precision == "float32":
        module = net.to_torch(torch.float32).eval()
        net = Network.from_torch(module)
        with torch.no_grad():
            x = module(torch.as_tensor(z, dtype=torch.float32))
    x64 = np.asarray(x, dtype=np.float64)
    assert np.all(np.sum(np.abs(x64) == 1.0, axis=1) >= 3)  # saturated in this precision
    for b in range(len(z)):
        cons = active_set(net.layers[1], x64[b], 1e-5)
        assert not isinstance(cons, str) and cons.saturated is not None
        on = cons.saturated
        lo, hi = cons.pre_activation_bounds(net.layers[1].bias_or_zero())
        pre = net.layers[1].preactivation(np.maximum(net.layers[0].preactivation(z[b]), 0))
        assert np.all((lo[on] <= pre[on]) & (pre[on] <= hi[on]))
        assert np.all(np.isinf(np.where(pre[on] > 0, hi[on], lo[on])))
    res = invert(net, x, method="global", fallback=GlobalSettings(seconds=5.0))
    assert "infeasible" not in set(res.status), res.message
    assert np.all(res.residual[res.status != "failed"] < 1e-3)


def test_the_balanced_network_is_the_same_map_with_unit_rows() -> None:
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((9, 3)) * 1e5, rng.standard_normal((20, 9)) * 1e-4,
               rng.standard_normal((7, 20)) * 1e3]
    weights[0][4] *= 1e-12  # a near-zero row with a bias: a constant unit
    biases = [rng.standard_normal(9) * 1e5, None, rng.standard_normal(7)]
    net = Network.from_weights(weights, biases, activation=["relu", "relu", "sigmoid"])
    lp_net = balanced(net, 2)
    z = rng.standard_normal((5, 3))
    h, h_bal = z, z
    for i in range(2):
        h, h_bal = net.layers[i].forward(h), lp_net.layers[i].forward(h_bal)
        w, b = lp_net.layers[i].weight.matrix(), lp_net.layers[i].bias_or_zero()
        assert np.allclose(np.hypot(np.linalg.norm(w, axis=1), b), 1.0)
        assert np.max(np.abs(h_bal)) < 100  # of the size of z, whatever the weights'
    pre, pre_bal = net.layers[2].preactivation(h), lp_net.layers[2].preactivation(h_bal)
    assert np.allclose(pre_bal, pre, rtol=1e-10, atol=1e-10 * np.max(np.abs(pre)))
    assert np.allclose(lp_net.below(3).forward(z), net.forward(z), rtol=1e-10)


@pytest.mark.parametrize("size", [1e-6, 1e7])
def test_codes_far_from_unit_size_are_settled_not_refused(size) -> None:
    """x = G(z) with |z| ~ 1e7 (or 1e-6): HiGHS's absolute tolerances once made the
    data's bounds "infeasible" (a fuzzed case); the LPs now measure z in its own units,
    and a box too small for the code says so."""
    net = random_network([3, 10, 16], seed=1)
    z = size * np.random.default_rng(4).standard_normal((4, 3))
    for b in range(4):
        found = settle(net, 1, net.forward(z[b][None])[0], rtol=1e-9)
        assert found.status in ("unique", "non_unique", "failed"), found.message
        if found.status == "failed":  # only where the data leave z to the box |z_j| <= 10
            assert found.boxed and size > 10 and "no preimage among z with |z_j| <= 10" in \
                found.message
        elif found.status == "unique":
            assert np.max(np.abs(found.z - z[b])) <= 1e-6 * np.max(np.abs(z[b]))
        else:
            assert np.allclose(net.forward(found.witness[None])[0], net.forward(z[b][None])[0],
                               rtol=1e-7, atol=1e-8 * size)


def test_the_global_misfit_is_the_same_at_any_scale_of_x() -> None:
    """Bias-free: min ||G(z) - s x|| = s min ||G(z) - x|| (z scaled by s inside the box).
    At s = 1e-6 the bounds were wrong (HiGHS's absolute tolerances, a box 1e7 wide in the
    data's units); the projection now measures x and z in their own units."""
    net = random_network([3, 10, 16], seed=1, bias=False)
    x = np.abs(np.random.default_rng(0).standard_normal((3, 16)))
    ref = invert(net, x, method="global", noise="linf")
    small = invert(net, 1e-6 * x, method="global", noise="linf")
    assert not ref.out_of_time.any() and not small.out_of_time.any()
    assert np.allclose(small.misfit / 1e-6, ref.misfit, rtol=1e-6)
    assert np.allclose(small.misfit_bound / 1e-6, ref.misfit_bound, rtol=1e-6)


def test_the_global_misfit_matches_the_milp_and_closes_its_gap() -> None:
    net = random_network([3, 8, 10], seed=1)
    x = np.abs(np.random.default_rng(1).standard_normal((3, 10)))
    res = invert(net, x, method="global", noise="linf")
    assert res.method == "global" and not res.out_of_time.any()
    assert np.all(res.misfit - res.misfit_bound <= 1e-6 * res.misfit + 1e-8)
    for b in range(len(x)):
        # over every z where the data bound the domain, else over |z_j| <= 10 along the
        # coordinates they leave unbounded: a superset of the MILP's box either way
        everywhere = res.proof_domain[b].startswith("every z")
        box = 2 + float(np.max(np.abs(res.z[b]))) if everywhere else 10.0
        best = milp_projection(net, x[b], norm="linf", latent_bound=box, time_limit=30)
        assert best.status == "optimal"
        assert res.misfit[b] <= best.value * (1 + 1e-6) + 1e-9  # never worse ...
        assert res.misfit_bound[b] <= best.value * (1 + 1e-6) + 1e-9  # ... a true bound
    descent = invert(net, x, noise="linf")
    assert np.all(res.misfit <= descent.misfit * (1 + 1e-9))
    l1 = invert(net, x[:1], method="global", noise="l1")
    assert np.all(l1.misfit - l1.misfit_bound <= 1e-6 * l1.misfit + 1e-8)


def test_a_projection_out_of_time_keeps_its_incumbent() -> None:
    net = random_network([3, 8, 10], seed=1)
    x = np.abs(np.random.default_rng(1).standard_normal(10))
    start = np.zeros(3)
    found = global_projection(net, x, norm="linf", start=start, seconds=0.0)
    assert found.out_of_time and found.status == "time_limit"
    assert found.value == pytest.approx(float(np.max(np.abs(net.forward(start) - x))))
    assert 0.0 <= found.bound <= found.value


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise": "l2"}, ValueError, "'linf' or 'l1'"),
        ({"A": np.eye(10)[:5]}, ValueError, "does not take a measurement"),
        ({"fallback": GlobalSettings(search="cells")}, ValueError, "search='branch' or 'milp'"),
    ],
)
def test_the_global_method_refuses_what_it_cannot_do(kwargs, error, match) -> None:
    net = random_network([3, 8, 10], seed=1)
    x = net.forward(np.zeros(3))
    if "A" in kwargs:
        x = kwargs["A"] @ x
    with pytest.raises(error, match=match):
        invert(net, x, method="global", **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_local_probe_reaches_a_preimage_from_near_the_code_and_never_climbs(seed) -> None:
    from preimage.solvers.cell import local_preimage

    net = random_network([6, 14, 40], seed=seed)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(6)
    x = net.forward(z[None])[0]
    cons = active_set(net.layers[1], x, 1e-9)
    lo, hi = cons.pre_activation_bounds(np.zeros(40))

    def misfit(v: np.ndarray) -> float:
        pre = net.layers[1].preactivation(net.layers[0].forward(v[None]))[0]
        return float(np.linalg.norm(pre - np.clip(pre, lo, hi)))

    near = local_preimage(net, lo, hi, z + 0.01 * rng.standard_normal(6))
    assert misfit(near) < 1e-10
    assert np.max(np.abs(net.forward(near[None])[0] - x)) < 1e-9
    for _ in range(5):
        start = 3 * rng.standard_normal(6)
        assert misfit(local_preimage(net, lo, hi, start)) <= misfit(start)


def test_a_preimage_set_of_positive_dimension_gets_a_witness_from_the_probe() -> None:
    # 8 latent coordinates, 5 outputs: every preimage set is a continuum
    net = random_network([8, 20, 5], seed=3)
    z = np.random.default_rng(3).standard_normal((4, 8))
    x = net.forward(z)
    for b in range(4):
        if not np.any(x[b] > 0):
            continue
        found = settle(net, 1, x[b], rtol=1e-9, seconds=5.0)
        assert found.status == "non_unique", found.message
        for v in (found.z, found.witness):
            assert np.max(np.abs(net.forward(v[None])[0] - x[b])) <= 1e-8 * np.max(x[b])
        assert np.max(np.abs(found.witness - found.z)) > 1e-6


@pytest.mark.parametrize("name", ["enabled", "tighten", "probe"])
def test_switches_of_the_global_settings_must_be_booleans(name) -> None:
    with pytest.raises(TypeError, match=f"`{name}` must be True or False"):
        GlobalSettings(**{name: "yes"})
    assert getattr(GlobalSettings(**{name: False}), name) is False


def test_the_race_takes_the_first_settled_answer_and_stops_the_other() -> None:
    from preimage.solvers.branch import BranchOutcome
    from preimage.solvers.exhaustive import EXACT_CONCLUSIVE, _race_searches

    seen_stop = []

    def search(tightened, stop):
        if not tightened:
            return BranchOutcome("unique", np.ones(2), nodes=3)
        deadline = time.perf_counter() + 30
        while not stop() and time.perf_counter() < deadline:
            time.sleep(0.001)
        seen_stop.append(stop())
        return BranchOutcome("found", np.ones(2), nodes=5)

    found, tightened = _race_searches(search, True, EXACT_CONCLUSIVE)
    assert found.status == "unique" and not tightened
    assert seen_stop == [True] and found.nodes == 8
    # without a settled answer: the one with a preimage, both searches' nodes
    found, tightened = _race_searches(
        lambda t, stop: BranchOutcome("found" if t else "none", np.zeros(2) if t else None,
                                      nodes=2), True, EXACT_CONCLUSIVE)
    assert found.status == "found" and tightened and found.nodes == 4
    # one search alone without tightening; an error in a thread reaches the caller
    found, tightened = _race_searches(lambda t, stop: BranchOutcome("none", None), False,
                                      EXACT_CONCLUSIVE)
    assert found.status == "none" and not tightened

    def broken(tightened, stop):
        if tightened:
            raise RuntimeError("boom")
        while not stop():
            time.sleep(0.001)
        return BranchOutcome("none", None)

    with pytest.raises(RuntimeError, match="boom"):
        _race_searches(broken, True, EXACT_CONCLUSIVE)


def test_tightening_stops_when_asked_and_its_bounds_hold(shallow, monkeypatch) -> None:
    net, z, x = shallow
    b = int(_left_open(net, x)[0])
    cons = active_set(net.layers[1], x[b], 1e-9)
    top = exact_top(net, 1, cons, 0.0)
    domain = data_bounds(net, 1, top, box=10.0)
    relax = Relaxation(net, 1, domain, top)
    before = relax.upper.copy()
    assert relax.tighten(deadline=np.inf, stop=lambda: True) == "time_limit"
    assert relax.n_lps == 0 and np.array_equal(relax.upper, before)
    calls = []
    assert relax.tighten(deadline=np.inf, stop=lambda: len(calls) > 5 or calls.append(1)) \
        == "time_limit"
    pre = net.layers[0].preactivation(z[b][None])[0]
    assert np.all(relax.lower <= pre + 1e-7) and np.all(pre <= relax.upper + 1e-7)
    # the LP is back on the dual simplex, without a pivot limit, for the branch and bound
    assert relax.lp._highs.getOptionValue("simplex_strategy")[1] == 1
    assert relax.lp._highs.getOptionValue("simplex_iteration_limit")[1] == 2**31 - 1
    # a pivot limit too small for any bound's LP: every LP skipped, nothing tightened
    import preimage.solvers.relaxation as relaxation

    fresh = Relaxation(net, 1, domain, top)
    before = fresh.upper.copy()
    monkeypatch.setattr(relaxation, "TIGHTEN_PIVOTS", 0)
    assert fresh.tighten(deadline=np.inf) == "optimal"
    assert np.array_equal(fresh.upper, before) and fresh.n_lps > 0


def test_a_relaxation_adopts_only_tighter_bounds_and_keeps_the_true_point(shallow) -> None:
    from preimage.solvers.exhaustive import _SharedBounds

    net, z, x = shallow
    b = int(_left_open(net, x)[0])
    cons = active_set(net.layers[1], x[b], 1e-9)
    top = exact_top(net, 1, cons, 0.0)
    domain = data_bounds(net, 1, top, box=10.0)
    tightened, plain = Relaxation(net, 1, domain, top), Relaxation(net, 1, domain, top)
    assert tightened.tighten(deadline=np.inf) == "optimal"
    shared = _SharedBounds()
    shared.refresh(plain)  # nothing published yet: nothing changes
    assert plain.n_lps == 0 and np.array_equal(plain.upper, domain.upper[0])
    shared.publish(tightened.lower, tightened.upper)
    shared.refresh(plain)
    assert np.array_equal(plain.lower, tightened.lower)
    assert np.array_equal(plain.upper, tightened.upper)
    assert np.all(plain.upper <= domain.upper[0]) and np.any(plain.upper < domain.upper[0])
    assert np.array_equal(plain.stable >= 0, tightened.stable >= 0)
    # looser bounds change nothing; the network's own point satisfies the adopted relaxation
    assert plain.adopt(plain.lower - 1.0, plain.upper + 1.0) == 0
    pre = net.layers[0].preactivation(z[b][None])[0]
    assert np.all(plain.lower <= pre + 1e-7) and np.all(pre <= plain.upper + 1e-7)
    plain.fix(np.where(plain.stable < 0, (pre > 0).astype(np.int8), -1).astype(np.int8))
    assert plain.solve().optimal


def test_two_workers_share_one_tree_and_it_drains_only_when_both_are_done() -> None:
    from preimage.solvers.branch import NodePool

    pool = NodePool(3, workers=2)
    never = lambda: False  # noqa: E731
    root = pool.take(0, never)
    assert root is not None and np.all(root == -1) and pool.open == 0
    first, second = root.copy(), root.copy()
    first[0], second[0] = 0, 1
    pool.give(0, [first, second])
    # the idle worker takes the oldest node of the other's stack, the owner its newest
    assert np.array_equal(pool.take(1, never), first)
    assert np.array_equal(pool.take(0, never), second)
    # both busy, nothing open: a worker waits (here: gives up) instead of declaring the end
    assert pool.take(1, lambda: True) is None and not pool.drained
    # the other finishing its node (its next take) ends the tree
    assert pool.take(0, never) is None and pool.drained
    # the first preimage offered is the pool's; a later one is not
    z = np.ones(2)
    assert pool.offer(z)[1] and not pool.offer(2 * z)[1] and pool.z_star is z
    # a worker that leaves with its node unfinished (a witness, out of time) leaves the
    # tree open for good: no other worker may then conclude from it
    pool = NodePool(3, workers=2)
    assert pool.take(0, never) is not None
    pool.leave(0)
    assert pool.take(1, never) is None and not pool.drained


def test_a_decision_against_a_units_tightened_state_is_a_contradiction(shallow) -> None:
    net, _, x = shallow
    b = int(_left_open(net, x)[0])
    cons = active_set(net.layers[1], x[b], 1e-9)
    top = exact_top(net, 1, cons, 0.0)
    relax = Relaxation(net, 1, domain := data_bounds(net, 1, top, box=10.0), top)
    g = int(relax.unstable[0])
    decisions = np.full(relax.n_units, -1, dtype=np.int8)
    decisions[g] = 1
    assert not relax.contradicts(decisions)
    # bounds tightened since: unit g can only be off
    lower, upper = relax.lower.copy(), relax.upper.copy()
    upper[g] = -1e-3
    lower[g] = min(lower[g], -1.0)
    relax.adopt(lower, upper)
    assert relax.stable[g] == 0 and relax.contradicts(decisions)
    decisions[g] = 0
    assert not relax.contradicts(decisions) and domain.upper[0][g] > 0


def test_a_float32_preimage_blurred_by_the_tolerance_is_no_second_preimage() -> None:
    # float32 (rtol 1e-5), tanh outputs of steep weights: points 3e-5 to 1e-4 from the code
    # still reproduce x within 10 rtol. They were reported as witnesses ("non_unique");
    # distinct preimages must lie farther apart than the tolerance blurs one
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(5, 40), torch.nn.ReLU(), torch.nn.Linear(40, 120),
                              torch.nn.Tanh()).eval()
    with torch.no_grad():
        mod[2].weight.mul_(15)
        z = torch.randn(4, 5)
        x = mod(z).numpy()
    net = Network.from_torch(mod)
    res = invert(net, x)
    for b in range(4):
        assert res.status[b] in ("unique", "feasible"), res.message[b]
        assert np.max(np.abs(net.forward(res.z[b][None])[0] - x[b])) <= 1e-4


@pytest.mark.parametrize("dead_bias", [1e3, 1e5, 1e7])
def test_a_dead_unit_with_a_huge_bias_does_not_shrink_the_latent_unit(dead_bias) -> None:
    # G(z) = relu(relu(z) - relu(z - T)) = z on [0, T]: x = 5 has the one preimage z = 5.
    # The unit off below T, rescaled by its bias (`balanced`), once made the codes look
    # 1e-5 their size: a box of 0.08, then "infeasible" over every z, or a false "unique"
    net = Network.from_weights([np.array([[1.0], [1.0]]), np.array([[1.0, -1.0]])],
                               [np.array([0.0, -dead_bias]), np.array([0.0])])
    res = invert(net, np.array([5.0]), method="global")
    assert res.status == "unique" and abs(float(res.z[0]) - 5.0) < 1e-9
    # a random net with one such unit: a second preimage 1.6e5 away, and z0 itself
    base = random_network([2, 4, 6], bias=True, seed=20)
    biases = [layer.bias.copy() for layer in base.layers]
    biases[0][0] = -dead_bias
    net = Network.from_weights([layer.weight.matrix() for layer in base.layers], biases)
    z0 = np.random.default_rng(20).standard_normal((4, 2))[2]
    res = invert(net, net.forward(z0), method="global")
    assert res.status in ("unique", "non_unique", "feasible"), res.message
    # (where the search ran: at 1e7 the layer-wise method's far z stays "feasible")
    assert res.proof_domain in ("", "every z") or "|z_j| <= 10 " in res.proof_domain \
        or res.proof_domain.startswith("every z")
    if res.status == "unique":  # then it must be z0, the one inside the box
        assert np.max(np.abs(res.z - z0)) < 1e-6


@pytest.mark.parametrize("noise", [None, "linf"])
def test_the_global_route_takes_the_calls_time_limit(noise) -> None:
    net = random_network([5, 20, 50], seed=0)
    rng = np.random.default_rng(0)
    x = net.forward(rng.standard_normal((3, 5))) if noise is None else np.abs(
        rng.standard_normal((3, 50)))
    res = invert(net, x, method="global", noise=noise, time_limit=0.0)
    assert all("out of time" in m for m in res.message), res.message
    if noise is not None:  # nothing proved: the bound is the trivial one
        assert np.all(res.misfit_bound == 0.0) and np.all(res.out_of_time)
    done = invert(net, x, method="global", noise=noise, time_limit=60.0)
    assert not any("out of time" in m for m in done.message)


def test_the_projections_box_holds_its_start_and_its_message_names_the_domain() -> None:
    # the cell descent's start lay at |z| = 58, outside the box |z_j| <= 10: the search
    # found nothing better inside and called the start "the proved minimum", while a z of
    # misfit 0.487 (against 0.840) lay at (21.4, -24.3)
    rng = np.random.default_rng(28)
    weights, biases = [], []
    for a, b in ((2, 4), (4, 6)):
        weights.append(rng.standard_normal((b, a)) / np.sqrt(b))
        biases.append(rng.standard_normal(b) / np.sqrt(b))
    net = Network.from_weights(weights, biases)
    x = np.random.default_rng(1028).standard_normal(6) * 0.5 + 0.3
    better = np.array([21.36068825, -24.33116236])
    res = invert(net, x, method="global", noise="linf")
    assert res.misfit <= np.abs(net.forward(better[None])[0] - x).max() * (1 + 1e-9)
    assert res.misfit_bound <= res.misfit * (1 + 1e-9)
    assert "over z with |z_j| <=" in res.message


def test_a_unit_bounded_just_above_zero_keeps_its_triangle_valid() -> None:
    # After tightening, a unit of this generator had U = 1e-8 against L = -0.25: its
    # triangle row's entries s w (s = U / (U - L)) fell below HiGHS's 1e-9 and were
    # dropped, the row then cut off the true point, and 2 of these 8 x = G(z) were
    # "proved" infeasible (`relaxation._row_factor`)
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Unflatten(1, (4, 4, 4)),
                      nn.ConvTranspose2d(4, 1, 4, stride=(2, 3), padding=(2, 3), dilation=2,
                                         output_padding=(0, 2), bias=False),
                      nn.Sigmoid()).double().eval()
    net = Network.from_torch(g)
    z = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        x = g(z).numpy()
    res = invert(net, x)
    assert set(res.status) <= {"unique", "non_unique", "feasible"}, res.message
    assert np.allclose(net.forward(res.z), x.reshape(8, -1), rtol=0, atol=1e-8)
