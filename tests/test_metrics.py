"""One AUC, one logloss, one NE: bagpipe.metrics, held to the rank statistic it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bagpipe.metrics import auc, evaluation, logloss, normalized_entropy


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The project's earlier AUC: the Mann-Whitney rank statistic with tied scores given average ranks."""
    labels = labels.astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 400), levels=st.sampled_from([2, 5, 50, 0]))
def test_auc_equals_the_rank_statistic_ties_included(seed, n, levels):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    if levels:  # few distinct scores: many ties
        scores = (np.floor(scores * levels) / levels).astype(np.float32)
    # torchmetrics builds its ROC curve in float32 (cumulative counts divided by the totals), so the
    # two agree to float32 rounding, not to the last bit of a float64.
    assert auc(labels, scores) == pytest.approx(rank_auc(labels, scores), abs=2e-7)


def test_auc_of_a_perfect_a_reversed_and_a_one_class_ranking():
    y = np.array([0, 0, 1, 1], np.float32)
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(np.ones(4), np.arange(4.0)) == 0.5


def test_normalized_entropy_is_one_for_the_base_rate_and_below_for_a_better_model():
    y = np.array([1, 0, 0, 0] * 50, np.float32)
    assert normalized_entropy(y, np.full(len(y), 0.25)) == pytest.approx(1.0, abs=1e-6)
    better = np.where(y == 1, 0.6, 0.1)
    assert normalized_entropy(y, better) < 1.0
    assert math.isinf(normalized_entropy(np.zeros(3), np.full(3, 0.5)))
    assert logloss(y, np.full(len(y), 0.25)) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                                               abs=1e-6)
    assert set(evaluation(y, better)) == {"eval_auc", "eval_logloss", "eval_ne", "eval_samples"}
