r"""Self-distillation in kernel ridge regression, in closed form.

Step 1 is ridge regression on the labels. Step t refits ridge regression on the mixed targets

.. math:: z^{(t)} = \alpha y + (1-\alpha) f^{(t-1)}(X).

Every step is linear in ``y``. With the Gram matrix :math:`K = V D V^\top` and :math:`A = D(D+\lambda I)^{-1}`
the t-th fit is :math:`f^{(t)}(x) = k(x)^\top V D^{-1} B^{(t)} V^\top y` with the diagonal recursion

.. math:: B^{(1)} = A, \qquad B^{(t)} = A\big((1-\alpha) B^{(t-1)} + \alpha I\big).

One eigendecomposition at :meth:`SelfDistillation.fit` then answers every (step, alpha) query in O(n) in the
eigenbasis, plus the kernel product with the query points.

A singular Gram matrix (duplicate points, a linear kernel with d < n) is handled exactly: the dual
coefficients are computed as :math:`D^{-1}B^{(t)} = (D+\lambda I)^{-1}((1-\alpha)B^{(t-1)} + \alpha I)` with
:math:`B^{(0)} = I`, which never divides by an eigenvalue.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence, Union

import numpy as np
from scipy.spatial.distance import cdist

from .alpha import least_squares_alpha

__all__ = ["SelfDistillation", "kernel_matrix", "refit_chain", "toy_data", "KERNELS"]

KERNELS = ("rbf", "laplacian", "polynomial", "linear")

Kernel = Union[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]
Alpha = Union[float, Sequence[float], np.ndarray]


# ---------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------
def _as_features(name: str, X, n_features: int | None = None) -> np.ndarray:
    """(n,) or (n, d) finite array -> (n, d) float64."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n,) or (n, d) with n, d >= 1, got shape {np.shape(X)}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{name} must have {n_features} feature(s) like the training data, got {X.shape[1]}")
    return X


def _as_targets(name: str, y, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match X, got shape {y.shape}")
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


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
def kernel_matrix(A, B, kernel: Kernel = "rbf", gamma: float = 1.0, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """Gram matrix between the rows of ``A`` (m, d) and ``B`` (n, d); 1-D inputs are one feature.

    kernel: ``"rbf"`` exp(-gamma ||a - b||^2), ``"laplacian"`` exp(-gamma ||a - b||_1),
    ``"polynomial"`` (gamma <a, b> + coef0)^degree, ``"linear"`` <a, b>, or a callable ``k(A, B) -> (m, n)``.
    Returns an (m, n) float64 array.
    """
    A = _as_features("A", A)
    B = _as_features("B", B, n_features=A.shape[1])
    if callable(kernel):
        G = np.asarray(kernel(A, B), dtype=np.float64)
        if G.shape != (A.shape[0], B.shape[0]):
            raise ValueError(f"kernel callable must return shape {(A.shape[0], B.shape[0])}, got {G.shape}")
        if not np.all(np.isfinite(G)):
            raise ValueError("kernel callable returned NaN or inf")
        return G
    if kernel == "rbf":
        return np.exp(-gamma * cdist(A, B, "sqeuclidean"))
    if kernel == "laplacian":
        return np.exp(-gamma * cdist(A, B, "cityblock"))
    if kernel == "polynomial":
        return (gamma * (A @ B.T) + coef0) ** degree
    if kernel == "linear":
        return A @ B.T
    raise ValueError(f"kernel must be one of {KERNELS} or a callable k(A, B) -> Gram, got {kernel!r}")


def _check_kernel(kernel, gamma, degree, coef0) -> None:
    if not callable(kernel) and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or a callable k(A, B) -> Gram, got {kernel!r}")
    if kernel in ("rbf", "laplacian", "polynomial"):
        _check_positive("gamma", gamma)
    if kernel == "polynomial":
        if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        if not isinstance(coef0, numbers.Real) or not math.isfinite(coef0) or coef0 < 0:
            raise ValueError(f"coef0 must be a finite number >= 0 (for a positive semi-definite kernel), got {coef0!r}")


# ---------------------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------------------
class SelfDistillation:
    """Kernel ridge regression, self-distilled for any number of steps, in closed form.

    Parameters
    ----------
    kernel : {"rbf", "laplacian", "polynomial", "linear"} or callable ``k(A, B) -> Gram``
    gamma : float > 0
        Kernel width (rbf, laplacian) or scale (polynomial).
    lam : float > 0
        Ridge penalty lambda; step 1 minimises ``||y - f(X)||^2 + lam ||f||_H^2``.
    degree, coef0 : polynomial kernel parameters.

    Attributes (after :meth:`fit`)
    ------------------------------
    X_fit_ : (n, d) training inputs
    eigenvalues_ : (n,) eigenvalues of the Gram matrix, descending, clipped at 0
    eigenvectors_ : (n, n) matching orthonormal eigenvectors (columns)
    projected_targets_ : (n,) ``eigenvectors_.T @ y``

    Examples
    --------
    >>> sd = SelfDistillation(kernel="rbf", gamma=80.0, lam=0.2).fit(X, y)
    >>> sd.predict(X_new, step=3, alpha=0.25)        # three steps, alpha = 0.25 at steps 2 and 3
    >>> sd.predict(X_new, step=math.inf, alpha=0.25)  # the limit: ridge regression with lam / alpha
    """

    def __init__(self, kernel: Kernel = "rbf", gamma: float = 1.0, lam: float = 1.0, degree: int = 3, coef0: float = 1.0):
        self.kernel = kernel
        self.gamma = gamma
        self.lam = lam
        self.degree = degree
        self.coef0 = coef0

    def __repr__(self) -> str:
        kernel = getattr(self.kernel, "__name__", repr(self.kernel))
        return f"SelfDistillation(kernel={kernel}, gamma={self.gamma!r}, lam={self.lam!r})"

    # -- fitting --------------------------------------------------------------------------------------------
    def _gram(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        return kernel_matrix(A, B, self.kernel, gamma=self.gamma, degree=self.degree, coef0=self.coef0)

    def fit(self, X, y) -> "SelfDistillation":
        """Eigendecompose the Gram matrix of X (n,) or (n, d) once; y: (n,) targets."""
        _check_positive("lam", self.lam)
        _check_kernel(self.kernel, self.gamma, self.degree, self.coef0)
        X = _as_features("X", X)
        y = _as_targets("y", y, X.shape[0])

        K = self._gram(X, X)
        K = 0.5 * (K + K.T)  # exact symmetry for eigh
        eigenvalues, eigenvectors = np.linalg.eigh(K)
        order = np.argsort(eigenvalues)[::-1]
        # A PSD kernel has no negative eigenvalues; round-off ones are zeros.
        self.eigenvalues_ = np.clip(eigenvalues[order], 0.0, None)
        self.eigenvectors_ = np.ascontiguousarray(eigenvectors[:, order])
        self.X_fit_ = X
        self.projected_targets_ = self.eigenvectors_.T @ y
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "eigenvalues_"):
            raise ValueError("this SelfDistillation is not fitted yet: call fit(X, y) before predict/damping")

    # -- the diagonal recursion -----------------------------------------------------------------------------
    def _shrinkage(self) -> np.ndarray:
        """a = d / (d + lam): the step-1 damping of each eigenvalue."""
        return self.eigenvalues_ / (self.eigenvalues_ + self.lam)

    def _damping(self, step, alpha) -> np.ndarray:
        """Diagonal of B(step) for validated step and alpha; B(0) = I."""
        d, lam = self.eigenvalues_, self.lam
        if step == 0:
            return np.ones_like(d)
        a = self._shrinkage()
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
        return ((1.0 - alpha_last) * self._damping(step - 1, alpha) + alpha_last) / (d + lam)

    def damping(self, step, alpha=None) -> np.ndarray:
        """(n,) diagonal of B(step), in the order of ``eigenvalues_``.

        step: int >= 1 or math.inf; alpha: a number, or per-step alphas for steps 2..step.
        B(1) = d / (d + lam); B(inf) = alpha d / (alpha d + lam).
        """
        self._check_fitted()
        step = _check_step(step)
        alpha = _check_alpha(alpha, step)
        return self._damping(step, alpha)

    def dual_coef(self, step=1, alpha=None) -> np.ndarray:
        """(n,) dual coefficients c with f(step)(x) = k(x, X_fit) @ c."""
        self._check_fitted()
        step = _check_step(step)
        alpha = _check_alpha(alpha, step)
        return self.eigenvectors_ @ (self._dual_scaling(step, alpha) * self.projected_targets_)

    def predict(self, X, step=1, alpha=None) -> np.ndarray:
        """(m,) predictions of the step-``step`` self-distilled model at X (m,) or (m, d).

        step: int >= 1, or math.inf for the limit (ridge regression with lam / alpha; zero for alpha = 0).
        alpha: a number used at every step 2..step, or a sequence of step - 1 per-step alphas.
        """
        self._check_fitted()
        X = _as_features("X", X, n_features=self.X_fit_.shape[1])
        coef = self.dual_coef(step, alpha)
        return self._gram(X, self.X_fit_) @ coef

    def predict_steps(self, X, steps: int, alpha=None) -> np.ndarray:
        """(steps, m) predictions at X after each step 1..steps, the same as ``refit_chain`` returns.

        The kernel product with the eigenvectors is formed once, so a whole chain costs one (m, n) x (n, n)
        product plus O(steps * n * m), instead of ``steps`` calls to :meth:`predict`.
        """
        self._check_fitted()
        X = _as_features("X", X, n_features=self.X_fit_.shape[1])
        _check_steps(steps)
        alpha = _check_alpha(alpha, steps)
        phi = self._gram(X, self.X_fit_) @ self.eigenvectors_
        scalings = np.stack([self._dual_scaling(t, alpha if isinstance(alpha, float) else alpha[: t - 1])
                             for t in range(1, steps + 1)])
        return (scalings * self.projected_targets_) @ phi.T

    # -- Algorithm 1 ------------------------------------------------------------------------------------------
    def optimal_alphas(self, X_val, y_val, steps: int, bounds: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
        """(steps - 1,) alpha*(2..steps) by the paper's Algorithm 1, chosen sequentially on held-out data.

        At step t the fit is linear in alpha: f(t) = alpha f(1) + (1 - alpha) g(t), with g(t) the alpha = 0
        step from the (already distilled) fit t - 1. alpha*(t) minimises the squared error of f(t) on
        (X_val, y_val); the chain then continues from f(t) with alpha*(t). The validation loss is a convex
        quadratic in alpha, so clipping to ``bounds`` gives the constrained optimum; ``bounds=None`` keeps
        the unconstrained least-squares solution.
        """
        self._check_fitted()
        X_val = _as_features("X_val", X_val, n_features=self.X_fit_.shape[1])
        y_val = _as_targets("y_val", y_val, X_val.shape[0])
        _check_steps(steps)

        # Validation outputs of any step are Phi @ (scaling * V^T y): compute Phi once.
        phi = self._gram(X_val, self.X_fit_) @ self.eigenvectors_
        denominator = self.eigenvalues_ + self.lam
        f1 = phi @ (self.projected_targets_ / denominator)
        b = self._shrinkage()  # B(1)
        alphas = np.empty(steps - 1)
        for i in range(steps - 1):
            g = phi @ (b * self.projected_targets_ / denominator)  # alpha = 0 step from the current fit
            alphas[i] = least_squares_alpha(y_val, f1, g, bounds=bounds)
            b = self._shrinkage() * ((1.0 - alphas[i]) * b + alphas[i])
        return alphas


# ---------------------------------------------------------------------------------------------------------
# the reference: explicit refitting
# ---------------------------------------------------------------------------------------------------------
def refit_chain(X, y, X_new, steps: int, alpha: Alpha, *, lam: float, kernel: Kernel = "rbf", gamma: float = 1.0,
                degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(steps, m) predictions at X_new after each step 1..steps, by literally refitting.

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
    predictions = np.empty((steps, X_new.shape[0]))
    targets = y
    for t in range(steps):
        coef = np.linalg.solve(regularized, targets)
        predictions[t] = K_new @ coef
        if t < steps - 1:
            targets = alphas[t] * y + (1.0 - alphas[t]) * (K @ coef)
    return predictions


def toy_data() -> tuple[np.ndarray, np.ndarray]:
    """The paper's toy problem: X = 0, 0.1, ..., 1.0 (11,) and y = sin(2 pi x) plus noise (11,).

    The values of the authors' public toy example (used with an RBF kernel, gamma = 80, lambda = 0.2).
    """
    X = np.linspace(0.0, 1.0, 11)
    y = np.array([0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.6920159488889518,
                  -0.29756145531871736, -0.24189291901377769, -0.7964485769175675, -0.9616480167034174,
                  -0.49672509509916934, -0.3469066003991437, 0.5589512650600734])
    return X, y
