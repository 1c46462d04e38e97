"""The hybrid ranker: per binary head, ``sigmoid(a * deep_logit + w * gbdt_margin + b)``, a logistic blend of
the deep multi-task model and that head's GBDT fitted on the validation period. It also is the head's
calibration (the deep-only case is Platt scaling, ``w = 0``).

A head uses the blend only where it helps out of sample: the validation users are split in two halves, the
blend is fitted on each and scored on the other, and its AUC there, averaged over the two halves, must beat
the deep model's on the same halves (the GBDT is early-stopped on the same period, so an in-sample
comparison would flatter it; pooling the two halves' scores would mix two fits' intercepts).

Where the full fit would weigh the deep logit <= 0, the head serves its GBDT alone (``scale = 0``), judged
by the GBDT's cross-fitted AUC. On a rare head (a few dozen validation positives) that mean gain is mostly
noise, so such a head must also show it is real: the paired user-bootstrap 95% interval of the
cross-fitted gain (served AUC - deep AUC, each resample scoring both halves, averaged like the gain) must
lie above zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from features.metrics import percentile_interval
from training.ranking.metrics import auc, grouped_auc, score_groups, user_resamples


@dataclass
class HeadBlend:
    scale: float  # on the deep logit (0: the GBDT alone)
    weight: float  # on the GBDT margin (0: deep only)
    bias: float
    # validation AUCs, each the mean over two halves of the validation users (the blend fitted on the other half)
    valid_auc_deep: float
    valid_auc_gbdt: float
    valid_auc_blend: float  # of what is served: the blend, or the GBDT alone where scale = 0
    used: bool
    # paired user-bootstrap 95% interval of valid_auc_blend - valid_auc_deep (computed for rare heads only)
    valid_gain_ci95: tuple[float, float] | None = None

    def to_json(self) -> dict[str, float | bool]:
        return asdict(self)


def logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) of a logistic regression of y on the columns of x, all but unregularised."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1e4, max_iter=500).fit(x, y)
    return m.coef_[0].astype(np.float64), float(m.intercept_[0])


def fit_blend(logit: np.ndarray, margin: np.ndarray, y: np.ndarray, users: np.ndarray, seed: int,
              min_gain: float = 0.0, interval_samples: int = 0) -> HeadBlend | None:
    """The head's blend on validation rows, or None when the rows cannot fit one (one class, non-finite
    inputs): the caller then calibrates the deep model alone. With ``interval_samples`` (a rare head) the
    blend is used only if the paired bootstrap interval of its cross-fitted gain lies above zero."""
    ok = np.isfinite(logit) & np.isfinite(margin) & np.isfinite(y)
    logit, margin, y, users = logit[ok], margin[ok], y[ok], users[ok]
    if len(y) == 0 or y.min() == y.max():
        return None
    x = np.stack([logit, margin], axis=1).astype(np.float64)
    _, inv = np.unique(users, return_inverse=True)
    half = np.random.default_rng(seed).permutation(inv.max() + 1)[inv] % 2
    per_half, crossed = [], np.zeros(len(y))  # crossed: each row's blend score from the other half's fit
    for h in (0, 1):
        fit, out = half == h, half != h
        if y[fit].min() == y[fit].max() or y[out].min() == y[out].max():
            return None
        coef, b = logistic(x[fit], y[fit])
        crossed[out] = x[out] @ coef + b
        per_half.append((auc(y[out], logit[out]), auc(y[out], margin[out]), auc(y[out], crossed[out])))
    coef, b = logistic(x, y)
    deep, gbdt, blend = (float(v) for v in np.mean(per_half, axis=0))
    served = crossed
    if not coef[0] > 0:
        # The deep logit would enter reversed: serve the head's GBDT alone (calibrated), whose cross-fitted
        # AUC needs no fit (a monotone calibration keeps the order).
        w, b = logistic(margin.reshape(-1, 1).astype(np.float64), y)
        coef, blend, served = np.array([0.0, w[0]]), gbdt, margin
    used = bool(np.isfinite(blend) and blend > deep + min_gain and coef[1] > 0 and np.isfinite(coef).all())
    ci = None
    if interval_samples > 0:
        ci = cross_fitted_gain_interval(y, logit, served, half, users, interval_samples, seed)
        used = used and ci[0] > 0
    return HeadBlend(float(coef[0]), float(coef[1]), b, deep, gbdt, blend, used, ci)


def cross_fitted_gain_interval(y: np.ndarray, deep: np.ndarray, blend: np.ndarray, half: np.ndarray,
                               users: np.ndarray, samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over the two halves of AUC(blend) - AUC(deep) under user-bootstrap
    resamples (each half's AUCs on its own rows: the halves' blends have different intercepts)."""
    y = np.asarray(y).astype(bool)
    parts = [(y[half == h], score_groups(deep[half == h]), score_groups(blend[half == h]), half == h) for h in (0, 1)]
    gains = []
    for w in user_resamples(users, samples, seed):
        g = np.mean([grouped_auc(yh, gb, w[m]) - grouped_auc(yh, gd, w[m]) for yh, gd, gb, m in parts])
        if np.isfinite(g):
            gains.append(float(g))
    return percentile_interval(gains, level)
