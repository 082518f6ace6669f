"""The checks of `invert_layer` for a batch of full-rank solutions, from one product W h."""

from __future__ import annotations

import numpy as np

from preimage.methods.batched.context import Context, LayerCache
from preimage.model.layer import Layer

#: Memory of one (piece, m) array of the batched checks on the CPU (stays in cache).
CHECK_MEMORY = 2 * 2**20


def check(
    layer: Layer,
    cache: LayerCache,
    h0_np: np.ndarray,
    y_np: np.ndarray,
    target_np: np.ndarray,
    active_np: np.ndarray,
    scale_np: np.ndarray,
    rtol: float,
    nonneg: bool,
    ctx: Context,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks of `invert_layer` for a full-rank h0, in batch; (ok, h, residual).

    `invert_layer` checks h0 (the equalities within 10 tol, the inactive units
    below tau + tol, h0 >= -tol, with tol = rtol (scale + max_i |w_i| |h0|)),
    then the forward pass of h = max(h0, 0) (within 10 rtol size, size =
    scale + max_i |w_i| |h|). Here everything comes from one product W h, where
    the reference has four with W or |W|: with nu = max_j max(-h0_j, 0),
    |w_i (h - h0)| <= nu max_i |w_i|_1 =: slack; and tol and size use
    max_i |w_i h|, which is at most max_i |w_i| |h| <= max_i |w_i| |h0| (up to
    sqrt(n) times smaller for random signs: still 1e6 times the rounding
    error of w_i h at rtol = 1e-9). So requiring each check on h with the
    slack added, and nu <= tol(h), accepts only samples `invert_layer`
    accepts. In pieces of about CHECK_MEMORY bytes per (piece, m) array on the
    CPU: the temporaries stay in cache and reuse their memory.
    """
    torch = ctx.torch
    dev = ctx.device
    b, m = y_np.shape
    rows = b if not ctx.on_cpu else max(64, CHECK_MEMORY // (8 * m))
    ok = np.zeros(b, dtype=bool)
    h_np = np.maximum(h0_np, 0.0) if nonneg else h0_np
    residual_np = np.zeros(b)
    for lo in range(0, b, rows):
        sl = slice(lo, min(b, lo + rows))
        h = torch.as_tensor(h_np[sl], device=dev)
        target = torch.as_tensor(target_np[sl], device=dev)
        active = torch.as_tensor(active_np[sl], device=dev)
        scale = torch.as_tensor(scale_np[sl], device=dev)
        pre = torch.addmm(cache.bias, h, cache.w.T)
        size = scale + (pre - cache.bias).abs_().amax(dim=1)  # max_i |w_i h| <= max_i |w_i| |h|
        tol = rtol * size  # the rounding of w_i h + b_i
        if nonneg:
            nu = torch.as_tensor(np.maximum(-h0_np[sl].min(axis=1), 0.0), device=dev)
            slack = nu * cache.row_l1_max
        else:
            nu = slack = torch.zeros_like(tol)
        # max over units of (|w_i h + b_i - t_i| - 10 tol) on A and (w_i h + b_i - tau - tol)
        # off A: <= -slack exactly when every unit passes its check with the slack.
        on_a = (pre - target).abs_().sub_(10 * tol[:, None])
        off_a = pre - (rtol * scale + tol)[:, None]
        excess = torch.where(active, on_a, off_a, out=on_a).amax(dim=1)
        y = torch.as_tensor(y_np[sl], device=dev)
        residual = (layer.activation.torch(pre) - y).abs_().amax(dim=1)
        good = (excess + slack <= 0) & (nu <= tol) & (residual <= 10 * rtol * size)
        ok[sl] = good.cpu().numpy()
        residual_np[sl] = residual.cpu().numpy()
    return ok, h_np, residual_np
