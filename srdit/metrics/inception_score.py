"""Inception Score over splits, as ADM computes it (improved-GAN's definition).

For each consecutive split of `split_size` samples (the last may be shorter):
IS = exp(mean_i KL(p(y|x_i) || p(y))), p(y) the split's mean prediction; the score is the mean
over splits. Computed in float64 from logits with log-softmax, so no probability underflows.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score needs (N, classes) logits; got shape {logits.shape}")
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = log_softmax(logits[start:start + split_size], axis=1)
        log_marginal = np.log(np.exp(log_p).mean(axis=0, keepdims=True))
        kl = (np.exp(log_p) * (log_p - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))
