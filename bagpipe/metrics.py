"""Evaluation metrics, one definition each: AUC, logloss (nats) and normalized entropy.

AUC is torchmetrics' exact ``binary_auroc`` (no thresholds: every distinct
score is a threshold, tied scores count half), which equals the rank
statistic with averaged ranks. Logloss is the mean binary cross-entropy in
nats (torchrec reports bits). Normalized entropy (NE, the metric Meta's
papers and torchrec read first) is the logloss divided by the entropy of a
predictor that always says the base rate: below 1 means the model knows
more than the click rate alone.
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties averaged); 0.5 when one class is missing."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    labels = np.asarray(labels)
    pos = int(np.count_nonzero(labels))
    if pos == 0 or pos == len(labels):
        return 0.5
    value = binary_auroc(torch.from_numpy(np.asarray(scores, np.float64)),
                         torch.from_numpy(labels.astype(np.int64)), thresholds=None)
    return float(value)


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy in nats (eps keeps log finite at probabilities of 0 and 1)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    return float(-np.mean(y * np.log(p + _EPS) + (1 - y) * np.log(1 - p + _EPS)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Logloss over the entropy of the base click rate (NE); inf when the labels hold one class."""
    y = np.asarray(labels, np.float64)
    ctr = float(np.mean(y)) if len(y) else 0.0
    if ctr <= 0.0 or ctr >= 1.0:
        return math.inf
    base = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    return logloss(labels, probs) / base


def evaluation(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The evaluation figures every report carries."""
    return {"eval_auc": auc(labels, probs), "eval_logloss": logloss(labels, probs),
            "eval_ne": normalized_entropy(labels, probs), "eval_samples": int(len(labels))}
