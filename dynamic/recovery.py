"""Support recovery from sketches: which k units carry the energy, given y = Phi e.

Methods (scikit-learn, the `dynamic` extra):
- "omp":   orthogonal matching pursuit with min(k, m) atoms (Tropp & Gilbert 2007: exact
           recovery of a k-sparse vector w.h.p. once m ~ C k log(n / k) Gaussian measurements);
- "lasso": non-negative Lasso (energies are >= 0), alpha a fixed fraction of the smallest
           alpha that zeroes every coefficient, so the result does not depend on e's scale.

A support needs k units even when m < k: units beyond the recovered coefficients are ranked by
the back-projection Phi^T y (the matched-filter estimate of e), then the top k are taken,
balanced over the norm groups (units.top_k_balanced).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .units import top_k_balanced

METHODS = ("omp", "lasso")
LASSO_ALPHA = 1e-3          # fraction of alpha_max


def sklearn_linear_model():
    try:
        import sklearn.linear_model as lm
    except ImportError as e:  # optional dependency
        raise ImportError("sparse recovery needs scikit-learn: pip install 'dfplan[dynamic]'") from e
    return lm


def recover(phi: torch.Tensor, y: torch.Tensor, k: int, method: str = "omp") -> torch.Tensor:
    """Estimated coefficients (n,) float64 of e from y = Phi e, at most min(k, m) nonzero (OMP)."""
    if method not in METHODS:
        raise ValueError(f"recovery method {method!r} is not one of {METHODS}")
    lm = sklearn_linear_model()
    A = phi.double().numpy()
    b = y.double().numpy()
    m, n = A.shape
    if not np.any(b):
        return torch.zeros(n, dtype=torch.float64)
    with warnings.catch_warnings():
        # OMP stops early when the residual vanishes; the coefficients found are still exact
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        if method == "omp":
            est = lm.OrthogonalMatchingPursuit(n_nonzero_coefs=max(1, min(k, m, n)),
                                               fit_intercept=False)
        else:
            alpha_max = float(np.abs(A.T @ b).max()) / m   # sklearn's objective: 1/(2m)||.||^2
            est = lm.Lasso(alpha=LASSO_ALPHA * alpha_max, fit_intercept=False, positive=True,
                           max_iter=5000, tol=1e-6)
        est.fit(A, b)
    return torch.from_numpy(np.asarray(est.coef_, dtype=np.float64).copy())


def support_from_coef(coef: torch.Tensor, k: int, balance: int = 1,
                      fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k units by recovered coefficient; ties (all the zeros) broken by `fallback`."""
    score = coef.double().clone()
    if fallback is not None:
        # nonzero coefficients first (in their order), then the rest by the fallback ranking
        fb = fallback.double()
        span = float(fb.max() - fb.min()) or 1.0
        ranked = (fb - fb.min()) / span                      # in [0, 1]
        big = float(score.abs().max()) or 1.0
        score = torch.where(score > 0, 2.0 + score / big, ranked)
    return top_k_balanced(score, k, balance)


def recover_support(phi: torch.Tensor, y: torch.Tensor, k: int, method: str = "omp",
                    balance: int = 1) -> torch.Tensor:
    """Sorted indices of the k units estimated to carry the most energy."""
    coef = recover(phi, y, k, method)
    return support_from_coef(coef, k, balance, fallback=phi.double().T @ y.double())
