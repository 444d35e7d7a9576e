"""SelfDistillation as a scikit-learn estimator: conventions, KernelRidge, both exact solvers, multi-output targets,
classes and label noise, and the named errors of issue 15 (indefinite kernels, stale fits, overflow, large n)."""

import math
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.kernel_ridge import KernelRidge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import sdlib.krr as krr
from sdlib.krr import (KernelError, LargeFitWarning, SelfDistillation, StaleFitError, one_hot, refit_chain,
                       symmetric_label_noise)

# check_fit1d expects fit to reject a 1-D X; SelfDistillation reads a 1-D X as one feature, as the theory
# chapters' toy problem (x in [0, 1], sklearn-free since the first release) relies on.
EXPECTED_FAILED_CHECKS = {
    "check_fit1d": "a 1-D X is one feature by design (the paper's toy problem is 1-D); 2-D X follows the convention",
}


@parametrize_with_checks([SelfDistillation()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_scikit_learn_check_estimator(estimator, check):
    check(estimator)


SKLEARN_KERNELS = {
    "rbf": dict(kernel="rbf", gamma=0.7),
    "laplacian": dict(kernel="laplacian", gamma=0.4),
    "polynomial": dict(kernel="polynomial", gamma=0.5, degree=3, coef0=1.0),
    "linear": dict(kernel="linear"),
}


def problem(n=40, d=3, k=None, seed=0, duplicates=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if duplicates:
        X[1] = X[0]
        X[7] = X[3]
    y = np.sin(X[:, :1] + X[:, 1:2]) + 0.3 * rng.normal(size=(n, 1 if k is None else k))
    X_new = rng.normal(size=(15, d))
    return X, (y[:, 0] if k is None else y), X_new


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
@pytest.mark.parametrize("name", sorted(SKLEARN_KERNELS))
@pytest.mark.parametrize("k", [None, 3])
def test_step_one_and_limit_equal_kernel_ridge(name, solver, k):
    X, y, X_new = problem(k=k)
    params = SKLEARN_KERNELS[name]
    lam = 0.3
    sd = SelfDistillation(lam=lam, solver=solver, **params).fit(X, y)
    ridge = KernelRidge(alpha=lam, **params).fit(X, y).predict(X_new)
    np.testing.assert_allclose(sd.predict(X_new), ridge, atol=1e-10 * max(1, np.abs(ridge).max()), rtol=0)
    for alpha in (0.25, 0.6, 1.0):
        limit = KernelRidge(alpha=lam / alpha, **params).fit(X, y).predict(X_new)
        np.testing.assert_allclose(sd.predict(X_new, step=math.inf, alpha=alpha), limit,
                                   atol=1e-10 * max(1, np.abs(limit).max()), rtol=0)


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("k", [None, 4])
def test_both_solvers_agree_on_every_public_method(duplicates, k):
    X, y, X_new = problem(n=30, k=k, seed=1, duplicates=duplicates)
    X_val, y_val, _ = problem(n=20, k=k, seed=2)
    e = SelfDistillation(kernel="rbf", gamma=0.5, lam=0.05, solver="eigh").fit(X, y)
    c = SelfDistillation(kernel="rbf", gamma=0.5, lam=0.05, solver="cholesky").fit(X, y)
    assert (e.solver_, c.solver_) == ("eigh", "cholesky")
    scale = np.abs(e.predict(X_new)).max()
    close = dict(atol=1e-9 * scale, rtol=0)
    for step, alpha in [(1, None), (4, 0.3), (6, 0.0), (3, [0.9, 0.2]), (math.inf, 0.4), (math.inf, 0.0)]:
        np.testing.assert_allclose(c.predict(X_new, step=step, alpha=alpha), e.predict(X_new, step=step, alpha=alpha),
                                   **close)
    np.testing.assert_allclose(c.predict_steps(X_new, 7, 0.35), e.predict_steps(X_new, 7, 0.35), **close)
    alphas = np.linspace(0, 1, 5)
    chains = c.predict_chains(X_new, 6, alphas)
    np.testing.assert_allclose(chains, e.predict_chains(X_new, 6, alphas), **close)
    for i, alpha in enumerate(alphas):  # a chain per alpha = predict_steps of that alpha
        np.testing.assert_allclose(chains[i], e.predict_steps(X_new, 6, alpha), **close)
    np.testing.assert_allclose(c.damping(5, 0.2), e.damping(5, 0.2), atol=1e-10)
    for bounds in [(0.0, 1.0), None]:
        np.testing.assert_allclose(c.optimal_alphas(X_val, y_val, 5, bounds=bounds),
                                   e.optimal_alphas(X_val, y_val, 5, bounds=bounds), atol=1e-8)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_multi_output_equals_single_output_fits(solver):
    X, Y, X_new = problem(k=3, seed=3)
    X_val, Y_val, _ = problem(n=25, k=3, seed=4)
    multi = SelfDistillation(kernel="laplacian", gamma=0.5, lam=0.1, solver=solver).fit(X, Y)
    assert multi.predict(X_new, step=3, alpha=0.4).shape == (len(X_new), 3)
    assert multi.predict_steps(X_new, 4, 0.4).shape == (4, len(X_new), 3)
    assert multi.predict_chains(X_new, 4, [0.1, 0.5]).shape == (2, 4, len(X_new), 3)
    for j in range(3):
        single = SelfDistillation(kernel="laplacian", gamma=0.5, lam=0.1, solver=solver).fit(X, Y[:, j])
        for step, alpha in [(1, None), (5, 0.4), (3, [0.1, 0.8]), (math.inf, 0.5)]:
            np.testing.assert_allclose(multi.predict(X_new, step=step, alpha=alpha)[:, j],
                                       single.predict(X_new, step=step, alpha=alpha), atol=1e-12, rtol=0)
        np.testing.assert_allclose(multi.predict_steps(X_new, 4, 0.4)[..., j], single.predict_steps(X_new, 4, 0.4),
                                   atol=1e-12, rtol=0)
        np.testing.assert_allclose(multi.predict_chains(X_new, 3, [0.2, 0.9])[..., j],
                                   single.predict_chains(X_new, 3, [0.2, 0.9]), atol=1e-12, rtol=0)
        # ... and the reference, refitting column by column.
        np.testing.assert_allclose(refit_chain(X, Y, X_new, 4, 0.4, lam=0.1, kernel="laplacian", gamma=0.5)[..., j],
                                   refit_chain(X, Y[:, j], X_new, 4, 0.4, lam=0.1, kernel="laplacian", gamma=0.5),
                                   atol=1e-12, rtol=0)
    np.testing.assert_allclose(multi.predict_steps(X_new, 5, 0.3),
                               refit_chain(X, Y, X_new, 5, 0.3, lam=0.1, kernel="laplacian", gamma=0.5),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_multi_output_optimal_alphas_match_brute_force(solver):
    """alpha-hat of one-hot targets: least squares over all outputs, against a grid over the summed loss."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(60, 2))
    labels = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
    noisy = symmetric_label_noise(labels, 0.3, 3, seed=1)
    X_val = rng.normal(size=(40, 2))
    Y_val = one_hot((X_val[:, 0] > 0).astype(int) + (X_val[:, 1] > 0.5), 3)
    sd = SelfDistillation(kernel="rbf", gamma=2.0, lam=0.02, solver=solver).fit(X, one_hot(noisy, 3))
    steps = 4
    optimal = sd.optimal_alphas(X_val, Y_val, steps)
    grid = np.linspace(0, 1, 2001)
    chosen = []
    for step in range(2, steps + 1):
        losses = [np.sum((sd.predict(X_val, step=step, alpha=chosen + [a]) - Y_val) ** 2) for a in grid]
        assert abs(optimal[step - 2] - grid[int(np.argmin(losses))]) <= 1e-3
        best = np.sum((sd.predict(X_val, step=step, alpha=chosen + [optimal[step - 2]]) - Y_val) ** 2)
        assert best <= min(losses) + 1e-12
        chosen.append(optimal[step - 2])
    # The per-output alphas differ from the joint one: it is one least-squares fit over all outputs.
    per_output = [SelfDistillation(kernel="rbf", gamma=2.0, lam=0.02, solver=solver)
                  .fit(X, one_hot(noisy, 3)[:, j]).optimal_alphas(X_val, Y_val[:, j], 2, bounds=None)[0]
                  for j in range(3)]
    assert np.ptp(per_output) > 1e-3


def test_clone_grid_search_and_score():
    X, y, X_new = problem(n=60, seed=5)
    sd = SelfDistillation(kernel="rbf", gamma=0.5, lam=0.1, step=3, alpha=0.5)
    assert clone(sd).get_params() == sd.get_params()
    fitted = clone(sd).fit(X, y)
    # step and alpha of the constructor are what predict and score use.
    np.testing.assert_array_equal(fitted.predict(X_new), fitted.predict(X_new, step=3, alpha=0.5))
    assert fitted.score(X, y) == pytest.approx(r2_score(y, fitted.predict(X, step=3, alpha=0.5)))
    fitted.set_params(step=5, alpha=0.2)  # step and alpha do not touch the factors: no refit needed
    np.testing.assert_array_equal(fitted.predict(X_new), fitted.predict(X_new, step=5, alpha=0.2))
    search = GridSearchCV(SelfDistillation(kernel="rbf"), {
        "lam": [0.01, 0.3], "gamma": [0.1, 1.0], "step": [1, 3], "alpha": [0.25, 1.0]}, cv=3).fit(X, y)
    assert set(search.best_params_) == {"lam", "gamma", "step", "alpha"}
    best = SelfDistillation(kernel="rbf", **search.best_params_).fit(X, y)
    np.testing.assert_allclose(search.predict(X_new), best.predict(X_new), atol=1e-12)


def test_solver_auto_picks_eigh_up_to_the_threshold(monkeypatch):
    monkeypatch.setattr(krr, "AUTO_EIGH_MAX_N", 40)  # 1000 by default; the rule, not the size, is tested
    rng = np.random.default_rng(0)
    small = rng.normal(size=(krr.AUTO_EIGH_MAX_N, 2))
    large = rng.normal(size=(krr.AUTO_EIGH_MAX_N + 1, 2))
    assert SelfDistillation(kernel="linear").fit(small, small[:, 0]).solver_ == "eigh"
    fitted = SelfDistillation(kernel="linear").fit(large, large[:, 0])
    assert fitted.solver_ == "cholesky" and not hasattr(fitted, "eigenvalues_")


def test_predict_classes_is_the_argmax():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 2))
    labels = (X[:, 0] > 0).astype(int) * 2 + (X[:, 1] > 0)
    sd = SelfDistillation(kernel="rbf", gamma=1.0, lam=0.05).fit(X, one_hot(labels, 4))
    np.testing.assert_array_equal(sd.predict_classes(X, step=3, alpha=0.5),
                                  np.argmax(sd.predict(X, step=3, alpha=0.5), axis=1))
    assert np.mean(sd.predict_classes(X) == labels) > 0.9
    with pytest.raises(ValueError, match="one-hot"):
        SelfDistillation().fit(X, labels.astype(float)).predict_classes(X)


# ------------------------------------------------------------------------------------------ label noise
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.95])
def test_symmetric_label_noise_has_the_exact_rate_and_is_seeded(rate):
    labels = np.repeat(np.arange(10), 101)  # n = 1010
    noisy = symmetric_label_noise(labels, rate, 10, seed=3)
    assert np.sum(noisy != labels) == round(rate * labels.size)
    np.testing.assert_array_equal(noisy, symmetric_label_noise(labels, rate, 10, seed=3))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 101))  # input untouched
    assert noisy.min() >= 0 and noisy.max() <= 9
    if rate > 0:
        assert not np.array_equal(noisy, symmetric_label_noise(labels, rate, 10, seed=4))


def test_symmetric_label_noise_is_uniform_over_the_other_classes():
    labels = np.zeros(60_000, dtype=int)
    noisy = symmetric_label_noise(labels, 0.5, 4, seed=0)
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 30_000
    # 30,000 flips over 3 other classes: 10,000 each, binomial sd ~ 82.
    assert np.all(np.abs(counts[1:] - 10_000) < 500)


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), 1.5, True, "0.2"])
def test_label_noise_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"rate must be a finite number >= 0 and < 1"):
        symmetric_label_noise(np.arange(10) % 3, rate, 3)


@pytest.mark.parametrize("labels, n_classes, message", [
    (np.array([0, 1, 3]), 3, "labels must lie in 0..2"),
    (np.array([0.0, 1.0]), 3, "labels must hold integers"),
    (np.zeros((2, 2), dtype=int), 3, "labels must be a non-empty 1-D"),
    (np.array([0, 1]), 1, "n_classes must be an integer >= 2"),
])
def test_bad_labels(labels, n_classes, message):
    with pytest.raises(ValueError, match=message):
        symmetric_label_noise(labels, 0.1, n_classes)
    with pytest.raises(ValueError, match=message):
        one_hot(labels, n_classes)


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("Y, message", [
    (np.where(np.eye(11, 3) > 0, np.nan, 0.0), "^Input y contains NaN"),
    (np.zeros((10, 3)), r"^y must have shape \(11,\) or \(11, k\)"),
    (np.zeros((11, 3, 2)), r"^y must have shape"),
    (None, "^y: SelfDistillation requires y to be passed, but the target y is None"),
])
def test_bad_multi_output_targets(Y, message):
    with pytest.raises(ValueError, match=message):
        SelfDistillation(lam=0.1).fit(np.linspace(0, 1, 11), Y)


def test_bad_parameters_are_named_in_fit_not_init():
    X, y, _ = problem()
    for params, name in [(dict(solver="lu"), "solver"), (dict(step=3), "alpha is required"),
                         (dict(step=3, alpha=[0.5]), "length 2"), (dict(lam=-1), "lam")]:
        sd = SelfDistillation(**params)  # the constructor only stores (scikit-learn's convention)
        with pytest.raises(ValueError, match=name):
            sd.fit(X, y)
    sd = SelfDistillation(lam=0.1).fit(X, np.eye(40, 3))
    with pytest.raises(ValueError, match="^y_val must have 3 output"):
        sd.optimal_alphas(X[:5], np.zeros((5, 2)), 3)
    with pytest.raises(ValueError, match="^alphas must be"):
        sd.predict_chains(X[:5], 3, [0.1, np.nan])


# ------------------------------------------------------------------------------------------ issue 15, KRR items
def tanh_kernel(A, B):
    return np.tanh(A @ B.T - 1.0)  # the sigmoid "kernel": not positive semi-definite


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_indefinite_callable_kernel_raises_naming_the_most_negative_eigenvalue(solver):
    X, y, _ = problem(n=30, seed=6)
    K = tanh_kernel(X, X)
    most_negative = np.linalg.eigvalsh(K).min()
    assert most_negative < -0.1 * np.linalg.eigvalsh(K).max()  # the failure: clipped silently before
    with pytest.raises(KernelError, match="not positive semi-definite") as error:
        SelfDistillation(kernel=tanh_kernel, lam=0.1, solver=solver).fit(X, y)
    assert f"{most_negative:.6g}" in str(error.value)
    with pytest.raises(KernelError, match="not symmetric"):
        SelfDistillation(kernel=lambda A, B: A @ B.T + A[:, :1] @ np.ones((1, len(B))), lam=0.1,
                         solver=solver).fit(X, y)
    # A positive semi-definite callable (round-off negatives only) fits, and equals the built-in kernel.
    rbf = SelfDistillation(kernel=lambda A, B: np.exp(-0.5 * ((A[:, None] - B[None]) ** 2).sum(-1)), lam=0.1,
                           solver=solver).fit(X, y)
    np.testing.assert_allclose(rbf.predict(X, step=3, alpha=0.5),
                               SelfDistillation(gamma=0.5, lam=0.1).fit(X, y).predict(X, step=3, alpha=0.5),
                               atol=1e-9)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_changed_hyperparameter_after_fit_never_uses_stale_factors(solver):
    X, y, X_new = problem(seed=7)
    sd = SelfDistillation(kernel="rbf", gamma=0.5, lam=0.2, solver=solver).fit(X, y)
    before = sd.predict(X_new, step=3, alpha=0.5)
    sd.gamma = 2.0  # the failure: predictions of the old gamma, without a word
    with pytest.raises(StaleFitError, match=r"gamma was changed after fit \(fitted with 0.5, now 2.0\)"):
        sd.predict(X_new, step=3, alpha=0.5)
    for method in (lambda: sd.predict_steps(X_new, 3, 0.5), lambda: sd.damping(3, 0.5),
                   lambda: sd.optimal_alphas(X_new, X_new[:, 0], 3), lambda: sd.score(X, y)):
        with pytest.raises(StaleFitError):
            method()
    refit = sd.fit(X, y).predict(X_new, step=3, alpha=0.5)
    np.testing.assert_allclose(refit, SelfDistillation(gamma=2.0, lam=0.2).fit(X, y).predict(X_new, step=3, alpha=0.5),
                               atol=1e-10)
    assert np.abs(refit - before).max() > 1e-3
    sd.lam = -1  # the failure: not rejected
    with pytest.raises(StaleFitError if solver == "cholesky" else ValueError, match="lam"):
        sd.predict(X_new)
    with pytest.raises(ValueError, match=r"The 'lam' parameter of SelfDistillation must be a float in the range \(0"):
        sd.fit(X, y)
    sd.set_params(lam=0.2, kernel="laplacian")
    with pytest.raises(StaleFitError, match="kernel was changed"):
        sd.predict(X_new)


def test_eigh_lambda_sweep_after_fit_is_exact_and_cholesky_refuses_it():
    """With eigh, lam is not part of the factors: a new lam after fit answers exactly like a refit."""
    X, y, X_new = problem(k=2, seed=12)
    X_val, y_val, _ = problem(n=20, k=2, seed=13)
    sd = SelfDistillation(gamma=0.5, lam=0.2, solver="eigh").fit(X, y)
    for lam in (0.01, 3.0):
        sd.set_params(lam=lam)
        fresh = SelfDistillation(gamma=0.5, lam=lam, solver="cholesky").fit(X, y)
        np.testing.assert_allclose(sd.predict(X_new, step=4, alpha=0.3), fresh.predict(X_new, step=4, alpha=0.3),
                                   atol=1e-9)
        np.testing.assert_allclose(sd.predict(X_new, step=math.inf, alpha=0.3),
                                   fresh.predict(X_new, step=math.inf, alpha=0.3), atol=1e-9)
        np.testing.assert_allclose(sd.optimal_alphas(X_val, y_val, 4), fresh.optimal_alphas(X_val, y_val, 4), atol=1e-8)
    chol = SelfDistillation(gamma=0.5, lam=0.2, solver="cholesky").fit(X, y)
    chol.set_params(lam=0.3)
    with pytest.raises(StaleFitError, match=r"lam was changed after fit \(fitted with 0.2, now 0.3\)"):
        chol.predict(X_new)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
def test_precomputed_kernel_equals_the_builtin_one(solver):
    X, y, X_new = problem(k=3, seed=14)
    X_val, y_val, _ = problem(n=20, k=3, seed=15)
    params = dict(kernel="polynomial", gamma=0.3, degree=2, coef0=1.0)
    builtin = SelfDistillation(lam=0.1, solver=solver, **params).fit(X, y)
    gram = lambda A, B: krr.kernel_matrix(A, B, **params)  # noqa: E731
    pre = SelfDistillation(kernel="precomputed", lam=0.1, solver=solver).fit(gram(X, X), y)
    K_new = gram(X_new, X)
    for step, alpha in [(1, None), (4, 0.3), (math.inf, 0.5)]:
        np.testing.assert_allclose(pre.predict(K_new, step=step, alpha=alpha),
                                   builtin.predict(X_new, step=step, alpha=alpha), atol=1e-10)
    np.testing.assert_allclose(pre.predict_chains(K_new, 4, [0.0, 0.6]), builtin.predict_chains(X_new, 4, [0.0, 0.6]),
                               atol=1e-10)
    np.testing.assert_allclose(pre.optimal_alphas(gram(X_val, X), y_val, 4), builtin.optimal_alphas(X_val, y_val, 4),
                               atol=1e-9)
    np.testing.assert_allclose(pre.damping(3, 0.5), builtin.damping(3, 0.5), atol=1e-10)
    with pytest.raises(ValueError, match=r"X must be the square \(n, n\) Gram matrix"):
        SelfDistillation(kernel="precomputed").fit(X, y)
    with pytest.raises(ValueError, match=r"^X has 3 features, but SelfDistillation is expecting 40 features"):
        pre.predict(X_new)
    with pytest.raises(KernelError, match="not positive semi-definite"):
        SelfDistillation(kernel="precomputed", solver=solver).fit(tanh_kernel(X, X), y)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
@pytest.mark.parametrize("kernel, scale", [("polynomial", 1e120), ("linear", 1e160), ("rbf", 1e160)])
def test_overflow_in_a_builtin_kernel_is_a_named_error(kernel, scale, solver):
    X, y, _ = problem(n=20, seed=8)
    with pytest.raises(KernelError, match=f"the {kernel} kernel overflowed float64"):
        SelfDistillation(kernel=kernel, lam=0.1, solver=solver).fit(X * scale, y)


def test_a_failed_refit_leaves_no_fitted_model_behind():
    X, y, X_new = problem(n=20, seed=10)
    sd = SelfDistillation(kernel="polynomial", gamma=0.5, lam=0.1).fit(X, y)
    with pytest.raises(KernelError):
        sd.fit(X * 1e120, y)
    with pytest.raises(ValueError, match="not fitted"):
        sd.predict(X_new)


def test_large_fit_warns_with_memory_and_time(monkeypatch):
    X, y, _ = problem(n=60, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SelfDistillation().fit(X, y)  # below the threshold: silent
    monkeypatch.setattr(krr, "LARGE_N_WARNING", 50)
    with pytest.warns(LargeFitWarning, match=r"n = 60 training points \(solver 'eigh'\) needs about [\d.]+ GB .* min"):
        SelfDistillation().fit(X, y)
