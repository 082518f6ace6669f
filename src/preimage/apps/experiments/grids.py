"""The grids of the paper's experiments: their settings, draws and the methods they compare."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from preimage.api import invert
from preimage.apps.experiments.spec import (
    Batch,
    Config,
    Outcome,
    Setting,
    Solver,
    StepCallback,
    codes,
    key_int,
    keyed_rng,
    outcome_of,
)
from preimage.methods.gradient import gradient_invert
from preimage.methods.partial import restrict_output
from preimage.methods.search import GlobalSettings
from preimage.model.mnist import authors_decoders, load_mnist_digits, load_vae, shipped_decoder
from preimage.model.network import Network, random_network
from preimage.model.operators import Mask
from preimage.results import InversionResult


def _invert_solver(net: Network, **kwargs: Any) -> Solver:
    """`preimage.invert` on the batch (keyword arguments passed on: method, noise, ...)."""

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        return outcome_of(invert(net, batch.x, progress=step, **kwargs), len(batch.runs))

    return solve


def _adam_solver(net: Network, config: Config, seed: int, *, noise: str | None = None) -> Solver:
    """`preimage.methods.gradient.gradient_invert` on the batch (one call: all runs together).

    With ``noise="l2"`` (noisy x) the status is "feasible" whatever the misfit:
    no noise level is given.
    """

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        result = gradient_invert(
            net,
            batch.x,
            lr=config.adam.lr,
            steps=config.adam_steps,
            restarts=config.adam_restarts,
            seed=seed,
            noise=noise,
            progress=step,
        )
        return outcome_of(result, len(batch.runs))

    return solve


def _encoder_solver(vae: Any) -> Solver:
    """The VAE's own encoder mean: the amortised inverse the decoder was trained with."""

    def solve(batch: Batch, step: StepCallback) -> Outcome:
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            mu, _ = vae.encode(torch.as_tensor(batch.x, dtype=torch.float32))
        n = len(batch.runs)
        step(n, n)
        z = mu.double().numpy()
        return Outcome(z, np.full(n, "feasible", dtype=object),
                       np.full(n, (time.perf_counter() - start) / n))

    return solve


NOISE_LEVELS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
NOISE_LEVELS_QUICK: tuple[float, ...] = (1e-5, 1e-2)
NOISE_KINDS: tuple[str, ...] = ("uniform", "gaussian")
#: The random network of Figure 1 (ReLU, no bias, N(0, 1/n) weights).
NOISE_RANDOM_WIDTHS: tuple[int, ...] = (20, 100, 500)


def _noise_direction(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A unit-norm noise vector: uniform on [-1, 1]^n or Gaussian, scaled to ||u||_2 = 1."""
    u = rng.uniform(-1.0, 1.0, n) if kind == "uniform" else rng.standard_normal(n)
    return u / np.linalg.norm(u)


def noise_settings(config: Config) -> list[Setting]:
    """Figure 1: x = G(z) + e with ||e||_2 = level * ||G(z)||_2.

    The code z of run r is the same at every level and for both kinds of noise,
    and so is the direction of e for one kind: the levels only rescale it.
    """
    widths = "-".join(map(str, NOISE_RANDOM_WIDTHS))
    nets = {
        f"random-{widths}": random_network(
            list(NOISE_RANDOM_WIDTHS), seed=keyed_rng(config.seed, "noise-net")
        ),
        "mnist-relu": shipped_decoder("relu"),
    }
    levels = NOISE_LEVELS_QUICK if config.quick else NOISE_LEVELS
    settings = []
    for name, net in nets.items():
        for kind in NOISE_KINDS:
            for level in levels:

                def draw(
                    runs: Sequence[int], net: Network = net, name: str = name, kind: str = kind,
                    level: float = level,
                ) -> Batch:
                    z = codes(net, runs, config.seed, "noise", name)
                    clean = net.forward(z)
                    e = np.stack([
                        _noise_direction(kind, net.output_dim,
                                         keyed_rng(config.seed, "noise-e", name, kind, r))
                        for r in runs
                    ])
                    x = clean + level * np.linalg.norm(clean, axis=1, keepdims=True) * e
                    return Batch(tuple(runs), x, z)

                seed = key_int(f"{config.seed}-{name}-{kind}-{level!r}")
                hybrid: dict[str, Any] = {"seed": seed}
                if config.quick:
                    hybrid["steps"] = config.adam_steps
                solvers = {
                    "lp-linf": _invert_solver(net, method="layerwise", noise="linf"),
                    "lp-l1": _invert_solver(net, method="layerwise", noise="l1"),
                    "adam": _adam_solver(net, config, seed, noise="l2"),
                    "hybrid-linf": _invert_solver(
                        net, method="hybrid", noise="linf", options=hybrid
                    ),
                }
                params = {"network": name, "noise": kind, "level": level}
                settings.append(Setting(params, net, draw, solvers))
    return settings


LATENT_DIMS: tuple[int, ...] = tuple(range(10, 251, 10))
LATENT_DIMS_QUICK: tuple[int, ...] = (10, 250)
LATENT_WIDTHS: tuple[int, int] = (250, 600)


def identifiability_limit(k: int | np.ndarray, width: int = LATENT_WIDTHS[0]) -> Any:
    """P(Binomial(width, 1/2) >= k).

    The first layer of a [k, width, ...] ReLU network with Gaussian weights has
    about Binomial(width, 1/2) active units at a random z; with fewer than k
    the active rows cannot fix z (their null space is not {0}) and z is not
    unique, whatever the method. So this bounds every method's success rate.
    """
    from scipy.stats import binom

    return binom.sf(np.asarray(k) - 1, width, 0.5)


def latent_dim_settings(config: Config) -> list[Setting]:
    ks = LATENT_DIMS_QUICK if config.quick else LATENT_DIMS
    settings = []
    for activation in ("relu", "leaky_relu"):
        for k in ks:
            net = random_network(
                [k, *LATENT_WIDTHS],
                activation=activation,  # type: ignore[arg-type]
                seed=keyed_rng(config.seed, "latent-dim", activation, k),
            )

            def draw(runs: Sequence[int], net: Network = net, act: str = activation) -> Batch:
                z = codes(net, runs, config.seed, "latent-dim", act, net.latent_dim)
                return Batch(tuple(runs), net.forward(z), z)

            solvers = {
                # The layer-wise method as in the paper: no search below a non-unique layer.
                "lp": _invert_solver(net, fallback=GlobalSettings(enabled=False)),
                "adam": _adam_solver(net, config, key_int(f"{config.seed}-{activation}-{k}")),
            }
            settings.append(Setting({"activation": activation, "k": k}, net, draw, solvers))
    return settings


PARTIAL_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
PARTIAL_FRACTIONS_QUICK: tuple[float, ...] = (0.1, 0.5)


def _per_run_solver(net: Network, method: str, config: Config) -> Solver:
    """Invert each run from its own observed pixels (`invert(..., observe=mask)`).

    "lp": the layer-wise method alone on the network restricted to the
    observed rows (`partial.restrict_output`, no search: as in the paper);
    "lp+search": the tool's partial-observation path (`invert(net, x,
    observe=mask)`: the layer-wise method, then the searches of
    `preimage.methods.search` where it fails);
    "adam": `invert(net, x, method="adam", observe=mask)`, the loss on the
    observed pixels only.
    """
    def solve(batch: Batch, step: StepCallback) -> Outcome:
        assert batch.masks is not None
        n = len(batch.runs)
        z = np.full((n, net.latent_dim), np.nan)
        status = np.empty(n, dtype=object)
        seconds = np.zeros(n)
        for i in range(n):
            mask = Mask(batch.masks[i])
            if method == "lp":
                sub = restrict_output(net, mask)
                y = batch.x[i, batch.masks[i]]
                result = invert(sub, y, fallback=GlobalSettings(enabled=False))
            elif method == "lp+search":
                result = invert(net, batch.x[i], observe=mask)
            else:
                options = {
                    "lr": config.adam.lr, "steps": config.adam_steps,
                    "restarts": config.adam_restarts,
                    "seed": key_int(f"{config.seed}-{batch.runs[i]}"),
                }
                result = invert(net, batch.x[i], method="adam", observe=mask, options=options)
            z[i], status[i], seconds[i] = result.z, result.status, result.time
            step(i + 1, n)
        return Outcome(z, status, seconds)

    return solve


def partial_settings(config: Config) -> list[Setting]:
    net = shipped_decoder("relu")
    fractions = PARTIAL_FRACTIONS_QUICK if config.quick else PARTIAL_FRACTIONS
    settings = []
    for fraction in fractions:
        m = max(1, round(fraction * net.output_dim))

        def draw(runs: Sequence[int], m: int = m) -> Batch:
            # (keyed by the experiment's former name, "sensing": the same runs as before)
            z = codes(net, runs, config.seed, "sensing")
            masks = np.zeros((len(runs), net.output_dim), dtype=bool)
            for i, r in enumerate(runs):
                pick = keyed_rng(config.seed, "sensing-mask", m, r).choice(
                    net.output_dim, m, replace=False
                )
                masks[i, pick] = True
            return Batch(tuple(runs), net.forward(z), z, masks)

        solvers = {
            method: _per_run_solver(net, method, config) for method in ("lp", "lp+search", "adam")
        }
        params = {"network": "mnist-relu", "fraction": fraction}
        settings.append(Setting(params, net, draw, solvers))
    return settings


def mnist_decoder_settings(config: Config) -> list[Setting]:
    # Held-out digits (never trained on), in a seeded order; run r is digit r.
    test = load_mnist_digits()[1]
    digits = test[np.random.default_rng([config.seed, key_int("mnist-digits")]).permutation(
        len(test))]
    decoders: list[tuple[str, str, Network, Any]] = [
        ("shipped-relu", "relu", shipped_decoder("relu"), load_vae("relu")),
        ("shipped-leaky_relu", "leaky_relu", shipped_decoder("leaky_relu"),
         load_vae("leaky_relu")),
    ]
    if config.model is not None:
        # No "encoder" method for these: the encoders stored with the authors'
        # decoders do not reconstruct our [0, 1] digits (held-out MSE through
        # encoder and decoder 0.30 and 1.97, against 0.066 for the mean image).
        for kind, net in authors_decoders(config.model).items():
            decoders.append((f"authors-{kind}", kind, net, None))
    settings = []
    for name, kind, net, vae in decoders:

        def draw(runs: Sequence[int], net: Network = net, name: str = name) -> Batch:
            z = codes(net, runs, config.seed, "mnist-decoder", name)
            return Batch(tuple(runs), net.forward(z), z)

        solvers = {
            "lp": _invert_solver(net),
            "adam": _adam_solver(net, config, key_int(f"{config.seed}-{name}")),
        }
        if vae is not None:
            solvers["encoder"] = _encoder_solver(vae)
        settings.append(Setting({"decoder": name, "target": "code"}, net, draw, solvers))

        if config.quick and kind != "relu":
            continue  # the noisy LPs of the deeper decoder take seconds per digit

        def draw_digits(runs: Sequence[int]) -> Batch:
            return Batch(tuple(runs), digits[np.asarray(runs) % len(digits)], None)

        solvers = {
            "lp-linf": _invert_solver(net, method="layerwise", noise="linf"),
            "descent-l2": _invert_solver(net, noise="l2"),
            "hybrid-l2": _invert_solver(
                net, method="hybrid", noise="l2",
                options={"seed": key_int(f"{config.seed}-{name}-hybrid"),
                         **({"steps": config.adam_steps} if config.quick else {})},
            ),
            "adam": _adam_solver(
                net, config, key_int(f"{config.seed}-{name}-digits"), noise="l2"
            ),
        }
        if vae is not None:
            solvers["encoder"] = _encoder_solver(vae)
        settings.append(Setting({"decoder": name, "target": "digit"}, net, draw_digits, solvers))
    return settings


PROJECTION_LEVELS: tuple[float, ...] = (1e-2, 1e-1)
PROJECTION_MEASUREMENTS: tuple[int, ...] = (100, 200)
PROJECTION_NETS: tuple[tuple[int, ...], ...] = ((5, 20, 50), (10, 30, 100))
#: Relative noise that puts the small nets' x off their range.
PROJECTION_OFF_RANGE = 0.3
#: Runs of the noisy codes and of the small nets (their MILP runs up to 10 s a sample).
PROJECTION_MAX_RUNS = 50
#: The MILP's time limit per sample (quick: 5 s).
MILP_SECONDS = 10.0


def _digits(config: Config) -> np.ndarray:
    """The held-out digits in a seeded order: run r is digit r."""
    test = load_mnist_digits()[1]
    return test[np.random.default_rng([config.seed, key_int("mnist-digits")]).permutation(
        len(test))]


def _encoder(vae: Any) -> Any:
    """A VAE's encoder mean as a function of NumPy observations (a start of the descent)."""
    import torch

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return vae.encode(torch.as_tensor(x, dtype=torch.float32))[0].double().numpy()

    return encode


def _csgm(config: Config) -> dict[str, Any]:
    """Adam as CSGM runs it: lr 0.01, 1000 steps, 10 restarts (quick: the short descent)."""
    return {"lr": config.adam.lr, "steps": config.adam_steps,
            "restarts": 1 if config.quick else 10}


def _projection_solvers(net: Network, config: Config, key: str, vae: Any = None,
                        A: Any = None) -> dict[str, Solver]:
    """The cell descent, CSGM's Adam and the descent from Adam's answer (and the layer-wise
    noisy LP and the encoder where they apply), on x or on y = A x."""
    from preimage.methods.descent import project

    seed = key_int(f"{config.seed}-{key}")
    quick = {"adam_steps": config.adam_steps} if config.quick else {}
    descent_options = {"seed": seed, **quick, **({"encoder": _encoder(vae)} if vae else {})}

    def seen(batch: Batch) -> np.ndarray:
        return batch.x if A is None else A.apply(batch.x)

    def descent(batch: Batch, step: StepCallback) -> Outcome:
        return outcome_of(invert(net, seen(batch), noise="l2", A=A, progress=step,
                                 options=descent_options), len(batch.runs))

    adam_runs: dict[tuple[int, ...], InversionResult] = {}  # Adam's answers, for the polish

    def adam_of(batch: Batch, step: StepCallback | None = None) -> InversionResult:
        if batch.runs not in adam_runs:
            adam_runs[batch.runs] = invert(net, seen(batch), method="adam", noise="l2", A=A,
                                           progress=step, options={**_csgm(config), "seed": seed})
        return adam_runs[batch.runs]

    def adam(batch: Batch, step: StepCallback) -> Outcome:
        return outcome_of(adam_of(batch, step), len(batch.runs))

    def polished(batch: Batch, step: StepCallback) -> Outcome:
        first = adam_of(batch)  # the same answers as the "adam" rows (computed once)
        then = project(net, seen(batch), A=A, starts=first.z, restarts=0,
                       layerwise_start=False, descents=1, progress=step)
        n = len(batch.runs)
        return Outcome(then.z, then.status, np.full(n, (first.time + then.time) / n))

    solvers: dict[str, Solver] = {"descent": descent, "adam": adam, "adam+descent": polished}
    if A is None:
        solvers["layerwise-linf"] = _invert_solver(net, method="layerwise", noise="linf")
    if vae is not None and A is None:
        solvers["encoder"] = _encoder_solver(vae)
    return solvers


def projection_settings(config: Config) -> list[Setting]:
    """Real observations off the range: held-out digits, noisy codes, compressed digits, and
    small random nets against the MILP's proved global minimum."""
    from preimage.model.operators import GaussianMatrix

    digits = _digits(config)
    settings: list[Setting] = []
    empty = {"level": 0.0, "m": 0}

    def draw_digits(runs: Sequence[int]) -> Batch:
        return Batch(tuple(runs), digits[np.asarray(runs) % len(digits)], None)

    decoders: list[tuple[str, Network, Any]] = [
        ("shipped-relu", shipped_decoder("relu"), load_vae("relu")),
        ("shipped-leaky_relu", shipped_decoder("leaky_relu"), load_vae("leaky_relu")),
    ]
    if config.model is not None:
        decoders += [(f"authors-{kind}", net, None)
                     for kind, net in authors_decoders(config.model).items()]
    if config.quick:
        decoders = decoders[:1]
    for name, net, vae in decoders:
        settings.append(Setting({"part": "digits", "network": name, **empty}, net, draw_digits,
                                _projection_solvers(net, config, name, vae)))
    relu = decoders[0][1]
    for level in PROJECTION_LEVELS[:1] if config.quick else PROJECTION_LEVELS:

        def draw_noisy(runs: Sequence[int], level: float = level) -> Batch:
            z = codes(relu, runs, config.seed, "projection-codes")
            clean = relu.forward(z)
            e = np.stack([keyed_rng(config.seed, "projection-noise", r).standard_normal(
                relu.output_dim) for r in runs])
            e *= level * np.linalg.norm(clean, axis=1, keepdims=True) / np.linalg.norm(
                e, axis=1, keepdims=True)
            return Batch(tuple(runs), clean + e, z)

        settings.append(Setting({"part": "noisy-codes", "network": "shipped-relu",
                                 "level": level, "m": 0}, relu, draw_noisy,
                                _projection_solvers(relu, config, f"noisy-{level!r}"),
                                max_runs=PROJECTION_MAX_RUNS))
    for m in PROJECTION_MEASUREMENTS[:1] if config.quick else PROJECTION_MEASUREMENTS:
        A = GaussianMatrix(m, relu.output_dim, seed=keyed_rng(config.seed, "projection-A", m))
        settings.append(Setting({"part": "sensing", "network": "shipped-relu", "level": 0.0,
                                 "m": m}, relu, draw_digits,
                                _projection_solvers(relu, config, f"sensing-{m}", A=A)))
    for widths in PROJECTION_NETS[:1] if config.quick else PROJECTION_NETS:
        name = "random-" + "-".join(map(str, widths))
        net = random_network(list(widths), seed=keyed_rng(config.seed, "projection-net", name))

        def draw_off(runs: Sequence[int], net: Network = net, name: str = name) -> Batch:
            z = codes(net, runs, config.seed, "projection-off", name)
            clean = net.forward(z)
            e = np.stack([keyed_rng(config.seed, "projection-off-e", name, r).standard_normal(
                net.output_dim) for r in runs])
            e *= PROJECTION_OFF_RANGE * np.linalg.norm(clean, axis=1, keepdims=True) / (
                np.linalg.norm(e, axis=1, keepdims=True))
            return Batch(tuple(runs), clean + e, None)

        settings.append(Setting({"part": "small-nets", "network": name, **empty}, net,
                                draw_off, _milp_solvers(net, config), norm="linf",
                                max_runs=PROJECTION_MAX_RUNS))
    return settings


def _milp_solvers(net: Network, config: Config) -> dict[str, Solver]:
    """The l_inf cell descent, and the MILP's proved global minimum over |z|_inf <= 6 (seeded
    with the descent's misfit: status "optimal" where proved, "gap" where out of time)."""
    from preimage.solvers.milp import milp_projection

    def descent(batch: Batch, step: StepCallback) -> Outcome:
        return outcome_of(invert(net, batch.x, noise="linf", progress=step,
                                 options={"seed": config.seed}), len(batch.runs))

    def milp(batch: Batch, step: StepCallback) -> Outcome:
        n = len(batch.runs)
        start = time.perf_counter()
        first = invert(net, batch.x, noise="linf", options={"seed": config.seed})
        z = np.array(first.z, copy=True)
        status = np.empty(n, dtype=object)
        for i in range(n):
            found = milp_projection(net, batch.x[i], norm="linf", below=float(first.misfit[i]),
                                    time_limit=5.0 if config.quick else MILP_SECONDS)
            if found.z is not None and found.value < first.misfit[i]:
                z[i] = found.z
            status[i] = "optimal" if found.status in ("optimal", "infeasible") else "gap"
            step(i + 1, n)
        return Outcome(z, status, np.full(n, (time.perf_counter() - start) / n))

    return {"descent-linf": descent, "milp": milp}
