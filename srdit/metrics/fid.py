"""Frechet distance between Gaussian fits of features: FID (pool_3) and sFID (mixed_6/conv).

Follows ADM's evaluator (itself TTUR's): statistics in float64 (`np.cov`, unbiased), the matrix
square root by `scipy.linalg.sqrtm`, an eps on the diagonals only when the product is singular,
and an error when the root has a non-negligible imaginary part.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of (N, D) features; sigma is the unbiased covariance."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features; got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Frechet distance: statistics of different sizes, mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; were both made by the same feature layer?")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: the matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are badly conditioned "
                             f"(too few samples for the feature width?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_method(num_features: int, dim: int) -> str:
    return "scipy.linalg.sqrtm (ADM)" if num_features - 1 >= dim else "exact low-rank form (N - 1 < D)"


def frechet_distance_to_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Frechet distance of a feature set (N, D) to reference statistics.

    With N - 1 >= D (the 50K-sample case) this is ADM's computation. With fewer samples than
    feature dimensions (tests, CPU demos) the sample covariance is A^T A with A the centred
    features / sqrt(N - 1), and S A^T A shares its nonzero eigenvalues with A S A^T, a small
    symmetric PSD (N, N) matrix: Tr (S_gen S_ref)^(1/2) = sum sqrt(eig(A S_ref A^T)) exactly, at
    a fraction of the cost of a 2048 x 2048 `sqrtm` on a singular product.
    """
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    mu, sigma = feature_statistics(features)
    if n - 1 >= d:
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if mu_ref.shape != (d,) or sigma_ref.shape != (d, d):
        raise ValueError(f"Frechet distance: features of width {d} against statistics {mu_ref.shape}, "
                         f"{sigma_ref.shape}; were both made by the same feature layer?")
    a = (features - mu) / np.sqrt(n - 1)
    inner = a @ sigma_ref @ a.T
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu - mu_ref
    return float(diff.dot(diff) + (a * a).sum() + np.trace(sigma_ref) - 2.0 * tr_covmean)
