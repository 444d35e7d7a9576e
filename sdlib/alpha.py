r"""The least-squares mixing weight of the paper's Algorithm 1, shared by kernel ridge regression and the networks.

A step is linear in alpha: with ``f1`` the model fitted to the labels and ``g`` the alpha = 0 step (fitted to the
previous model's outputs), ``f(alpha) = g + alpha (f1 - g)``, exactly in kernel ridge regression and to first
order for networks. The alpha that best fits held-out targets ``y`` is ``<y - g, f1 - g> / ||f1 - g||^2``; the
held-out loss is a convex quadratic in alpha, so the best alpha in an interval is that one clipped to it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["least_squares_alpha"]


def least_squares_alpha(y, f1, g, bounds: tuple[float, float] | None = (0.0, 1.0)) -> float:
    """argmin over alpha of ``||y - (alpha f1 + (1 - alpha) g)||^2``, summed over all entries of the (n,) or (n, k)
    held-out targets ``y`` (one-hot for classes) and outputs ``f1``, ``g`` of the same shape, clipped to ``bounds``
    (None: unclipped). Where ``f1 == g`` every alpha fits equally: 1.0 (trust the labels), clipped."""
    y, f1, g = (np.asarray(value, dtype=np.float64) for value in (y, f1, g))
    for name, array in (("y", y), ("f1", f1), ("g", g)):
        if array.size == 0 or not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be a non-empty array of finite values (no NaN or inf), "
                             f"got shape {array.shape}")
    if f1.shape != y.shape or g.shape != y.shape:
        raise ValueError(f"y, f1 and g must have the same shape, got y {y.shape}, f1 {f1.shape}, g {g.shape}")
    if bounds is not None:
        low, high = (float(b) for b in bounds)
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"bounds must be a finite (low, high) pair with low <= high, got {bounds!r}")
    direction = (f1 - g).ravel()
    denominator = float(direction @ direction)
    alpha = 1.0 if denominator == 0.0 else float((y - g).ravel() @ direction) / denominator
    return alpha if bounds is None else min(max(alpha, low), high)
