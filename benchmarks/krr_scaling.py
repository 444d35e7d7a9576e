"""Closed-form self-distillation against explicit refitting, as n grows.

For each n: 50 steps of self-distillation for 11 alphas (0, 0.1, ..., 1), predictions at every step on m test
points, three ways:

  explicit   the definition: a fresh solve of (K + lam I) c = z at every step (np.linalg.solve, O(n^3) each);
  factored   explicit refitting with one Cholesky factorisation of K + lam I reused by every solve
             (what a careful implementation of the explicit recursion would do);
  closed     SelfDistillation: one eigendecomposition, then O(n) per (step, alpha) in the eigenbasis.

All three give the same predictions (checked here to 1e-6 relative). Prints a table; timings are wall-clock on
this machine. Run:  python benchmarks/krr_scaling.py [--sizes 500 2000 5000] [--explicit-alphas 11]

With --explicit-alphas k < 11 the explicit method runs k of the 11 chains and its time is scaled by 11 / k
(each chain is the same 50 solves, so the cost is linear in the number of chains); the table says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from sdlib.krr import SelfDistillation, kernel_matrix, refit_chain

ALPHAS = np.round(np.linspace(0, 1, 11), 2)
GAMMA, LAM = 20.0, 0.1


def problem(n, m=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, 2))
    y = np.sin(2 * np.pi * X[:, 0]) * np.cos(np.pi * X[:, 1]) + 0.3 * rng.normal(size=n)
    return X, y, rng.uniform(0, 1, size=(m, 2))


def run_closed(X, y, X_new, steps):
    sd = SelfDistillation(kernel="rbf", gamma=GAMMA, lam=LAM).fit(X, y)
    return np.stack([sd.predict_steps(X_new, steps, float(alpha)) for alpha in ALPHAS])


def run_factored(X, y, X_new, steps):
    K = kernel_matrix(X, X, "rbf", gamma=GAMMA)
    K_new = kernel_matrix(X_new, X, "rbf", gamma=GAMMA)
    factor = cho_factor(K + LAM * np.eye(len(y)))
    out = np.empty((len(ALPHAS), steps, len(X_new)))
    for i, alpha in enumerate(ALPHAS):
        targets = y
        for t in range(steps):
            coef = cho_solve(factor, targets)
            out[i, t] = K_new @ coef
            targets = alpha * y + (1 - alpha) * (K @ coef)
    return out


def run_explicit(X, y, X_new, steps, n_alphas):
    return np.stack([refit_chain(X, y, X_new, steps, float(alpha), lam=LAM, kernel="rbf", gamma=GAMMA)
                     for alpha in ALPHAS[:n_alphas]])


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--explicit-alphas", type=int, default=11, choices=range(1, 12), metavar="{1..11}")
    args = parser.parse_args()

    print(f"# krr_scaling: {args.steps} steps x {len(ALPHAS)} alphas, rbf gamma={GAMMA}, lam={LAM}, m=200 test points")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")
    header = f"{'n':>6} {'explicit s':>11} {'factored s':>11} {'closed s':>9} {'explicit/closed':>16} {'factored/closed':>16}"
    print(header)
    for n in args.sizes:
        X, y, X_new = problem(n)
        closed, t_closed = timed(run_closed, X, y, X_new, args.steps)
        factored, t_factored = timed(run_factored, X, y, X_new, args.steps)
        explicit, t_explicit = timed(run_explicit, X, y, X_new, args.steps, args.explicit_alphas)
        k = args.explicit_alphas
        scale = np.abs(closed).max()
        assert np.abs(factored - closed).max() <= 1e-6 * scale, "factored refitting disagrees with the closed form"
        assert np.abs(explicit - closed[:k]).max() <= 1e-6 * scale, "explicit refitting disagrees with the closed form"
        t_explicit_all = t_explicit * len(ALPHAS) / k
        note = "" if k == len(ALPHAS) else f"  (explicit: {k} of 11 chains timed, scaled x{len(ALPHAS) / k:.2f})"
        print(f"{n:>6} {t_explicit_all:>11.2f} {t_factored:>11.2f} {t_closed:>9.2f} "
              f"{t_explicit_all / t_closed:>15.1f}x {t_factored / t_closed:>15.1f}x{note}", flush=True)


if __name__ == "__main__":
    main()
