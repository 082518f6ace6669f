"""Gradient-descent baselines (CSGM, Bora et al. 2017) under the same result type.

    minimise_z  ||G(z) - x||_2^2 + lam ||z||_2^2

with Adam from random starts z ~ N(0, I), keeping per sample the restart with
the lowest loss. All samples and restarts run as one PyTorch batch (on CUDA
when available). Gradient descent proves nothing: its status is "feasible"
when the relative misfit |G(z) - x|_inf / |x|_inf is at most ``success_rtol``
and "failed" otherwise; it never claims "unique" or "infeasible".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from preimage._torch import default_device
from preimage._validation import check_observation, check_positive
from preimage.invert import InversionResult, LayerReport
from preimage.network import Network


def gradient_invert(
    net: Network,
    x: Any,
    *,
    lr: float = 0.01,
    steps: int = 1000,
    restarts: int = 10,
    lam: float = 0.0,
    success_rtol: float = 1e-6,
    seed: int | None = 0,
    device: Any = None,
    dtype: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> InversionResult:
    """Adam on ||G(z) - x||^2 (+ lam ||z||^2) with random restarts.

    Parameters
    ----------
    net : Network
    x : array-like of shape (n,) or (B, n)
    lr, steps, restarts : Adam's learning rate, steps per restart, restarts
        (CSGM defaults: 0.01, 1000, 10).
    lam : weight of the ||z||^2 prior term.
    success_rtol : relative misfit under which the answer counts as a preimage.
    seed : seed of the random starts.
    device, dtype : torch device (default CUDA when available) and dtype
        (default float64).
    progress : callable(step, steps), optional

    Returns
    -------
    InversionResult with method "adam"; `residual` is the relative misfit.
    """
    import torch

    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    check_positive(lr, "lr")
    check_positive(lam, "lam", allow_zero=True)
    if int(steps) < 1 or int(restarts) < 1:
        raise ValueError(f"`steps` and `restarts` must be >= 1; got {steps} and {restarts}.")
    xb, single = check_observation(x, net.output_dim)
    start = time.perf_counter()
    device = device or default_device()
    dtype = dtype or torch.float64
    model = net.to_torch(dtype).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    B, k, R = xb.shape[0], net.latent_dim, int(restarts)
    target = torch.as_tensor(xb, dtype=dtype, device=device).repeat(R, 1)  # (R*B, n)
    gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    z = torch.randn(R * B, k, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for step in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss = ((model(z) - target) ** 2).sum(dim=1) + lam * (z**2).sum(dim=1)
        loss.sum().backward()
        opt.step()
        if progress is not None:
            progress(step + 1, int(steps))
    with torch.no_grad():
        final = ((model(z) - target) ** 2).sum(dim=1) + lam * (z**2).sum(dim=1)
        best = final.view(R, B).argmin(dim=0)
        zs = z.detach().view(R, B, k)[best, torch.arange(B, device=device)]
    z_np = zs.cpu().numpy().astype(np.float64)
    fx = net.forward(z_np)
    scale = np.maximum(np.max(np.abs(xb), axis=1), 1e-300)
    residual = np.max(np.abs(fx - xb), axis=1) / scale
    ok = residual <= success_rtol
    status = np.where(ok, "feasible", "failed").astype(object)
    messages = [
        f"Adam, {steps} steps x {restarts} restarts: relative misfit {r:.3g}" for r in residual
    ]
    elapsed = time.perf_counter() - start
    nan = np.full((B, k), np.nan)
    reports: tuple[LayerReport, ...] = ()
    if single:
        return InversionResult(
            z_np[0], str(status[0]), bool(ok[0]), float(residual[0]), nan[0], messages[0],
            reports, "adam", success_rtol, elapsed,
        )
    return InversionResult(
        z_np, status, ok, residual, nan, messages, reports, "adam", success_rtol, elapsed
    )
