"""The least-squares mixing weight of the paper's Algorithm 1.

A self-distillation step is linear in alpha: with ``f1`` the model trained on the labels alone and ``g``
the alpha = 0 step (trained on the previous model's outputs alone), the alpha-step is

    f(alpha) = alpha * f1 + (1 - alpha) * g = g + alpha * (f1 - g)

exactly in kernel ridge regression, and as a first-order estimate for deep networks. The alpha that best fits
held-out targets ``y`` is then a one-dimensional least-squares problem with the closed form

    alpha* = <y - g, f1 - g> / ||f1 - g||^2 .

The held-out loss is a convex quadratic in alpha, so the best alpha in an interval is the unconstrained
one clipped to it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["least_squares_alpha"]


def _as_finite_array(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} must be a non-empty array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    return array


def least_squares_alpha(y, f1, g, bounds: tuple[float, float] | None = (0.0, 1.0)) -> float:
    """argmin over alpha of ``||y - (alpha * f1 + (1 - alpha) * g)||^2``, summed over all entries.

    Parameters
    ----------
    y : array (n,) or (n, k)
        Held-out targets (for classification: one-hot labels).
    f1 : array, same shape as y
        Held-out outputs of the step-1 model (trained on the targets alone).
    g : array, same shape as y
        Held-out outputs of the alpha = 0 step from the previous model.
    bounds : (low, high) or None
        Interval to clip the minimiser to; ``None`` returns the unconstrained least-squares solution.

    Returns
    -------
    float
        The optimal alpha. Where ``f1 == g`` every alpha gives the same fit; 1.0 (trust the
        ground truth) is returned then, clipped to ``bounds``.
    """
    y = _as_finite_array("y", y)
    f1 = _as_finite_array("f1", f1)
    g = _as_finite_array("g", g)
    if f1.shape != y.shape or g.shape != y.shape:
        raise ValueError(f"y, f1 and g must have the same shape, got y {y.shape}, f1 {f1.shape}, g {g.shape}")
    if bounds is not None:
        low, high = (float(b) for b in bounds)
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"bounds must be a finite (low, high) pair with low <= high, got {bounds!r}")

    direction = (f1 - g).ravel()
    denominator = float(direction @ direction)
    if denominator == 0.0:
        alpha = 1.0
    else:
        alpha = float((y - g).ravel() @ direction) / denominator
    if bounds is not None:
        alpha = min(max(alpha, low), high)
    return alpha
