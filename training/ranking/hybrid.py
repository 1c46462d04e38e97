"""The hybrid ranker: per binary head, ``sigmoid(a * deep_logit + w * gbdt_margin + b)``, a logistic blend of
the deep multi-task model and that head's GBDT fitted on the validation period. It also is the head's
calibration (the deep-only case is Platt scaling, ``w = 0``).

A head uses the blend only where it helps out of sample: the validation users are split in two halves, the
blend is fitted on each and scored on the other, and its AUC there, averaged over the two halves, must beat
the deep model's on the same halves (the GBDT is early-stopped on the same period, so an in-sample
comparison would flatter it; pooling the two halves' scores would mix two fits' intercepts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from training.ranking.metrics import auc


@dataclass
class HeadBlend:
    scale: float  # on the deep logit
    weight: float  # on the GBDT margin (0: deep only)
    bias: float
    # validation AUCs, each the mean over two halves of the validation users (the blend fitted on the other half)
    valid_auc_deep: float
    valid_auc_gbdt: float
    valid_auc_blend: float
    used: bool

    def to_json(self) -> dict[str, float | bool]:
        return asdict(self)


def logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) of a logistic regression of y on the columns of x, all but unregularised."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1e4, max_iter=500).fit(x, y)
    return m.coef_[0].astype(np.float64), float(m.intercept_[0])


def fit_blend(logit: np.ndarray, margin: np.ndarray, y: np.ndarray, users: np.ndarray, seed: int,
              min_gain: float = 0.0) -> HeadBlend | None:
    """The head's blend on validation rows, or None when the rows cannot fit one (one class, non-finite
    inputs): the caller then calibrates the deep model alone."""
    ok = np.isfinite(logit) & np.isfinite(margin) & np.isfinite(y)
    logit, margin, y, users = logit[ok], margin[ok], y[ok], users[ok]
    if len(y) == 0 or y.min() == y.max():
        return None
    x = np.stack([logit, margin], axis=1).astype(np.float64)
    _, inv = np.unique(users, return_inverse=True)
    half = np.random.default_rng(seed).permutation(inv.max() + 1)[inv] % 2
    per_half = []
    for h in (0, 1):
        fit, out = half == h, half != h
        if y[fit].min() == y[fit].max() or y[out].min() == y[out].max():
            return None
        coef, b = logistic(x[fit], y[fit])
        per_half.append((auc(y[out], logit[out]), auc(y[out], margin[out]), auc(y[out], x[out] @ coef + b)))
    coef, b = logistic(x, y)
    deep, gbdt, blend = (float(v) for v in np.mean(per_half, axis=0))
    used = bool(np.isfinite(blend) and blend > deep + min_gain and coef[0] > 0 and np.isfinite(coef).all())
    return HeadBlend(float(coef[0]), float(coef[1]), b, deep, gbdt, blend, used)
