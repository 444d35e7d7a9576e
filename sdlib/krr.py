r"""Self-distillation in kernel ridge regression, in closed form, as a scikit-learn estimator.

Step 1 is ridge regression on the labels; step t refits it on the mixed targets
:math:`z^{(t)} = \alpha y + (1-\alpha) f^{(t-1)}(X)`: with :math:`K = V D V^\top` and :math:`A = D(D+\lambda I)^{-1}`,
:math:`f^{(t)}(x) = k(x)^\top V D^{-1} B^{(t)} V^\top y`, :math:`B^{(1)} = A`, :math:`B^{(t)} = A((1-\alpha) B^{(t-1)}
+ \alpha I)`. A step solves :math:`(K + \lambda I) c = z` (fitted values :math:`K c = z - \lambda c`) in the basis of
one of two exact solvers: ``"eigh"`` (K's eigenvectors: a step costs O(nk), lam may change after fit) or ``"cholesky"``
(a factor of :math:`K + \lambda I`, ten times cheaper); neither divides by an eigenvalue, so a singular K is exact.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics.pairwise import KERNEL_PARAMS, check_pairwise_arrays, pairwise_kernels
from sklearn.utils import check_array
from sklearn.utils._param_validation import (Interval, InvalidParameterError, Options, StrOptions, make_constraint,
                                             validate_parameter_constraints)
from sklearn.utils.validation import check_is_fitted, validate_data

from .alpha import least_squares_alpha
from .data import _check_labels, symmetric_label_noise  # one generator for the kernel and the deep half

__all__ = ["SelfDistillation", "kernel_matrix", "refit_chain", "toy_data", "one_hot", "symmetric_label_noise",
           "KernelError", "StaleFitError", "LargeFitWarning"]

AUTO_EIGH_MAX_N = 300  # solver="auto": eigh up to here (milliseconds, the spectrum comes with it), cholesky above
LARGE_N_WARNING = 10_000  # fit warns above this many points, with its memory and time estimate
PSD_RTOL = 1e-8  # a user's Gram matrix must be symmetric and positive semi-definite to this relative tolerance
LAM_RTOL_PER_POINT = 10 * np.finfo(np.float64).eps  # lam >= n x this x max K: above the Gram matrix's round-off
_COST = {"eigh": (4, 40.0), "cholesky": (2, 2.0)}  # n x n matrices held, seconds at n = 5000 (krr_scaling.py)
_CONSTRAINTS = {  # scikit-learn's parameter validation; coef0 >= 0 keeps the polynomial kernel PSD
    "kernel": [StrOptions({"rbf", "laplacian", "polynomial", "linear", "precomputed"}), callable],
    "gamma": [Interval(Real, 0, None, closed="neither")], "lam": [Interval(Real, 0, None, closed="neither")],
    "degree": [Interval(Integral, 1, None, closed="left")], "coef0": [Interval(Real, 0, None, closed="left")],
    "step": [Interval(Integral, 1, None, closed="left"), Options(Real, {math.inf})],
    "steps": [Interval(Integral, 1, None, closed="left")], "alpha": [Real, "array-like", None],
    "solver": [StrOptions({"auto", "eigh", "cholesky"})]}


class KernelError(ValueError):
    """The kernel cannot be used: its Gram matrix overflowed, or is not symmetric positive semi-definite."""


class StaleFitError(ValueError):
    """A hyperparameter the fitted factors depend on was changed after fit: fit again."""


class LargeFitWarning(UserWarning):
    """A fit that will take much memory or time (n above LARGE_N_WARNING)."""


def _check(caller: str, **params) -> None:
    """scikit-learn's parameter validation (its message names each and what it must be); a bool is no number."""
    for name, value in params.items():
        if isinstance(value, (bool, np.bool_)):
            expected = " or ".join(str(make_constraint(c)) for c in _CONSTRAINTS[name])
            raise InvalidParameterError(f"The {name!r} parameter of {caller} must be {expected}, not a bool. Got "
                                        f"{value!r} instead.")
    validate_parameter_constraints(_CONSTRAINTS, params, caller_name=caller)


def _named(name: str, check, *args, **kwargs):
    """``check(*args, **kwargs)``; its error, scikit-learn's wording, led by the parameter's name where it lacks it."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as error:
        if re.match(rf"(Input )?{name}\b", str(error)):
            raise
        raise type(error)(f"{name}: {error}") from None


def _two_d(X):  # 1-D: n points of one feature (the toy problem); a DataFrame keeps its column names
    return X if hasattr(X, "columns") or np.asarray(X).ndim != 1 else np.reshape(np.asarray(X), (-1, 1))


def _targets(name: str, y, n: int, k: int | None = None) -> np.ndarray:
    """(n,) or (n, k) finite real targets as float64 (k outputs, if given, like the training targets)."""
    y = _named(name, check_array, y, dtype=np.float64, ensure_2d=False, allow_nd=True, ensure_min_features=0,
               input_name=name)
    if y.ndim not in (1, 2) or len(y) != n or y.ndim == 2 and y.shape[1] == 0:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, k) with k >= 1 to match X, got shape {y.shape}")
    if k and y.size != n * k:
        raise ValueError(f"{name} must have {k} output(s) like the training targets, got shape {y.shape}")
    return y


def _check_alpha(alpha, step, caller: str):
    """The float alpha of the limit step=math.inf, else the (step - 1,) alphas of steps 2..step."""
    if alpha is None and step != 1:
        raise ValueError(f"alpha is required for step {step} > 1: a number, or a list of step - 1 numbers")
    _check(caller, alpha=alpha)
    if step == math.inf:
        if not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a single number in [0, 1] for the limit step=math.inf, got {alpha!r}")
        return float(alpha)
    alphas = np.full(step - 1, np.nan if alpha is None else alpha, dtype=np.float64) if np.ndim(alpha) == 0 \
        else np.asarray(alpha, dtype=np.float64)
    if alphas.shape != (step - 1,):
        raise ValueError(f"alpha as a sequence holds one value per step 2..{step}, so it must have length "
                         f"{step - 1}, got shape {alphas.shape}")
    if not np.all(np.isfinite(alphas)):
        raise ValueError("alpha must contain only finite values (found NaN or inf)")
    return alphas


def kernel_matrix(A, B, kernel="rbf", gamma: float = 1.0, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(m, n) Gram matrix of the rows of ``A`` (m, d) and ``B`` (n, d) (1-D: one feature) by scikit-learn's
    ``pairwise_kernels``: "rbf" exp(-gamma ||a - b||^2), "laplacian" exp(-gamma ||a - b||_1), "polynomial"
    (gamma <a, b> + coef0)^degree, "linear" <a, b>; or a callable k(A, B). :class:`KernelError` on overflow."""
    if callable(kernel):
        A, B = check_pairwise_arrays(_two_d(A), _two_d(B))
        G = np.asarray(kernel(A, B), dtype=np.float64)
        if G.shape != (len(A), len(B)):
            raise ValueError(f"kernel callable must return shape {(len(A), len(B))}, got {G.shape}")
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # each kernel takes its parameters (filter_params)
            G = pairwise_kernels(_two_d(A), _two_d(B), metric=kernel, filter_params=True, gamma=gamma,
                                 degree=degree, coef0=coef0)
    if not np.all(np.isfinite(G)):
        raise KernelError(f"the {'callable' if callable(kernel) else kernel} kernel overflowed float64: its Gram "
                          f"matrix holds inf or NaN. Standardize the features or lower gamma (and degree)")
    return G


def _check_psd(K: np.ndarray, eigenvalues: np.ndarray) -> None:
    """KernelError unless a user's Gram matrix is symmetric and positive semi-definite (to PSD_RTOL, relative)."""
    asymmetry, scale = float(np.abs(K - K.T).max()), float(np.abs(K).max())
    smallest, largest = float(np.min(eigenvalues)), float(np.max(eigenvalues))
    if asymmetry > PSD_RTOL * scale:
        raise KernelError(f"the kernel's Gram matrix is not symmetric: max|K - K^T| = {asymmetry:.3g} against max|K| "
                          f"= {scale:.3g}; a kernel must satisfy k(a, b) = k(b, a)")
    if smallest < -PSD_RTOL * max(largest, 0.0):
        raise KernelError(f"the kernel's Gram matrix is not positive semi-definite: its most negative eigenvalue is "
                          f"{smallest:.6g} against a largest of {largest:.6g}; the closed form assumes a PSD kernel "
                          f"(tanh is not one)")


def _check_conditioning(lam: float, floor: float) -> None:  # one rule for both solvers (Cholesky would fail)
    if lam < floor:
        raise KernelError(f"lam = {lam:.3g} is below {floor:.3g}, the round-off level of this Gram matrix (n points x "
                          f"10 machine epsilons x its largest entry): K + lam I is numerically singular where K is "
                          f"(duplicate points) and round-off would be amplified by 1/lam; use lam >= {floor:.3g}")


def _factor(regularized: np.ndarray, what: str):
    """Lower Cholesky factor of ``regularized`` (overwritten), or a KernelError instead of LinAlgError."""
    try:
        return scipy.linalg.cho_factor(regularized, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise KernelError(f"{what} is not numerically positive definite (Cholesky failed): standardize the features "
                          f"or lower gamma") from None


class SelfDistillation(RegressorMixin, BaseEstimator):
    """Kernel ridge regression, self-distilled for any number of steps, in closed form (a scikit-learn regressor).

    kernel: as :func:`kernel_matrix` (a callable is checked symmetric PSD at fit), or "precomputed" (X: the Gram
    matrix at fit, then kernel values against the training points). lam > 0: every step's ridge penalty. step (int
    >= 1 or math.inf) and alpha (a number, or the alphas of steps 2..step): what predict and score use by default.
    solver: "eigh", "cholesky" or "auto" (eigh up to AUTO_EIGH_MAX_N points). A kernel parameter (or lam, with
    cholesky) changed after fit raises :class:`StaleFitError` at the next query; with eigh lam may change (exact).
    Fitted: ``solver_``; eigh: ``eigenvalues_`` (descending), ``eigenvectors_``, ``projected_targets_`` (V^T y).
    """

    _parameter_constraints = {name: value for name, value in _CONSTRAINTS.items() if name != "steps"}

    def __init__(self, kernel="rbf", gamma: float = 1.0, lam: float = 1.0, degree: int = 3, coef0: float = 1.0,
                 step=1, alpha=None, solver: str = "auto"):
        self.kernel, self.gamma, self.lam, self.degree, self.coef0 = kernel, gamma, lam, degree, coef0
        self.step, self.alpha, self.solver = step, alpha, solver

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.pairwise = self._precomputed()
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "solver_")  # not n_features_in_: a failed refit may have set it

    def _precomputed(self) -> bool:
        return isinstance(self.kernel, str) and self.kernel == "precomputed"

    def _gram(self, X: np.ndarray) -> np.ndarray:  # kernel values between validated points and the training points
        return X if self._precomputed() else kernel_matrix(X, self.X_fit_, self.kernel, self.gamma, self.degree,
                                                           self.coef0)

    def fit(self, X, y) -> "SelfDistillation":
        """Factor the Gram matrix of X (n,) or (n, d) once; y: (n,) or (n, k) targets (k outputs)."""
        _check(type(self).__name__, **self.get_params())
        _check_alpha(self.alpha, self.step, type(self).__name__)
        for name in ("solver_", "_fitted", "_lam_floor", "X_fit_", "_Z", "eigenvalues_", "eigenvectors_",
                     "projected_targets_", "_cholesky", "_memo"):
            self.__dict__.pop(name, None)  # nothing of an earlier fit survives, not even a failed refit
        X = _named("X", validate_data, self, _two_d(X), reset=True, dtype=np.float64)
        if self._precomputed() and X.shape[0] != X.shape[1]:
            raise ValueError(f"X must be the square (n, n) Gram matrix for kernel='precomputed', got shape {X.shape}")
        if y is None:
            raise ValueError(f"y: {type(self).__name__} requires y to be passed, but the target y is None")
        y, n = _targets("y", y, len(X)), len(X)
        solver = ("eigh" if n <= AUTO_EIGH_MAX_N else "cholesky") if self.solver == "auto" else self.solver
        if n > LARGE_N_WARNING:
            gigabytes, minutes = _COST[solver][0] * 8 * n * n / 1e9, _COST[solver][1] * (n / 5000) ** 3 / 60
            warnings.warn(f"SelfDistillation.fit with n = {n} training points (solver {solver!r}) needs about "
                          f"{gigabytes:.1f} GB of memory and of the order of {minutes:.0f} min on a 2-core CPU; "
                          f"subsample for a quick look", LargeFitWarning, stacklevel=2)
        K = np.array(X) if self._precomputed() else kernel_matrix(X, X, self.kernel, self.gamma, self.degree,
                                                                   self.coef0)
        user_kernel = callable(self.kernel) or self._precomputed()  # built-in kernels are PSD by construction
        if user_kernel and solver == "cholesky":  # the spectrum, values only; eigh below has it anyway
            _check_psd(K, scipy.linalg.eigvalsh(K, driver="evd", check_finite=False))
        lam_floor = n * LAM_RTOL_PER_POINT * max(float(np.max(np.diagonal(K))), 0.0)
        _check_conditioning(self.lam, lam_floor)
        Y = y if y.ndim == 2 else y[:, None]
        if solver == "eigh":
            d, V = scipy.linalg.eigh(0.5 * (K + K.T), driver="evd", overwrite_a=True, check_finite=False)
            if user_kernel:
                _check_psd(K, d)
            self.eigenvalues_ = np.clip(d[::-1], 0.0, None)  # descending; a PSD kernel's round-off negatives are 0
            self.eigenvectors_ = np.ascontiguousarray(V[:, ::-1])
            self._Z = self.eigenvectors_.T @ Y  # the targets in the solver's basis
            self.projected_targets_ = self._Z if y.ndim == 2 else self._Z[:, 0]
        else:
            K[np.diag_indices_from(K)] += self.lam
            self._cholesky, self._Z = _factor(K, "K + lam I"), np.array(Y)  # a copy: later edits of y change nothing
        self.X_fit_, self.solver_, self._lam_floor, self._memo = np.array(X), solver, lam_floor, {}
        names = ("kernel", *sorted(KERNEL_PARAMS.get(self.kernel, ()) if isinstance(self.kernel, str) else ()))
        self._fitted = {name: getattr(self, name) for name in names + (("lam",) if solver == "cholesky" else ())}
        self._y_1d = y.ndim == 1  # _fitted: what the factors depend on (lam: the Cholesky factor only)
        return self

    def _check_fresh(self) -> None:  # fitted, and with the hyperparameters of now
        check_is_fitted(self)
        if self.solver_ == "eigh":  # lam may have changed: exact with the new value, under the same rule
            _check(type(self).__name__, lam=self.lam)
            _check_conditioning(self.lam, self._lam_floor)
        for name, fitted in self._fitted.items():
            now = getattr(self, name)
            if not (now is fitted or not callable(now) and not isinstance(now, bool) and bool(now == fitted)):
                raise StaleFitError(f"{name} was changed after fit (fitted with {fitted!r}, now {now!r}): the fitted "
                                    f"factors belong to the old value; call fit(X, y) again")

    def _query(self, name: str, X) -> np.ndarray:
        """Kernel values of the validated query X against the training points, the last query's memoized under the
        points' bytes: a grid of (step, alpha) queries at the same points took twice as long without."""
        self._check_fresh()
        X = _named(name, validate_data, self, _two_d(X) if self.n_features_in_ == 1 else X, reset=False,
                   dtype=np.float64)
        if self._precomputed():
            return X
        key, last = (X.shape, hashlib.blake2b(X.tobytes()).digest()), self._memo.get("last")
        if last is None or last[0] != key:
            last = self._memo["last"] = (key, self._gram(X))  # one tuple: safe for threads sharing the model
        return last[1]

    def _step_alpha(self, step, alpha):  # a query's step and alpha (None: the constructor's), validated
        step = self.step if step is None else step
        _check(type(self).__name__, step=step)
        return step, _check_alpha(self.alpha if alpha is None else alpha, step, type(self).__name__)

    def _output(self, values: np.ndarray) -> np.ndarray:
        return values[..., 0] if self._y_1d else values

    def _solve(self, Z: np.ndarray, lam: float | None = None) -> np.ndarray:
        """(K + lam I)^-1 Z in the solver's basis (eigh: the eigenbasis); cholesky factors anew for another lam."""
        lam = self.lam if lam is None else lam
        if self.solver_ == "eigh":
            return Z / (self.eigenvalues_ + lam)[:, None]
        if lam == self.lam:
            return scipy.linalg.cho_solve(self._cholesky, Z, check_finite=False)
        K = np.array(self._gram(self.X_fit_))
        K[np.diag_indices_from(K)] += lam
        return scipy.linalg.cho_solve(_factor(K, "K + (lam / alpha) I"), Z, check_finite=False)

    def _dual(self, coef: np.ndarray) -> np.ndarray:  # dual coefficients c, f(x) = k(x, X_fit) c, of the basis's
        return self.eigenvectors_ @ coef if self.solver_ == "eigh" else coef

    def _chain(self, steps: int, weights, copies: int = 1):
        """Yield the coefficients (solver's basis) of steps 1..steps, solving on mixed targets: weights[t - 2] is
        the alpha of step t, per column of the targets tiled ``copies`` times (one chain per copy)."""
        Y = np.tile(self._Z, copies)
        targets = Y
        for t in range(steps):
            if t:
                targets = weights[t - 1] * Y + (1.0 - weights[t - 1]) * (targets - self.lam * coef)
            coef = self._solve(targets)
            yield coef

    def _outputs(self, K_new: np.ndarray, coefs) -> np.ndarray:
        """(s, m, c) outputs at K_new's points of s coefficient blocks (n, c), all in one product (reads V once)."""
        coefs = list(coefs)
        out = K_new @ self._dual(np.concatenate(coefs, axis=1))
        return out.reshape(len(K_new), len(coefs), -1).transpose(1, 0, 2)

    def _coef(self, step, alpha) -> np.ndarray:  # (n, k) dual coefficients of a validated step and alpha
        if step != math.inf:
            *_, coef = self._chain(step, alpha[:, None])
            return self._dual(coef)
        # the limit: ridge regression with lam / alpha (zero for alpha = 0)
        return np.zeros_like(self._Z) if alpha == 0.0 else self._dual(self._solve(self._Z, self.lam / alpha))

    def damping(self, step, alpha=None) -> np.ndarray:
        """(n,) diagonal of B(step) over the eigenvalues d, descending (cholesky: eigvalsh on every call)."""
        self._check_fresh()
        _check(type(self).__name__, step=step)
        alpha = _check_alpha(alpha, step, type(self).__name__)
        d = self.eigenvalues_ if self.solver_ == "eigh" else np.clip(scipy.linalg.eigvalsh(
            self._gram(self.X_fit_), driver="evd", check_finite=False)[::-1], 0.0, None)
        if step == math.inf:
            return alpha * d / (alpha * d + self.lam)
        a = b = d / (d + self.lam)
        for alpha_t in alpha:
            b = a * ((1.0 - alpha_t) * b + alpha_t)
        return b

    def predict(self, X, step=None, alpha=None) -> np.ndarray:
        """(m[, k]) predictions at X of ``step`` (math.inf: the limit, ridge regression with lam / alpha) with ``alpha``
        (a number, or the step - 1 alphas of steps 2..step); None: the constructor's step and alpha."""
        return self._output(self._query("X", X) @ self._coef(*self._step_alpha(step, alpha)))

    def predict_classes(self, X, step=None, alpha=None) -> np.ndarray:
        """(m,) class indices: the argmax over the k outputs of :meth:`predict` (a model fitted on one-hot targets)."""
        check_is_fitted(self)
        if self._y_1d:
            raise ValueError("predict_classes needs a model fitted on (n, k) one-hot targets (one_hot(labels)); "
                             "this one was fitted on a 1-D y")
        return np.argmax(self.predict(X, step=step, alpha=alpha), axis=1)

    def predict_steps(self, X, steps: int, alpha=None) -> np.ndarray:
        """(steps, m[, k]) predictions at X after each step 1..steps, as ``refit_chain`` returns (alpha: as predict)."""
        K_new = self._query("X", X)
        _check(type(self).__name__, steps=steps)
        alphas = _check_alpha(self.alpha if alpha is None else alpha, steps, type(self).__name__)
        return self._output(self._outputs(K_new, self._chain(steps, alphas[:, None])))

    def predict_chains(self, X, steps: int, alphas) -> np.ndarray:
        """(len(alphas), steps, m[, k]) predictions at X after each step, a chain per alpha, all in one solve a step."""
        K_new = self._query("X", X)
        _check(type(self).__name__, steps=steps)
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)):
            raise ValueError(f"alphas must be a non-empty 1-D sequence of finite numbers, got shape {alphas.shape}")
        k = self._Z.shape[1]
        weights = np.broadcast_to(np.repeat(alphas, k), (steps, alphas.size * k))  # columns grouped by alpha
        out = self._outputs(K_new, self._chain(steps, weights, copies=alphas.size))
        return self._output(out.reshape(steps, len(K_new), alphas.size, k).transpose(2, 0, 1, 3))

    def optimal_alphas(self, X_val, y_val, steps: int, bounds: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
        """(steps - 1,) alpha*(2..steps) of the paper's Algorithm 1: f(t) = alpha f(1) + (1 - alpha) g(t), g(t) the
        alpha = 0 step from f(t - 1), fitted to (X_val, y_val) by least squares (clipped to ``bounds``) step by step."""
        K_val = self._query("X_val", X_val)
        Y_val = _targets("y_val", y_val, len(K_val), k=self._Z.shape[1]).reshape(len(K_val), -1)
        _check(type(self).__name__, steps=steps)
        coef1 = next(self._chain(1, None))
        f1, fitted1 = K_val @ self._dual(coef1), self._Z - self.lam * coef1
        fitted, alphas = fitted1, np.empty(steps - 1)
        for i in range(steps - 1):
            coef_g = self._solve(fitted)  # the alpha = 0 step from the current fit
            alphas[i] = least_squares_alpha(Y_val, f1, K_val @ self._dual(coef_g), bounds=bounds)
            # f(t) = alpha f(1) + (1 - alpha) g on the training points too: (K + lam I)^-1 is linear
            fitted = alphas[i] * fitted1 + (1.0 - alphas[i]) * (fitted - self.lam * coef_g)
        return alphas


def refit_chain(X, y, X_new, steps: int, alpha, *, lam: float, kernel="rbf", gamma: float = 1.0, degree: int = 3,
                coef0: float = 1.0) -> np.ndarray:
    """(steps, m[, k]) predictions at X_new after each step 1..steps by literally refitting on the mixed targets: the
    definition of self-distillation, the reference the closed form is tested and benchmarked against."""
    _check("refit_chain", lam=lam, kernel=kernel, gamma=gamma, degree=degree, coef0=coef0, steps=steps)
    K = kernel_matrix(X, X, kernel, gamma=gamma, degree=degree, coef0=coef0)
    K_new = kernel_matrix(X_new, X, kernel, gamma=gamma, degree=degree, coef0=coef0)
    y, alphas = _targets("y", y, len(K)), _check_alpha(alpha, steps, "refit_chain")
    predictions, targets = np.empty((steps, len(K_new), *y.shape[1:])), y
    for t in range(steps):
        coef = np.linalg.solve(K + lam * np.eye(len(K)), targets)
        predictions[t] = K_new @ coef
        if t < steps - 1:
            targets = alphas[t] * y + (1.0 - alphas[t]) * (K @ coef)
    return predictions


def one_hot(labels, n_classes: int) -> np.ndarray:
    """(n, n_classes) float64 one-hot targets of integer ``labels`` (n,) in 0..n_classes - 1."""
    labels, n_classes = _check_labels(labels, n_classes)
    return np.eye(n_classes)[labels]


def toy_data() -> tuple[np.ndarray, np.ndarray]:
    """The authors' toy problem (rbf, gamma = 80, lambda = 0.2): X = 0, 0.1, ..., 1, y = sin(2 pi x) + noise."""
    y = np.array([0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.6920159488889518,
                  -0.29756145531871736, -0.24189291901377769, -0.7964485769175675, -0.9616480167034174,
                  -0.49672509509916934, -0.3469066003991437, 0.5589512650600734])
    return np.linspace(0.0, 1.0, 11), y
