"""The closed form of self-distilled kernel ridge regression against its definition (explicit refitting)."""

import math
import subprocess
import sys

import numpy as np
import pytest

from sdlib.alpha import least_squares_alpha
from sdlib.krr import SelfDistillation, kernel_matrix, refit_chain

KERNELS = {
    "rbf": dict(kernel="rbf", gamma=3.0),
    "laplacian": dict(kernel="laplacian", gamma=2.0),
    "polynomial": dict(kernel="polynomial", gamma=0.5, degree=3, coef0=1.0),
    "linear": dict(kernel="linear"),
    "callable": dict(kernel=lambda A, B: np.exp(-np.abs(A[:, None, 0] - B[None, :, 0]))),
}


def problem(n=25, d=2, seed=0, duplicates=False):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, d))
    if duplicates:
        X[1] = X[0]
        X[7] = X[3]
    y = np.sin(3 * X[:, 0]) + 0.3 * rng.normal(size=n)
    X_new = rng.uniform(-1, 1, size=(9, d))
    return X, y, X_new


def scale(prediction):
    return max(1.0, np.abs(prediction).max())


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_closed_form_matches_explicit_refitting(name, alpha):
    X, y, X_new = problem()
    params = KERNELS[name]
    sd = SelfDistillation(lam=0.3, **params).fit(X, y)
    explicit = refit_chain(X, y, X_new, 8, alpha, lam=0.3, **params)
    for step in range(1, 9):
        closed = sd.predict(X_new, step=step, alpha=alpha)
        np.testing.assert_allclose(closed, explicit[step - 1], atol=1e-9 * scale(explicit), rtol=0)


def test_refit_chain_is_the_definition():
    """The reference itself, spelled out with a fresh solve on mixed targets."""
    X, y, X_new = problem(seed=4)
    K = kernel_matrix(X, X, "rbf", gamma=3.0)
    K_new = kernel_matrix(X_new, X, "rbf", gamma=3.0)
    f_train, f_new = K @ np.linalg.solve(K + 0.2 * np.eye(len(y)), y), None
    for _ in range(3):
        z = 0.4 * y + 0.6 * f_train
        coef = np.linalg.solve(K + 0.2 * np.eye(len(y)), z)
        f_train, f_new = K @ coef, K_new @ coef
    np.testing.assert_allclose(refit_chain(X, y, X_new, 4, 0.4, lam=0.2, gamma=3.0)[-1], f_new, atol=1e-12)


@pytest.mark.parametrize("name", ["rbf", "linear", "polynomial"])
def test_singular_gram_matrix_is_exact(name):
    # Duplicate points make every Gram matrix singular; the linear kernel with d = 2 < n is rank 2.
    X, y, X_new = problem(duplicates=True)
    params = KERNELS[name]
    sd = SelfDistillation(lam=0.05, **params).fit(X, y)
    assert np.sum(sd.eigenvalues_ <= 1e-10 * sd.eigenvalues_[0]) >= 2
    explicit = refit_chain(X, y, X_new, 6, 0.3, lam=0.05, **params)
    for step in range(1, 7):
        closed = sd.predict(X_new, step=step, alpha=0.3)
        assert np.all(np.isfinite(closed))
        np.testing.assert_allclose(closed, explicit[step - 1], atol=1e-8 * scale(explicit), rtol=0)
    # Also at the training points, where the null space matters most.
    np.testing.assert_allclose(sd.predict(X, step=4, alpha=0.3), refit_chain(X, y, X, 4, 0.3, lam=0.05, **params)[-1],
                               atol=1e-8 * scale(y), rtol=0)


@pytest.mark.parametrize("name", ["rbf", "laplacian", "linear"])
def test_per_step_alphas_match_explicit_refitting(name):
    X, y, X_new = problem(seed=1)
    params = KERNELS[name]
    alphas = [0.9, 0.0, 0.35, 0.6]
    sd = SelfDistillation(lam=0.1, **params).fit(X, y)
    explicit = refit_chain(X, y, X_new, 5, alphas, lam=0.1, **params)
    for step in range(1, 6):
        closed = sd.predict(X_new, step=step, alpha=alphas[: step - 1])
        np.testing.assert_allclose(closed, explicit[step - 1], atol=1e-9 * scale(explicit), rtol=0)
    # A constant list equals the scalar alpha.
    np.testing.assert_allclose(sd.predict(X_new, step=4, alpha=[0.2] * 3), sd.predict(X_new, step=4, alpha=0.2))


def test_step_one_is_plain_ridge_regression():
    X, y, X_new = problem(seed=2)
    sd = SelfDistillation(kernel="rbf", gamma=3.0, lam=0.2).fit(X, y)
    K = kernel_matrix(X, X, "rbf", gamma=3.0)
    ridge = kernel_matrix(X_new, X, "rbf", gamma=3.0) @ np.linalg.solve(K + 0.2 * np.eye(len(y)), y)
    for alpha in (None, 0.0, 0.7):
        np.testing.assert_allclose(sd.predict(X_new, step=1, alpha=alpha), ridge, atol=1e-10)


def test_damping_recursion_and_closed_form():
    X, y, _ = problem(seed=3)
    lam = 0.25
    sd = SelfDistillation(kernel="rbf", gamma=3.0, lam=lam).fit(X, y)
    d = sd.eigenvalues_
    assert np.all(np.diff(d) <= 0) and np.all(d >= 0)
    a = d / (d + lam)
    for alpha in (0.0, 0.2, 0.75, 1.0):
        b = a.copy()  # B(1) = A
        b_inf = alpha * d / (alpha * d + lam)
        for step in range(1, 15):
            np.testing.assert_allclose(sd.damping(step, alpha), b, atol=1e-14)
            closed = b_inf + (a - b_inf) * (a * (1 - alpha)) ** (step - 1)
            np.testing.assert_allclose(b, closed, atol=1e-14)
            b = a * ((1 - alpha) * b + alpha)
        np.testing.assert_allclose(sd.damping(math.inf, alpha), b_inf, atol=1e-15)
    # alpha = 0: geometric collapse, b_t = a^t.
    np.testing.assert_allclose(sd.damping(7, 0.0), a**7, rtol=1e-12)
    # Per-step alphas follow the same recursion.
    alphas = [0.3, 0.8, 0.1]
    b = a.copy()
    for alpha in alphas:
        b = a * ((1 - alpha) * b + alpha)
    np.testing.assert_allclose(sd.damping(4, alphas), b, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.6, 1.0])
def test_limit_is_ridge_regression_with_lam_over_alpha(alpha):
    X, y, X_new = problem(seed=5, duplicates=True)
    lam = 0.2
    sd = SelfDistillation(kernel="rbf", gamma=3.0, lam=lam).fit(X, y)
    K = kernel_matrix(X, X, "rbf", gamma=3.0)
    ridge = kernel_matrix(X_new, X, "rbf", gamma=3.0) @ np.linalg.solve(K + (lam / alpha) * np.eye(len(y)), y)
    limit = sd.predict(X_new, step=math.inf, alpha=alpha)
    np.testing.assert_allclose(limit, ridge, atol=1e-9 * scale(ridge), rtol=0)
    # Many steps converge to it (rate max a(1-alpha) < 1).
    np.testing.assert_allclose(sd.predict(X_new, step=5000, alpha=alpha), limit, atol=1e-8 * scale(ridge), rtol=0)
    # ... and so does explicit refitting.
    np.testing.assert_allclose(refit_chain(X, y, X_new, 400, alpha, lam=lam, gamma=3.0)[-1], limit,
                               atol=1e-6 * scale(ridge), rtol=0)


def test_alpha_zero_collapses_to_zero():
    X, y, X_new = problem(seed=6)
    sd = SelfDistillation(kernel="rbf", gamma=3.0, lam=0.2).fit(X, y)
    np.testing.assert_array_equal(sd.predict(X_new, step=math.inf, alpha=0.0), 0.0)
    norms = [np.linalg.norm(sd.predict(X_new, step=t, alpha=0.0)) for t in (1, 5, 20, 100, 1000)]
    assert all(later < earlier for earlier, later in zip(norms, norms[1:]))
    # At the training points f_t(X) = V B(t) V^T y with B(t) = A^t, so ||f_t(X)|| <= a_max^t ||y||.
    a_max = sd.eigenvalues_[0] / (sd.eigenvalues_[0] + 0.2)
    for t in (1, 5, 20, 100, 1000):
        assert np.linalg.norm(sd.predict(X, step=t, alpha=0.0)) <= a_max**t * np.linalg.norm(y) * (1 + 1e-9)
    assert norms[-1] < 1e-6 * norms[0]


def _validation_mse(sd, X_val, y_val, step, alphas):
    return np.mean((sd.predict(X_val, step=step, alpha=alphas) - y_val) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_alphas_match_brute_force_grid_search(seed):
    rng = np.random.default_rng(100 + seed)
    X = rng.uniform(0, 1, size=40)
    y = np.sin(2 * np.pi * X) + 0.5 * rng.normal(size=40)
    X_val = rng.uniform(0, 1, size=30)
    y_val = np.sin(2 * np.pi * X_val) + 0.5 * rng.normal(size=30)
    sd = SelfDistillation(kernel="rbf", gamma=80.0, lam=0.05).fit(X, y)
    steps = 5
    optimal = sd.optimal_alphas(X_val, y_val, steps)
    assert optimal.shape == (steps - 1,)
    grid = np.linspace(0, 1, 2001)
    chosen = []
    for step in range(2, steps + 1):
        losses = [_validation_mse(sd, X_val, y_val, step, chosen + [a]) for a in grid]
        best = grid[int(np.argmin(losses))]
        assert abs(optimal[step - 2] - best) <= 1e-3
        # Algorithm 1's alpha is at least as good as every grid point.
        assert _validation_mse(sd, X_val, y_val, step, chosen + [optimal[step - 2]]) <= min(losses) + 1e-12
        chosen.append(optimal[step - 2])


def test_unconstrained_optimal_alphas_match_wide_grid():
    rng = np.random.default_rng(7)
    X = rng.uniform(0, 1, size=30)
    y = np.sin(2 * np.pi * X) + 0.1 * rng.normal(size=30)
    X_val = rng.uniform(0, 1, size=20)
    y_val = 1.5 * np.sin(2 * np.pi * X_val)  # validation targets larger than the fit: alpha* > 1 is possible
    sd = SelfDistillation(kernel="rbf", gamma=30.0, lam=0.5).fit(X, y)
    unconstrained = sd.optimal_alphas(X_val, y_val, 3, bounds=None)
    grid = np.linspace(-5, 20, 25001)
    best = grid[np.argmin([_validation_mse(sd, X_val, y_val, 2, [a]) for a in grid])]
    assert unconstrained[0] > 1.0 and abs(unconstrained[0] - best) <= 1e-3
    clipped = sd.optimal_alphas(X_val, y_val, 3)
    assert clipped[0] == pytest.approx(min(max(unconstrained[0], 0.0), 1.0))


def test_least_squares_alpha_matches_grid_on_arrays():
    rng = np.random.default_rng(8)
    y = np.eye(10)[rng.integers(0, 10, size=200)]
    f1 = np.abs(y + 0.3 * rng.normal(size=y.shape))
    g = np.abs(0.5 * f1 + 0.2 * rng.normal(size=y.shape))
    grid = np.linspace(0, 1, 10001)
    losses = [np.sum((y - (a * f1 + (1 - a) * g)) ** 2) for a in grid]
    assert least_squares_alpha(y, f1, g) == pytest.approx(grid[np.argmin(losses)], abs=1e-4)
    assert least_squares_alpha(y, y, np.zeros_like(y)) == pytest.approx(1.0)
    assert least_squares_alpha(y, np.zeros_like(y), y) == pytest.approx(0.0)
    assert least_squares_alpha(y, f1, f1) == 1.0  # degenerate: every alpha fits equally


# --------------------------------------------------------------------------------------------------------
# bad input: a ValueError that names the parameter, before any work
# --------------------------------------------------------------------------------------------------------
X0 = np.linspace(0, 1, 11)
Y0 = np.sin(2 * np.pi * X0)


@pytest.mark.parametrize("lam", [0, -1.0, float("nan"), float("inf"), "0.2", True])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        SelfDistillation(lam=lam).fit(X0, Y0)


@pytest.mark.parametrize("X, y, name", [
    (np.array([0.0, np.nan, 1.0]), np.zeros(3), "X"),
    (np.array([0.0, np.inf, 1.0]), np.zeros(3), "X"),
    (X0, np.where(X0 > 0.5, np.nan, 0.0), "y"),
    (X0, np.zeros(10), "y"),
    (X0, np.zeros((11, 2, 1)), "y"),  # (n, 1) is a one-output target now (scikit-learn's multi-output convention)
    (X0, np.zeros((11, 0)), "y"),
    (np.zeros((2, 3, 4)), np.zeros(2), "X"),
    (np.zeros(0), np.zeros(0), "X"),
])
def test_bad_training_data(X, y, name):
    with pytest.raises(ValueError, match=rf"^(Input )?{name}\b"):
        SelfDistillation(lam=0.1).fit(X, y)


def test_unknown_kernel_and_bad_kernel_parameters():
    with pytest.raises(ValueError, match="'kernel' parameter of SelfDistillation must be a str among"):
        SelfDistillation(kernel="cosine", lam=0.1).fit(X0, Y0)
    with pytest.raises(ValueError, match="gamma"):
        SelfDistillation(kernel="rbf", gamma=0.0, lam=0.1).fit(X0, Y0)
    with pytest.raises(ValueError, match="degree"):
        SelfDistillation(kernel="polynomial", degree=0, lam=0.1).fit(X0, Y0)
    with pytest.raises(ValueError, match="kernel callable must return shape"):
        SelfDistillation(kernel=lambda A, B: np.ones((2, 2)), lam=0.1).fit(X0, Y0)


def test_predict_before_fit():
    with pytest.raises(ValueError, match="not fitted"):
        SelfDistillation(lam=0.1).predict(X0)
    with pytest.raises(ValueError, match="not fitted"):
        SelfDistillation(lam=0.1).damping(2, 0.5)
    with pytest.raises(ValueError, match="not fitted"):
        SelfDistillation(lam=0.1).optimal_alphas(X0, Y0, 3)


@pytest.fixture(scope="module")
def fitted():
    return SelfDistillation(kernel="rbf", gamma=80.0, lam=0.2).fit(X0, Y0)


@pytest.mark.parametrize("step", [0, -2, 2.5, 2.0, "3", None, True, -math.inf])
def test_bad_step(fitted, step):
    expected = r"The 'step' parameter of SelfDistillation must be an int in the range \[1, inf\) or a float among \{inf"
    if step is not None:  # predict(step=None) uses the constructor's step (scikit-learn convention)
        with pytest.raises(ValueError, match=expected):
            fitted.predict(X0, step=step, alpha=0.5)
    with pytest.raises(ValueError, match=expected):
        SelfDistillation(lam=0.1, step=step, alpha=0.5).fit(X0, Y0)
    with pytest.raises(ValueError, match="'step' parameter of SelfDistillation must be"):
        fitted.damping(step, 0.5)


@pytest.mark.parametrize("alpha, step, message", [
    ([0.1, 0.2], 4, "length 3"),
    ([0.1, 0.2, 0.3, 0.4], 4, "length 3"),
    ([[0.1, 0.2, 0.3]], 4, "length 3"),
    ([0.1, np.nan, 0.3], 4, "finite"),
    (float("nan"), 3, "finite"),
    (None, 3, "alpha is required"),
    ([0.5], math.inf, "single number"),
    (1.5, math.inf, r"\[0, 1\]"),
])
def test_bad_alpha(fitted, alpha, step, message):
    with pytest.raises(ValueError, match=message):
        fitted.predict(X0, step=step, alpha=alpha)


def test_bad_prediction_and_validation_inputs(fitted):
    with pytest.raises(ValueError, match="^X has 2 features, but SelfDistillation is expecting 1 features"):
        fitted.predict(np.zeros((3, 2)), step=2, alpha=0.5)
    with pytest.raises(ValueError, match="^Input X contains NaN"):
        fitted.predict(np.array([np.nan]), step=2, alpha=0.5)
    with pytest.raises(ValueError, match="^y_val "):
        fitted.optimal_alphas(X0, Y0[:5], 3)
    with pytest.raises(ValueError, match=r"^The 'steps' parameter of SelfDistillation must be an int in the range"):
        fitted.optimal_alphas(X0, Y0, 0)
    with pytest.raises(ValueError, match="f1 and g must have the same shape"):
        least_squares_alpha(np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="bounds"):
        least_squares_alpha(np.zeros(3), np.ones(3), np.zeros(3), bounds=(1.0, 0.0))


@pytest.mark.parametrize("alpha", [0.0, 0.3, [0.9, 0.1, 0.5, 0.0, 1.0]])
def test_predict_steps_matches_refit_chain_and_predict(alpha):
    X, y, X_new = problem(seed=9, duplicates=True)
    sd = SelfDistillation(kernel="laplacian", gamma=2.0, lam=0.1).fit(X, y)
    path = sd.predict_steps(X_new, 6, alpha)
    assert path.shape == (6, len(X_new))
    np.testing.assert_allclose(path, refit_chain(X, y, X_new, 6, alpha, lam=0.1, kernel="laplacian", gamma=2.0),
                               atol=1e-9 * scale(path), rtol=0)
    per_step = [sd.predict(X_new, step=t, alpha=alpha if np.isscalar(alpha) else alpha[: t - 1]) for t in range(1, 7)]
    np.testing.assert_allclose(path, np.array(per_step), atol=1e-12 * scale(path), rtol=0)
    with pytest.raises(ValueError, match="length 5"):
        sd.predict_steps(X_new, 6, [0.1, 0.2])


def test_the_kernel_half_does_not_import_torch():
    """The theory notebooks' kernels never pay torch's import (about 1.6 s here) even where torch is installed:
    sdlib.krr, its label noise and the data's fingerprint need numpy and scikit-learn only."""
    code = ("import sys\n"
            "from sdlib.krr import SelfDistillation\n"
            "from sdlib.data import data_fingerprint, symmetric_label_noise\n"
            "symmetric_label_noise([0, 1, 2, 1], 0.5, 3); data_fingerprint('no-such-folder')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]
