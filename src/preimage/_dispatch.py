"""Routing of `preimage.invert` to the noisy, partial, sensing and gradient methods.

`invert` validates the network and the method name and keeps the exact,
fully observed, noise-free path for itself; every other combination comes
here:

- full observation with a noise model: method "exact" -> `noisy.invert_noisy`;
- ``observe=mask``: the network with the observed output rows only
  (`partial.restrict_output`); method "exact" without noise ->
  `partial.invert_observed`, anything else is routed again on that network;
- ``A=matrix``: "exact" -> `sensing.pgd_invert` (PGD with the LP projection);
- "adam", "clipping", "negation", "hybrid" -> `baselines.gradient_invert`,
  `clipping_invert`, `negation_invert`, `hybrid_invert` (with ``A`` when given:
  "adam" is then CSGM), the status following the noise rule.

``options`` are forwarded as keyword arguments to the function in the table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from preimage._validation import check_positive
from preimage.invert import InversionResult
from preimage.measurements import Mask, as_mask, as_measurement
from preimage.network import Network
from preimage.noisy import NORMS


def _call(fn: Callable[..., InversionResult], method: str, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), with unknown ``options`` reported by name."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(
                name for name, p in params.items()
                if p.kind is p.KEYWORD_ONLY
                and name not in ("noise", "noise_level", "A", "progress")
            )
            raise TypeError(
                f"`options` {unknown} are not settings of method {method!r} "
                f"({fn.__module__}.{fn.__name__}); it takes {allowed}."
            )
    return fn(*args, **kwargs)


def check_noise(noise: Any, noise_level: Any) -> float | None:
    """Validate the noise model; returns the level as a float (or None)."""
    if noise is not None and noise not in NORMS:
        raise ValueError(f"`noise` must be one of {NORMS} or None; got {noise!r}.")
    if noise_level is None:
        return None
    if noise is None:
        raise ValueError(
            "`noise_level` needs a noise model: pass noise='linf', 'l1' or 'l2' (the norm the "
            "level is measured in)."
        )
    return check_positive(noise_level, "noise_level", allow_zero=True)


def dispatch(
    net: Network,
    x: Any,
    *,
    method: str,
    rtol: float | None,
    progress: Callable[[int, int], None] | None,
    noise: str | None,
    noise_level: Any,
    observe: Any,
    A: Any,
    options: Mapping[str, Any] | None,
) -> InversionResult:
    """See the module docstring; `invert` has validated `net` and `method`."""
    level = check_noise(noise, noise_level)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"`options` must be a dict of method settings; got {type(options).__name__}."
        )
    options = dict(options)
    if observe is not None and A is not None:
        raise ValueError("Pass either `observe` (a mask) or `A` (a measurement matrix), not both.")
    if isinstance(A, Mask):
        observe, A = A, None
    if observe is not None:
        from preimage import partial

        mask = as_mask(observe, net.output_dim)
        yb, _ = partial.observed_values(x, mask)
        single = _is_single(x)
        if method == "exact" and noise is None:
            return _call(
                partial.invert_observed, method, net, yb[0] if single else yb, mask, rtol=rtol,
                progress=progress, **options,
            )
        sub = partial.restrict_output(net, mask)
        return dispatch(
            sub, yb[0] if single else yb, method=method, rtol=rtol, progress=progress,
            noise=noise, noise_level=level, observe=None, A=None, options=options,
        )
    common = {"noise": noise, "noise_level": level}
    if method == "exact" and noise is None and A is None:
        raise TypeError(
            f"`options` {sorted(options)} are not settings of the exact method on a fully "
            "observed, noise-free x: it takes none (use `rtol`)."
        )
    if A is not None:
        meas = as_measurement(A, net.output_dim)
        if method == "exact":
            from preimage import sensing

            return _call(
                sensing.pgd_invert, method, net, x, meas, progress=progress, **common, **options
            )
        return _call(_gradient(method), method, net, x, A=meas, progress=progress, **common,
                     **options)
    if method == "exact":
        from preimage import noisy

        return _call(
            noisy.invert_noisy, method, net, x, norm=noise, noise_level=level, progress=progress,
            **({"rtol": rtol} if rtol is not None else {}), **options,
        )
    if method == "hybrid" and rtol is not None:
        options.setdefault("rtol", rtol)
    return _call(_gradient(method), method, net, x, progress=progress, **common, **options)


def _gradient(method: str) -> Callable[..., InversionResult]:
    from preimage import baselines

    return {
        "adam": baselines.gradient_invert,
        "clipping": baselines.clipping_invert,
        "negation": baselines.negation_invert,
        "hybrid": baselines.hybrid_invert,
    }[method]


def _is_single(x: Any) -> bool:
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            import numpy as np

            shape = np.shape(x)
        except Exception:  # the validators report unusable input
            return False
    return len(shape) == 1
