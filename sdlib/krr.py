r"""Self-distillation in kernel ridge regression, in closed form, as a scikit-learn estimator.

Step 1 is ridge regression on the labels. Step t refits ridge regression on the mixed targets

.. math:: z^{(t)} = \alpha y + (1-\alpha) f^{(t-1)}(X).

Every step is linear in ``y``. With the Gram matrix :math:`K = V D V^\top` and :math:`A = D(D+\lambda I)^{-1}`
the t-th fit is :math:`f^{(t)}(x) = k(x)^\top V D^{-1} B^{(t)} V^\top y` with the diagonal recursion

.. math:: B^{(1)} = A, \qquad B^{(t)} = A\big((1-\alpha) B^{(t-1)} + \alpha I\big).

Two exact solvers (``SelfDistillation(solver=...)``):

``"eigh"``
    One eigendecomposition of K (LAPACK's divide-and-conquer driver, ``evd``) at :meth:`SelfDistillation.fit`;
    then every (step, alpha) query costs O(n k) in the eigenbasis, the limit ``step=math.inf`` is closed form,
    and :meth:`~SelfDistillation.damping` reads the spectrum. About ten times the cost of a Cholesky factor.
``"cholesky"``
    One Cholesky factor of :math:`K + \lambda I`; step t is one (multi-right-hand-side) triangular solve
    :math:`(K+\lambda I) c^{(t)} = z^{(t)}`, and the fitted values come without a product with K from
    :math:`K c = z - \lambda c`. :meth:`~SelfDistillation.predict_chains` solves for all alphas of a grid at
    once, one multi-right-hand-side solve per step. The spectrum (``damping``) is computed on first use with
    ``eigvalsh`` (values only); the limit ``step=math.inf`` factors :math:`K + (\lambda/\alpha) I` once more.
``"auto"`` (default)
    ``"eigh"`` for n <= :data:`AUTO_EIGH_MAX_N` (300: milliseconds either way, and the spectrum comes with it,
    which the theory chapters read as ``eigenvalues_``), ``"cholesky"`` above (the factor is about ten times
    cheaper, and a fixed grid of queries is the common use). ``solver_`` says what was used; ask for
    ``"eigh"`` explicitly for lambda sweeps (``set_params(lam=...)`` after fit) and many limit queries.

Both are exact for any positive semi-definite Gram matrix, singular ones included: the eigh path computes
:math:`D^{-1}B^{(t)} = (D+\lambda I)^{-1}((1-\alpha)B^{(t-1)} + \alpha I)`, which never divides by an
eigenvalue, and the Cholesky path only factors :math:`K + \lambda I` with :math:`\lambda > 0`. Both apply one
conditioning rule: :math:`\lambda` at least the Gram matrix's round-off level, n times 10 machine epsilons times
its largest entry (:data:`LAM_RTOL_PER_POINT`), else :class:`KernelError`.

Targets may have several outputs: ``y`` of shape (n, k), e.g. one-hot classes (:func:`one_hot`), predicted as
(m, k); :meth:`~SelfDistillation.predict_classes` takes the argmax. Algorithm 1's alpha
(:meth:`~SelfDistillation.optimal_alphas`) is then one least-squares fit over all outputs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Sequence, Union

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.spatial.distance import cdist
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils.validation import _check_feature_names  # what validate_data does with a DataFrame's names

from .alpha import least_squares_alpha
from .data import _check_labels, symmetric_label_noise  # one generator for the kernel and the deep half

__all__ = [
    "SelfDistillation", "kernel_matrix", "refit_chain", "toy_data", "one_hot", "symmetric_label_noise",
    "KERNELS", "SOLVERS", "KernelError", "StaleFitError", "LargeFitWarning",
]

KERNELS = ("rbf", "laplacian", "polynomial", "linear")
SOLVERS = ("auto", "eigh", "cholesky")
# solver="auto" uses the eigendecomposition up to this many training points (a few milliseconds either way, and
# the spectrum comes with it), the Cholesky factor above (ten times cheaper than the eigendecomposition).
AUTO_EIGH_MAX_N = 300
# fit warns (LargeFitWarning) above this many training points, with its memory and time estimate.
LARGE_N_WARNING = 10_000
# A Gram matrix counts as symmetric positive semi-definite if max|K - K^T| <= PSD_RTOL * max|K| and its most
# negative eigenvalue is >= -PSD_RTOL * its largest eigenvalue (round-off of a PSD kernel is far smaller).
PSD_RTOL = 1e-8
# Seconds measured for one fit at n = 5000 on the project's 2-core machine (benchmarks/krr_scaling.py);
# the time estimate of the large-fit warning scales them by (n / 5000)^3.
_SECONDS_AT_5000 = {"eigh": 40.0, "cholesky": 2.0}
# float64 n x n matrices held at once by a fit (Gram, factor or eigenvectors, LAPACK workspace).
_MATRICES_HELD = {"eigh": 4, "cholesky": 2}

Kernel = Union[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]
Alpha = Union[float, Sequence[float], np.ndarray]


class KernelError(ValueError):
    """The kernel cannot be used: its Gram matrix overflowed, or is not symmetric positive semi-definite."""


class StaleFitError(ValueError):
    """A hyperparameter the fitted factors depend on was changed after fit: fit again."""


class LargeFitWarning(UserWarning):
    """A fit that will take much memory or time (n above LARGE_N_WARNING)."""


# ---------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------
def _as_float(name: str, values) -> np.ndarray:
    """``values`` as float64, or an error naming ``name`` (strings, pd.NA, None, complex numbers)."""
    try:
        values = np.asarray(values)
    except (TypeError, ValueError) as error:  # ragged nested lists, pd.NA in a comparison
        raise ValueError(f"{name} must be an array of real numbers: {error}") from None
    if values.dtype.kind == "c":
        raise ValueError(f"{name} must be real: Complex data not supported")
    try:
        return values.astype(np.float64, copy=False)
    except (TypeError, ValueError) as error:  # "abc" (ValueError), pd.NA or None (TypeError): the same type, named
        raise type(error)(f"{name} must hold real numbers only ({error}); drop or impute the missing values and "
                          f"encode text columns as numbers first") from None


def _as_features(name: str, X, n_features: int | None = None) -> np.ndarray:
    """(n,) or (n, d) finite real array -> (n, d) float64."""
    if scipy.sparse.issparse(X):
        raise TypeError(f"{name} must be a dense array: sparse input is not supported (the Gram matrix is dense "
                        f"anyway); pass {name}.toarray()")
    X = _as_float(name, X)
    one_dimensional = X.ndim == 1
    if one_dimensional:
        X = X[:, None]
    if X.ndim == 2 and X.shape[0] > 0 and X.shape[1] == 0:
        raise ValueError(f"{name} must have d >= 1 features: found array with 0 feature(s) (shape={X.shape}) "
                         f"while a minimum of 1 is required.")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n,) or (n, d) with n, d >= 1, got shape {np.shape(X)}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    if n_features is not None and X.shape[1] != n_features:
        hint = " (a 1-D array is read as one feature; Reshape your data with X.reshape(1, -1) for one sample)" \
            if one_dimensional else ""
        raise ValueError(f"{name} must have {n_features} feature(s) like the training data: X has {X.shape[1]} "
                         f"features, but SelfDistillation is expecting {n_features} features as input{hint}")
    return X


def _as_targets(name: str, y, n: int) -> np.ndarray:
    """(n,) or (n, k) finite real targets -> float64 of the same shape."""
    if y is None:
        raise ValueError(f"{name} is None: SelfDistillation requires y to be passed, but the target y is None")
    if scipy.sparse.issparse(y):
        raise TypeError(f"{name} must be a dense array: sparse targets are not supported")
    y = _as_float(name, y)
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] == 0):
        raise ValueError(f"{name} must have shape ({n},) or ({n}, k) with k >= 1 to match X, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    return y


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_step(step) -> int | float:
    if step == math.inf and not isinstance(step, bool):
        return math.inf
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an integer >= 1 or math.inf, got {step!r}")
    return int(step)


def _check_steps(steps) -> None:
    """A number of steps (for a whole chain): an integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_alpha(alpha, step) -> float | np.ndarray:
    """A scalar alpha (every step), or per-step alphas for steps 2..step (length step - 1)."""
    if alpha is None:
        if step == 1:
            return 1.0  # step 1 is the plain ridge fit; alpha plays no role
        raise ValueError(f"alpha is required for step {step} > 1: a number, or a list of step - 1 numbers")
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        if step == math.inf and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] for the limit step=math.inf, got {alpha!r}")
        return alpha
    if step == math.inf:
        raise ValueError("alpha must be a single number for the limit step=math.inf, got a sequence")
    alphas = np.asarray(alpha, dtype=np.float64)
    if alphas.ndim != 1 or alphas.shape[0] != step - 1:
        raise ValueError(
            f"alpha as a sequence holds one value per step 2..{step}, so it must have length {step - 1}, "
            f"got shape {alphas.shape}"
        )
    if not np.all(np.isfinite(alphas)):
        raise ValueError("alpha must contain only finite values (found NaN or inf)")
    return alphas


def _check_solver(solver) -> str:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
def _overflow(kernel: str, detail: str) -> KernelError:
    return KernelError(f"the {kernel} kernel overflowed float64 ({detail}): its Gram matrix holds inf or NaN. "
                       f"Standardize the features or lower gamma (and degree)")


def kernel_matrix(A, B, kernel: Kernel = "rbf", gamma: float = 1.0, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """Gram matrix between the rows of ``A`` (m, d) and ``B`` (n, d); 1-D inputs are one feature.

    kernel: ``"rbf"`` exp(-gamma ||a - b||^2), ``"laplacian"`` exp(-gamma ||a - b||_1),
    ``"polynomial"`` (gamma <a, b> + coef0)^degree, ``"linear"`` <a, b>, or a callable ``k(A, B) -> (m, n)``.
    Returns an (m, n) float64 array. Squared distances for ``"rbf"`` use scikit-learn's
    ``euclidean_distances`` (one matrix product: fast for many features). Raises :class:`KernelError` if a
    built-in kernel overflows float64.
    """
    A = _as_features("A", A)
    B = _as_features("B", B, n_features=A.shape[1])
    if callable(kernel):
        G = np.asarray(kernel(A, B), dtype=np.float64)
        if G.shape != (A.shape[0], B.shape[0]):
            raise ValueError(f"kernel callable must return shape {(A.shape[0], B.shape[0])}, got {G.shape}")
        if not np.all(np.isfinite(G)):
            raise KernelError("kernel callable returned NaN or inf")
        return G
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "rbf":
            sq = euclidean_distances(A, B, squared=True)
            if not np.all(np.isfinite(sq)):
                raise _overflow("rbf", "squared distances between the inputs exceed the float64 range")
            sq *= -gamma  # in place: the Gram matrix is the largest array of a fit
            return np.exp(sq, out=sq)
        if kernel == "laplacian":
            dist = cdist(A, B, "cityblock")
            if not np.all(np.isfinite(dist)):
                raise _overflow("laplacian", "L1 distances between the inputs exceed the float64 range")
            dist *= -gamma
            return np.exp(dist, out=dist)
        if kernel == "polynomial":
            G = (gamma * (A @ B.T) + coef0) ** degree
            if not np.all(np.isfinite(G)):
                raise _overflow("polynomial", f"(gamma <a, b> + coef0)^degree with gamma={gamma!r}, "
                                              f"degree={degree!r}, coef0={coef0!r}")
            return G
        if kernel == "linear":
            G = A @ B.T
            if not np.all(np.isfinite(G)):
                raise _overflow("linear", "inner products of the inputs exceed the float64 range")
            return G
    raise ValueError(f"kernel must be one of {KERNELS} or a callable k(A, B) -> Gram, got {kernel!r}")


def _check_kernel(kernel, gamma, degree, coef0, precomputed_ok: bool = False) -> None:
    if precomputed_ok and isinstance(kernel, str) and kernel == "precomputed":
        return
    if not callable(kernel) and kernel not in KERNELS:
        extra = ', "precomputed"' if precomputed_ok else ""
        raise ValueError(f"kernel must be one of {KERNELS}{extra} or a callable k(A, B) -> Gram, got {kernel!r}")
    if kernel in ("rbf", "laplacian", "polynomial"):
        _check_positive("gamma", gamma)
    if kernel == "polynomial":
        if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        if not isinstance(coef0, numbers.Real) or not math.isfinite(coef0) or coef0 < 0:
            raise ValueError(f"coef0 must be a finite number >= 0 (for a positive semi-definite kernel), got {coef0!r}")


def _kernel_params(kernel) -> tuple[str, ...]:
    """The hyperparameters the Gram matrix of ``kernel`` depends on."""
    if kernel in ("rbf", "laplacian"):
        return ("gamma",)
    if kernel == "polynomial":
        return ("gamma", "degree", "coef0")
    return ()


def _check_symmetric(K: np.ndarray) -> None:
    """Raise KernelError unless max|K - K^T| <= PSD_RTOL max|K|."""
    scale = float(np.abs(K).max())
    asymmetry = float(np.abs(K - K.T).max())
    if asymmetry > PSD_RTOL * scale:
        raise KernelError(f"the kernel's Gram matrix is not symmetric: max|K - K^T| = {asymmetry:.3g} against "
                          f"max|K| = {scale:.3g} (tolerance {PSD_RTOL:g} relative); a kernel must satisfy "
                          f"k(a, b) = k(b, a)")


def _check_spectrum(eigenvalues: np.ndarray) -> None:
    """Raise KernelError if the most negative eigenvalue is below -PSD_RTOL times the largest."""
    largest, smallest = float(np.max(eigenvalues)), float(np.min(eigenvalues))
    if smallest < -PSD_RTOL * max(largest, 0.0):
        raise KernelError(f"the kernel's Gram matrix is not positive semi-definite: its most negative eigenvalue "
                          f"is {smallest:.6g} against a largest eigenvalue of {largest:.6g} (tolerance "
                          f"{PSD_RTOL:g} relative). The closed form assumes a positive semi-definite kernel "
                          f"(e.g. tanh is not one); clipping the negative eigenvalues would change the model")


# The conditioning rule of both solvers: lam must lie above the round-off of the Gram matrix, n points times
# 10 machine epsilons times its largest entry (on its diagonal). Below it K + lam I is numerically singular where K
# is (duplicate points, a low-rank kernel): Cholesky fails, and the eigenbasis divides round-off by lam (1e286 for
# lam = 1e-300). Both raise the same KernelError instead.
LAM_RTOL_PER_POINT = 10 * np.finfo(np.float64).eps


def _lam_floor(K: np.ndarray) -> float:
    return K.shape[0] * LAM_RTOL_PER_POINT * max(float(np.max(np.diagonal(K))), 0.0)


def _check_conditioning(lam: float, floor: float) -> None:
    if lam < floor:
        raise KernelError(f"lam = {lam:.3g} is below {floor:.3g}, the round-off level of this Gram matrix (n points x "
                          f"10 machine epsilons x its largest entry): K + lam I is numerically singular (duplicate "
                          f"or nearly duplicate points make K singular) and the fit would be round-off amplified "
                          f"by 1/lam; use lam >= {floor:.3g}")


def _factor(regularized: np.ndarray, what: str):
    """Lower Cholesky factor of ``regularized`` (overwritten), or a KernelError instead of LinAlgError."""
    largest = float(np.abs(np.diagonal(regularized)).max())  # the largest entry of a PSD matrix is on its diagonal
    try:
        return scipy.linalg.cho_factor(regularized, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise KernelError(f"{what} is not numerically positive definite (Cholesky failed): the Gram matrix is "
                          f"not positive semi-definite, or its entries (up to {largest:.3g}) "
                          f"dwarf lambda; standardize the features or lower gamma") from None


# ---------------------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------------------
class SelfDistillation(RegressorMixin, BaseEstimator):
    """Kernel ridge regression, self-distilled for any number of steps, in closed form (a scikit-learn regressor).

    Parameters
    ----------
    kernel : {"rbf", "laplacian", "polynomial", "linear", "precomputed"} or callable ``k(A, B) -> Gram``
        A callable must give a symmetric positive semi-definite Gram matrix; fit checks it (:class:`KernelError`
        names the most negative eigenvalue otherwise). ``"precomputed"``: fit takes the (n, n) Gram matrix of
        the training points as X (checked the same way) and predict an (m, n) matrix of kernel values between
        new points and the training points (one Gram matrix shared by many fits: label sets, noise levels).
    gamma : float > 0
        Kernel width (rbf, laplacian) or scale (polynomial).
    lam : float > 0
        Ridge penalty lambda; step 1 minimises ``||y - f(X)||^2 + lam ||f||_H^2``.
    degree, coef0 : polynomial kernel parameters.
    step : int >= 1 or math.inf
        The step :meth:`predict` (and :meth:`score`) use when called without one; 1 is kernel ridge regression.
    alpha : float, sequence of step - 1 floats, or None
        The mixing weight :meth:`predict` uses when called without one (required for step > 1).
    solver : {"auto", "eigh", "cholesky"}
        See the module docstring: both are exact; "auto" is "eigh" for n <= AUTO_EIGH_MAX_N (300), else
        "cholesky".

    All parameters are validated in :meth:`fit` (scikit-learn's convention), so ``GridSearchCV`` can search
    lam, gamma, step and alpha. Changing the kernel or its parameters after fit makes the next prediction
    raise :class:`StaleFitError` (fit again); so does lam with solver "cholesky" (the factor depends on it).
    With solver "eigh" lam may be changed after fit (``set_params(lam=...)``): the eigendecomposition does not
    depend on it, so the next query uses the new value exactly (validated), at O(n^2 k) instead of a refit —
    a lambda sweep. step and alpha may always be changed.

    Attributes (after :meth:`fit`)
    ------------------------------
    X_fit_ : (n, d) training inputs
    n_features_in_ : d
    solver_ : "eigh" or "cholesky", the solver used
    eigenvalues_ : (n,) eigenvalues of the Gram matrix, descending, round-off negatives set to 0 (eigh only)
    eigenvectors_ : (n, n) matching orthonormal eigenvectors as columns (eigh only)
    projected_targets_ : (n,) or (n, k) ``eigenvectors_.T @ y`` (eigh only)

    Examples
    --------
    >>> sd = SelfDistillation(kernel="rbf", gamma=80.0, lam=0.2).fit(X, y)
    >>> sd.predict(X_new, step=3, alpha=0.25)        # three steps, alpha = 0.25 at steps 2 and 3
    >>> sd.predict(X_new, step=math.inf, alpha=0.25)  # the limit: ridge regression with lam / alpha
    >>> SelfDistillation(lam=0.2, step=3, alpha=0.25).fit(X, y).score(X_test, y_test)  # R^2 of step 3
    """

    def __init__(self, kernel: Kernel = "rbf", gamma: float = 1.0, lam: float = 1.0, degree: int = 3,
                 coef0: float = 1.0, step=1, alpha=None, solver: str = "auto"):
        self.kernel = kernel
        self.gamma = gamma
        self.lam = lam
        self.degree = degree
        self.coef0 = coef0
        self.step = step
        self.alpha = alpha
        self.solver = solver

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.input_tags.pairwise = isinstance(self.kernel, str) and self.kernel == "precomputed"
        return tags

    # -- fitting --------------------------------------------------------------------------------------------
    def _precomputed(self) -> bool:
        return isinstance(self.kernel, str) and self.kernel == "precomputed"

    def _gram(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        if self._precomputed():
            return A  # validated kernel values between the query points and the training points
        return kernel_matrix(A, B, self.kernel, gamma=self.gamma, degree=self.degree, coef0=self.coef0)

    def _query(self, name: str, X) -> np.ndarray:
        """Validated query points X (m, d), or (precomputed) kernel values (m, n) against the training points.
        A DataFrame's columns must be those of fit, in the same order (as scikit-learn checks them)."""
        _check_feature_names(self, X, reset=False)
        X = _as_features(name, X, n_features=None if self._precomputed() else self.n_features_in_)
        if self._precomputed() and X.shape[1] != self.n_features_in_:
            raise ValueError(f"{name} must hold kernel values against the {self.n_features_in_} training points "
                             f"(kernel='precomputed'): expected shape (m, {self.n_features_in_}), got {X.shape}")
        return X

    def _factor_params(self) -> dict:
        names = ("kernel", *_kernel_params(self.kernel))
        if getattr(self, "solver_", None) != "eigh":
            names += ("lam",)  # the Cholesky factor is of K + lam I; the eigendecomposition is of K alone
        return {name: getattr(self, name) for name in names}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "solver_")

    def fit(self, X, y) -> "SelfDistillation":
        """Factor the Gram matrix of X (n,) or (n, d) once; y: (n,) or (n, k) targets (k outputs)."""
        lam = _check_positive("lam", self.lam)
        _check_kernel(self.kernel, self.gamma, self.degree, self.coef0, precomputed_ok=True)
        step = _check_step(self.step)
        _check_alpha(self.alpha, step)
        solver = _check_solver(self.solver)
        _check_feature_names(self, X, reset=True)  # feature_names_in_ of a DataFrame, as scikit-learn sets it
        X = _as_features("X", X)
        if self._precomputed() and X.shape[0] != X.shape[1]:
            raise ValueError(f"X must be the square (n, n) Gram matrix of the training points for "
                             f"kernel='precomputed', got shape {X.shape}")
        y = _as_targets("y", y, X.shape[0])
        n = X.shape[0]
        if solver == "auto":
            solver = "eigh" if n <= AUTO_EIGH_MAX_N else "cholesky"
        if n > LARGE_N_WARNING:
            memory_gb = _MATRICES_HELD[solver] * 8 * n * n / 1e9
            minutes = _SECONDS_AT_5000[solver] * (n / 5000) ** 3 / 60
            warnings.warn(f"SelfDistillation.fit with n = {n} training points (solver {solver!r}) needs about "
                          f"{memory_gb:.1f} GB of memory and of the order of {minutes:.0f} min on a 2-core CPU "
                          f"(both grow as n^2 and n^3); subsample for a quick look", LargeFitWarning, stacklevel=2)

        for name in ("solver_", "_fitted_params", "_lam_floor", "X_fit_", "n_features_in_", "_Y", "_y_1d",
                     "eigenvalues_", "eigenvectors_", "projected_targets_", "_cholesky", "_spectrum"):
            self.__dict__.pop(name, None)  # nothing of an earlier fit survives, not even a failed refit
        K = np.array(X) if self._precomputed() else self._gram(X, X)
        user_kernel = callable(self.kernel) or self._precomputed()
        if user_kernel:  # built-in kernels are symmetric PSD by construction
            _check_symmetric(K)
            if solver == "cholesky":  # the spectrum, values only; eigh below has it anyway
                _check_spectrum(scipy.linalg.eigvalsh(K, driver="evd", check_finite=False))
        Y = y if y.ndim == 2 else y[:, None]
        lam_floor = _lam_floor(K)
        _check_conditioning(lam, lam_floor)
        if solver == "eigh":
            K = 0.5 * (K + K.T)  # exact symmetry for eigh
            try:
                eigenvalues, eigenvectors = scipy.linalg.eigh(K, driver="evd", overwrite_a=True, check_finite=False)
            except np.linalg.LinAlgError:
                raise KernelError("the eigendecomposition of the Gram matrix failed to converge; standardize the "
                                  "features or lower gamma") from None
            eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # descending
            if not np.all(np.isfinite(eigenvalues)):
                raise KernelError("the Gram matrix's eigenvalues overflowed float64; standardize the features")
            if user_kernel:
                _check_spectrum(eigenvalues)
            # A PSD kernel has no negative eigenvalues; round-off ones are zeros.
            self.eigenvalues_ = np.clip(eigenvalues, 0.0, None)
            self.eigenvectors_ = np.ascontiguousarray(eigenvectors)
            projected = self.eigenvectors_.T @ Y
            self.projected_targets_ = projected if y.ndim == 2 else projected[:, 0]
        else:
            K[np.diag_indices_from(K)] += lam
            self._cholesky = _factor(K, "K + lam I")
        self._Y = np.array(Y)  # own copies: a caller's later edits must not change the fitted model
        self._y_1d = y.ndim == 1
        self.X_fit_ = np.array(X)
        self.n_features_in_ = X.shape[1]
        self.solver_ = solver
        self._lam_floor = lam_floor
        self._fitted_params = self._factor_params()
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "solver_"):
            raise NotFittedError("this SelfDistillation is not fitted yet: call fit(X, y) before predict/damping")
        if self.solver_ == "eigh":
            # lam may have changed since fit: exact with the new value, under the same conditioning rule
            _check_conditioning(_check_positive("lam", self.lam), self._lam_floor)
        current = self._factor_params()
        for name, fitted in self._fitted_params.items():
            now = current.get(name)
            same = now is fitted
            if not same and not callable(now) and not callable(fitted):
                try:
                    same = bool(now == fitted) and type(now) is not bool
                except (TypeError, ValueError):
                    same = False
            if not same:
                raise StaleFitError(f"{name} was changed after fit (fitted with {fitted!r}, now {now!r}): the "
                                    f"fitted factors belong to the old value; call fit(X, y) again")

    def _output(self, values: np.ndarray) -> np.ndarray:
        """(..., k) -> (...,) for a 1-D training target."""
        return values[..., 0] if self._y_1d else values

    def _step_alpha(self, step, alpha):
        """The step and alpha of a query: the arguments, else the constructor's step and alpha; validated."""
        step = _check_step(self.step if step is None else step)
        return step, _check_alpha(self.alpha if alpha is None else alpha, step)

    # -- the diagonal recursion (eigh) ----------------------------------------------------------------------
    def _eigenvalues(self) -> np.ndarray:
        """The spectrum, descending: from the eigendecomposition, or (cholesky) eigvalsh of K on first use."""
        if self.solver_ == "eigh":
            return self.eigenvalues_
        if getattr(self, "_spectrum", None) is None:
            K = self._gram(self.X_fit_, self.X_fit_)
            values = scipy.linalg.eigvalsh(0.5 * (K + K.T), driver="evd", overwrite_a=True, check_finite=False)
            self._spectrum = np.clip(values[::-1], 0.0, None)
        return self._spectrum

    def _shrinkage(self, d: np.ndarray) -> np.ndarray:
        """a = d / (d + lam): the step-1 damping of each eigenvalue."""
        return d / (d + self.lam)

    def _damping(self, d, step, alpha) -> np.ndarray:
        """Diagonal of B(step) for validated step and alpha; B(0) = I."""
        lam = self.lam
        if step == 0:
            return np.ones_like(d)
        a = self._shrinkage(d)
        if isinstance(alpha, float):
            limit = alpha * d / (alpha * d + lam)
            if step == math.inf:
                return limit
            # b_t = b_inf + (a - b_inf) (a (1 - alpha))^(t - 1): O(n) whatever the step.
            return limit + (a - limit) * (a * (1.0 - alpha)) ** (step - 1)
        b = a.copy()
        for alpha_t in alpha[: step - 1]:
            b = a * ((1.0 - alpha_t) * b + alpha_t)
        return b

    def _dual_scaling(self, step, alpha) -> np.ndarray:
        """D^-1 B(step) without dividing by an eigenvalue: ((1 - alpha) B(step-1) + alpha) / (d + lam)."""
        d, lam = self.eigenvalues_, self.lam
        if step == math.inf:
            return alpha / (alpha * d + lam)  # = (d + lam / alpha)^-1, and 0 for alpha = 0
        if isinstance(alpha, float):
            alpha_last = alpha
        else:
            alpha_last = alpha[step - 2] if step > 1 else 1.0  # step 1: B(0) = I, any alpha gives 1 / (d + lam)
        return ((1.0 - alpha_last) * self._damping(d, step - 1, alpha) + alpha_last) / (d + lam)

    def _projected(self) -> np.ndarray:
        P = self.projected_targets_
        return P if P.ndim == 2 else P[:, None]

    def _phi_is_cheaper(self, m: int, queries: int) -> bool:
        """Whether K_new V (m n^2 flops, once) beats a dual product V (s P) per query (n^2 k each)."""
        n, k = self._Y.shape
        return m * n * n + queries * m * n * k < queries * (n * n * k + m * n * k)

    def _eigh_outputs(self, K_new: np.ndarray, scalings, phi: np.ndarray | None = None) -> np.ndarray:
        """(len(scalings), m, k): K_new V (s * V^T Y) for each (n,) dual scaling s, by the cheaper order."""
        P = self._projected()
        S = np.stack(scalings)  # (q, n)
        if phi is None and not self._phi_is_cheaper(K_new.shape[0], len(S)):
            # Dual coefficients of all queries in one product, then one product with K_new.
            coefs = self.eigenvectors_ @ (S.T[:, :, None] * P[:, None, :]).reshape(len(P), -1)  # (n, q k)
            out = K_new @ coefs  # (m, q k)
            return out.reshape(K_new.shape[0], len(S), P.shape[1]).transpose(1, 0, 2)
        if phi is None:
            phi = K_new @ self.eigenvectors_
        return np.stack([phi @ (s[:, None] * P) for s in S])

    # -- the chain (cholesky) -------------------------------------------------------------------------------
    def _solve(self, Z: np.ndarray) -> np.ndarray:
        return scipy.linalg.cho_solve(self._cholesky, Z, check_finite=False)

    def _chain_coefs(self, steps: int, alpha):
        """Yield the (n, k) dual coefficients of steps 1..steps (cholesky): one solve per step."""
        Y = self._Y
        coef = self._solve(Y)
        yield coef
        fitted = Y - self.lam * coef  # K c = z - lam c: the fitted values without a product with K
        for t in range(2, steps + 1):
            alpha_t = alpha if isinstance(alpha, float) else alpha[t - 2]
            targets = alpha_t * Y + (1.0 - alpha_t) * fitted
            coef = self._solve(targets)
            yield coef
            fitted = targets - self.lam * coef

    def _limit_coef(self, alpha: float) -> np.ndarray:
        """Dual coefficients of the limit, ridge regression with lam / alpha (cholesky: one more factor)."""
        if alpha == 0.0:
            return np.zeros_like(self._Y)
        K = np.array(self._gram(self.X_fit_, self.X_fit_))  # a copy: X_fit_ is the Gram matrix if precomputed
        K[np.diag_indices_from(K)] += self.lam / alpha
        return scipy.linalg.cho_solve(_factor(K, "K + (lam / alpha) I"), self._Y, check_finite=False)

    def _coef(self, step, alpha) -> np.ndarray:
        """(n, k) dual coefficients for a validated step and alpha."""
        if self.solver_ == "eigh":
            return self.eigenvectors_ @ (self._dual_scaling(step, alpha)[:, None] * self._projected())
        if step == math.inf:
            return self._limit_coef(alpha)
        for coef in self._chain_coefs(step, alpha):
            pass
        return coef

    # -- public queries -------------------------------------------------------------------------------------
    def damping(self, step, alpha=None) -> np.ndarray:
        """(n,) diagonal of B(step), in the order of the eigenvalues (descending).

        step: int >= 1 or math.inf; alpha: a number, or per-step alphas for steps 2..step.
        B(1) = d / (d + lam); B(inf) = alpha d / (alpha d + lam). With solver "cholesky" the eigenvalues are
        computed on the first call (eigvalsh, values only).
        """
        self._check_fitted()
        step = _check_step(step)
        alpha = _check_alpha(alpha, step)
        return self._damping(self._eigenvalues(), step, alpha)

    def dual_coef(self, step=None, alpha=None) -> np.ndarray:
        """(n,) or (n, k) dual coefficients c with f(step)(x) = k(x, X_fit) @ c (step, alpha: as predict)."""
        self._check_fitted()
        step, alpha = self._step_alpha(step, alpha)
        return self._output(self._coef(step, alpha))

    def predict(self, X, step=None, alpha=None) -> np.ndarray:
        """(m,) or (m, k) predictions of the step-``step`` self-distilled model at X (m,) or (m, d).

        step: int >= 1, or math.inf for the limit (ridge regression with lam / alpha; zero for alpha = 0);
            None uses the constructor's ``step``.
        alpha: a number used at every step 2..step, or a sequence of step - 1 per-step alphas; None uses the
            constructor's ``alpha``.
        """
        self._check_fitted()
        X = self._query("X", X)
        step, alpha = self._step_alpha(step, alpha)
        return self._output(self._gram(X, self.X_fit_) @ self._coef(step, alpha))

    def predict_classes(self, X, step=None, alpha=None) -> np.ndarray:
        """(m,) class indices: the argmax over the k outputs of :meth:`predict`.

        For a model fitted on one-hot targets (:func:`one_hot`), so that column j stands for class j.
        """
        self._check_fitted()
        if self._y_1d:
            raise ValueError("predict_classes needs a model fitted on (n, k) one-hot targets (one_hot(labels)); "
                             "this one was fitted on a 1-D y")
        return np.argmax(self.predict(X, step=step, alpha=alpha), axis=1)

    def predict_steps(self, X, steps: int, alpha=None) -> np.ndarray:
        """(steps, m) or (steps, m, k) predictions at X after each step 1..steps, as ``refit_chain`` returns.

        eigh: the kernel product with the eigenvectors is formed once, so a whole chain costs one
        (m, n) x (n, n) product plus O(steps n m k); cholesky: one solve per step. alpha: as :meth:`predict`.
        """
        self._check_fitted()
        X = self._query("X", X)
        _check_steps(steps)
        alpha = _check_alpha(self.alpha if alpha is None else alpha, steps)
        if self.solver_ == "eigh":
            scalings = [self._dual_scaling(t, alpha if isinstance(alpha, float) else alpha[: t - 1])
                        for t in range(1, steps + 1)]
            out = self._eigh_outputs(self._gram(X, self.X_fit_), scalings)
        else:
            K_new = self._gram(X, self.X_fit_)
            out = np.stack([K_new @ coef for coef in self._chain_coefs(steps, alpha)])
        return self._output(out)

    def predict_chains(self, X, steps: int, alphas) -> np.ndarray:
        """(len(alphas), steps, m[, k]) predictions at X after each step 1..steps, one chain per (constant) alpha.

        A grid of queries at once: eigh forms the kernel product with the eigenvectors once; cholesky makes,
        per step, one multi-right-hand-side solve for all alphas (and all outputs).
        """
        self._check_fitted()
        X = self._query("X", X)
        _check_steps(steps)
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)):
            raise ValueError(f"alphas must be a non-empty 1-D sequence of finite numbers, got shape {alphas.shape}")
        K_new = self._gram(X, self.X_fit_)
        Y = self._Y
        n, k = Y.shape
        out = np.empty((alphas.size, steps, X.shape[0], k))
        if self.solver_ == "eigh":
            scalings = [self._dual_scaling(t, float(alpha)) for alpha in alphas for t in range(1, steps + 1)]
            out[:] = self._eigh_outputs(K_new, scalings).reshape(out.shape)
            return self._output(out)
        # Columns grouped by alpha: (n, n_alphas * k).
        weights = np.repeat(alphas, k)
        Y_all = np.tile(Y, alphas.size)
        coef = self._solve(Y)
        fitted = np.tile(Y - self.lam * coef, alphas.size)
        out[:, 0] = (K_new @ coef)[None]
        for t in range(1, steps):
            targets = weights * Y_all + (1.0 - weights) * fitted
            coef = self._solve(targets)
            fitted = targets - self.lam * coef
            out[:, t] = (K_new @ coef).reshape(X.shape[0], alphas.size, k).transpose(1, 0, 2)
        return self._output(out)

    # -- Algorithm 1 ------------------------------------------------------------------------------------------
    def optimal_alphas(self, X_val, y_val, steps: int, bounds: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
        """(steps - 1,) alpha*(2..steps) by the paper's Algorithm 1, chosen sequentially on held-out data.

        At step t the fit is linear in alpha: f(t) = alpha f(1) + (1 - alpha) g(t), with g(t) the alpha = 0
        step from the (already distilled) fit t - 1. alpha*(t) minimises the squared error of f(t) on
        (X_val, y_val), summed over all outputs for (m, k) targets; the chain then continues from f(t) with
        alpha*(t). The validation loss is a convex quadratic in alpha, so clipping to ``bounds`` gives the
        constrained optimum; ``bounds=None`` keeps the unconstrained least-squares solution.
        """
        self._check_fitted()
        X_val = self._query("X_val", X_val)
        y_val = _as_targets("y_val", y_val, X_val.shape[0])
        Y_val = y_val if y_val.ndim == 2 else y_val[:, None]
        if Y_val.shape[1] != self._Y.shape[1]:
            raise ValueError(f"y_val must have {self._Y.shape[1]} output(s) like the training targets, "
                             f"got shape {y_val.shape}")
        _check_steps(steps)
        alphas = np.empty(steps - 1)
        K_val = self._gram(X_val, self.X_fit_)
        if self.solver_ == "eigh":
            # Validation outputs of any step are K_val V (scaling * V^T y); the eigenbasis product K_val V is
            # formed once where that is cheaper than a dual product per step (_eigh_outputs' rule).
            denominator = self.eigenvalues_ + self.lam
            phi = K_val @ self.eigenvectors_ if self._phi_is_cheaper(K_val.shape[0], steps) else None
            f1 = self._eigh_outputs(K_val, [1.0 / denominator], phi=phi)[0]
            a = self._shrinkage(self.eigenvalues_)
            b = a.copy()  # B(1)
            for i in range(steps - 1):
                g = self._eigh_outputs(K_val, [b / denominator], phi=phi)[0]  # alpha = 0 step from the current fit
                alphas[i] = least_squares_alpha(Y_val, f1, g, bounds=bounds)
                b = a * ((1.0 - alphas[i]) * b + alphas[i])
            return alphas
        Y = self._Y
        coef1 = self._solve(Y)
        f1 = K_val @ coef1
        fitted1 = Y - self.lam * coef1
        fitted = fitted1
        for i in range(steps - 1):
            coef_g = self._solve(fitted)  # alpha = 0 step from the current fit
            alphas[i] = least_squares_alpha(Y_val, f1, K_val @ coef_g, bounds=bounds)
            # f(t) = alpha f(1) + (1 - alpha) g on the training points too: (K + lam I)^-1 is linear.
            fitted = alphas[i] * fitted1 + (1.0 - alphas[i]) * (fitted - self.lam * coef_g)
        return alphas


# ---------------------------------------------------------------------------------------------------------
# the reference: explicit refitting
# ---------------------------------------------------------------------------------------------------------
def refit_chain(X, y, X_new, steps: int, alpha: Alpha, *, lam: float, kernel: Kernel = "rbf", gamma: float = 1.0,
                degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(steps, m) or (steps, m, k) predictions at X_new after each step 1..steps, by literally refitting.

    Step 1 solves (K + lam I) c = y; step t solves it again on the mixed targets
    alpha y + (1 - alpha) f(t-1)(X). This is the definition of self-distillation and the reference the closed
    form of :class:`SelfDistillation` is tested and benchmarked against: one O(n^3) solve per step.
    """
    _check_positive("lam", lam)
    _check_kernel(kernel, gamma, degree, coef0)
    X = _as_features("X", X)
    y = _as_targets("y", y, X.shape[0])
    X_new = _as_features("X_new", X_new, n_features=X.shape[1])
    _check_steps(steps)
    alpha = _check_alpha(alpha, steps)
    alphas = np.full(steps - 1, alpha) if isinstance(alpha, float) else alpha

    K = kernel_matrix(X, X, kernel, gamma=gamma, degree=degree, coef0=coef0)
    K_new = kernel_matrix(X_new, X, kernel, gamma=gamma, degree=degree, coef0=coef0)
    regularized = K + lam * np.eye(X.shape[0])
    predictions = np.empty((steps, X_new.shape[0], *y.shape[1:]))
    targets = y
    for t in range(steps):
        coef = np.linalg.solve(regularized, targets)
        predictions[t] = K_new @ coef
        if t < steps - 1:
            targets = alphas[t] * y + (1.0 - alphas[t]) * (K @ coef)
    return predictions


# ---------------------------------------------------------------------------------------------------------
# classes: one-hot targets and symmetric label noise
# ---------------------------------------------------------------------------------------------------------
def one_hot(labels, n_classes: int) -> np.ndarray:
    """(n, n_classes) float64 one-hot targets of integer ``labels`` (n,) in 0..n_classes - 1."""
    labels, n_classes = _check_labels(labels, n_classes)
    return np.eye(n_classes)[labels]


def toy_data() -> tuple[np.ndarray, np.ndarray]:
    """The paper's toy problem: X = 0, 0.1, ..., 1.0 (11,) and y = sin(2 pi x) plus noise (11,).

    The values of the authors' public toy example (used with an RBF kernel, gamma = 80, lambda = 0.2).
    """
    X = np.linspace(0.0, 1.0, 11)
    y = np.array([0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.6920159488889518,
                  -0.29756145531871736, -0.24189291901377769, -0.7964485769175675, -0.9616480167034174,
                  -0.49672509509916934, -0.3469066003991437, 0.5589512650600734])
    return X, y
