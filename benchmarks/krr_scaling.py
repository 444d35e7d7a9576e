"""Self-distillation of kernel ridge regression for a grid of queries, three ways, as n grows.

For each n: 50 steps of self-distillation for 11 alphas (0, 0.1, ..., 1), predictions at every step on m = 200
test points (rbf kernel), three ways:

  sklearn    what a user would do: refit scikit-learn's ``KernelRidge(alpha=lam)`` on the mixed targets at every
             step (a new Gram matrix and solve per fit; fitted values by ``predict(X)``);
  baseline   the best explicit implementation: one Gram matrix and one Cholesky factor of K + lam I, then per
             step one multi-right-hand-side solve for all 11 alphas, fitted values from K c = z - lam c;
  ours       ``SelfDistillation(solver="auto").fit(X, y).predict_chains(X_new, 50, alphas)`` (fit included):
             "auto" is the eigendecomposition for n <= 300 and the Cholesky factor above;
  eigh       the same with ``solver="eigh"`` (one eigendecomposition; the spectrum's price, for reference).

Ours and the baseline are timed best of ``--repeat`` alternating runs; sklearn and eigh once.
All give the same predictions (checked here: max difference <= 1e-8 of the largest prediction).

Refitting scikit-learn is slow (550 fits), so by default it runs only ``--sklearn-alphas`` of the 11 chains and
``--sklearn-steps`` of the 50 steps per chain; each fit of a chain costs the same (same n, one new Gram matrix
and one solve), so its time is scaled by (11 / alphas) * (50 / steps) and the output says so. Its predictions
are checked on the steps it ran.

Run:  python benchmarks/krr_scaling.py [--sizes 500 2000 5000] [--large] [--out benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import sklearn
from scipy.linalg import cho_factor, cho_solve
from sklearn.kernel_ridge import KernelRidge
from threadpoolctl import threadpool_info, threadpool_limits

from sdlib.krr import SelfDistillation, kernel_matrix
from sdlib.records import write_atomically

ALPHAS = np.round(np.linspace(0, 1, 11), 2)
GAMMA, LAM, M_TEST = 20.0, 0.1, 200


def problem(n, m=M_TEST, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(n, 2))
    y = np.sin(2 * np.pi * X[:, 0]) * np.cos(np.pi * X[:, 1]) + 0.3 * rng.normal(size=n)
    return X, y, rng.uniform(0, 1, size=(m, 2))


def run_ours(X, y, X_new, steps, solver="auto"):
    sd = SelfDistillation(kernel="rbf", gamma=GAMMA, lam=LAM, solver=solver).fit(X, y)
    return sd.predict_chains(X_new, steps, ALPHAS), sd.solver_


def run_baseline(X, y, X_new, steps):
    """(11, steps, m): one Cholesky factor, one multi-right-hand-side solve per step for all alphas."""
    K = kernel_matrix(X, X, "rbf", gamma=GAMMA)
    K_new = kernel_matrix(X_new, X, "rbf", gamma=GAMMA)
    K[np.diag_indices_from(K)] += LAM
    factor = cho_factor(K, lower=True, overwrite_a=True, check_finite=False)
    Y = np.repeat(y[:, None], len(ALPHAS), axis=1)  # (n, 11)
    out = np.empty((steps, len(ALPHAS), len(X_new)))
    targets = Y
    for t in range(steps):
        coef = cho_solve(factor, targets, check_finite=False)
        out[t] = (K_new @ coef).T
        fitted = targets - LAM * coef  # K c = z - lam c
        targets = ALPHAS * Y + (1 - ALPHAS) * fitted
    return out.transpose(1, 0, 2)


def run_sklearn(X, y, X_new, steps, alphas):
    """(len(alphas), steps, m): KernelRidge refitted on the mixed targets at every step."""
    out = np.empty((len(alphas), steps, len(X_new)))
    for i, alpha in enumerate(alphas):
        targets = y
        for t in range(steps):
            model = KernelRidge(alpha=LAM, kernel="rbf", gamma=GAMMA).fit(X, targets)
            out[i, t] = model.predict(X_new)
            targets = alpha * y + (1 - alpha) * model.predict(X)
    return out


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(note):
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__, "platform": platform.platform(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine_note": note,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000], help="n values (default: %(default)s)")
    parser.add_argument("--large", action="store_true", help="also n = 10,000")
    parser.add_argument("--steps", type=int, default=50, help="steps per chain (default: %(default)s)")
    parser.add_argument("--sklearn-alphas", type=int, default=1, choices=range(1, 12), metavar="{1..11}",
                        help="chains of the 11 that the scikit-learn refitting runs; its time is scaled "
                             "(default: %(default)s)")
    parser.add_argument("--sklearn-steps", type=int, default=5,
                        help="steps per chain the scikit-learn refitting runs; its time is scaled (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="ours and the baseline: best of this many alternating runs (default: %(default)s)")
    parser.add_argument("--no-eigh", action="store_true", help="skip the eigh column")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads for all methods alike (threadpoolctl); default: the library's own. On a "
                             "shared, loaded machine 1 thread avoids OpenBLAS's busy-waiting (8x faster there)")
    parser.add_argument("--machine-note", default="", help="recorded with the results (e.g. a shared machine)")
    parser.add_argument("--out", help="write the results as JSON here (atomically)")
    args = parser.parse_args(argv)
    sizes = list(args.sizes) + ([10_000] if args.large and 10_000 not in args.sizes else [])
    sk_alphas, sk_steps = args.sklearn_alphas, min(args.sklearn_steps, args.steps)
    sk_scale = (len(ALPHAS) / sk_alphas) * (args.steps / sk_steps)

    print(f"# krr_scaling: {args.steps} steps x {len(ALPHAS)} alphas, rbf gamma={GAMMA}, lam={LAM}, m={M_TEST} test "
          f"points; {_cpu_name()}, {os.cpu_count()} cores, numpy {np.__version__}, scikit-learn {sklearn.__version__}")
    print(f"# BLAS threads: {args.threads or 'library default'}")
    print(f"# sklearn refitting: {sk_alphas} of 11 chains x {sk_steps} of {args.steps} steps timed, scaled "
          f"x{sk_scale:.1f}", flush=True)
    print(f"{'n':>6} {'sklearn s':>10} {'baseline s':>11} {'ours s':>8} {'(solver)':>10} {'eigh s':>8} "
          f"{'sklearn/ours':>13} {'baseline/ours':>14}", flush=True)
    limits = threadpool_limits(limits=args.threads) if args.threads else None
    rows = []
    for n in sizes:
        X, y, X_new = problem(n)
        # Ours and the baseline alternate, best of --repeat each: a shared machine's load hits both alike.
        t_ours = t_baseline = math.inf
        for _ in range(args.repeat):
            (ours, solver), seconds = timed(run_ours, X, y, X_new, args.steps)
            t_ours = min(t_ours, seconds)
            baseline, seconds = timed(run_baseline, X, y, X_new, args.steps)
            t_baseline = min(t_baseline, seconds)
        sk, t_sk = timed(run_sklearn, X, y, X_new, sk_steps, ALPHAS[:sk_alphas])
        scale = np.abs(ours).max()
        differences = {"baseline": float(np.abs(baseline - ours).max() / scale),
                       "sklearn": float(np.abs(sk - ours[:sk_alphas, :sk_steps]).max() / scale)}
        t_eigh = None
        if not args.no_eigh:
            (eigh, _), t_eigh = timed(run_ours, X, y, X_new, args.steps, "eigh")
            differences["eigh"] = float(np.abs(eigh - ours).max() / scale)
        for name, difference in differences.items():
            assert difference <= 1e-8, f"{name} disagrees with ours at n={n}: {difference:.3g}"
        t_sk_all = t_sk * sk_scale
        row = {"n": n, "ours_solver": solver, "seconds": {"sklearn_refit_scaled": t_sk_all, "sklearn_refit_timed": t_sk,
                                                            "baseline": t_baseline, "ours": t_ours, "eigh": t_eigh},
               "speedup": {"sklearn_over_ours": t_sk_all / t_ours, "baseline_over_ours": t_baseline / t_ours},
               "max_relative_difference_to_ours": differences}
        rows.append(row)
        eigh_text = "-" if t_eigh is None else f"{t_eigh:.2f}"
        print(f"{n:>6} {t_sk_all:>10.1f} {t_baseline:>11.2f} {t_ours:>8.2f} {solver:>10} {eigh_text:>8} "
              f"{t_sk_all / t_ours:>12.0f}x {t_baseline / t_ours:>13.2f}x", flush=True)

    if limits is not None:
        limits.restore_original_limits()
    result = {
        "benchmark": "krr_scaling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/krr_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"sizes": sizes, "steps": args.steps, "alphas": ALPHAS.tolist(), "kernel": "rbf", "gamma": GAMMA,
                     "lam": LAM, "m_test": M_TEST, "repeat_best_of": args.repeat, "sklearn_alphas_timed": sk_alphas, "sklearn_steps_timed": sk_steps,
                     "sklearn_time_scale": sk_scale, "blas_threads": args.threads or
                     [info.get("num_threads") for info in threadpool_info()],
                     "sklearn_note": f"scikit-learn refitting timed on {sk_alphas} of 11 chains x {sk_steps} of "
                                     f"{args.steps} steps and scaled x{sk_scale:.2f} (every fit costs the same)"},
        "provenance": provenance(args.machine_note),
        "rows": rows,
    }
    if args.out:
        write_atomically(args.out, lambda handle: json.dump(result, handle, indent=1))
        print(f"# written to {args.out}")
    return result


if __name__ == "__main__":
    main()
