"""``curves.png``: a run's training loss and its evaluations (logloss, NE, AUC) against iterations."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_curves(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.asarray(metrics.get("loss_per_iteration", []), np.float64)
    first = (metrics.get("resumed_from") or -1) + 1
    evals = metrics.get("eval_history", [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if len(loss):
        x = np.arange(first, first + len(loss))
        a.plot(x, loss, linewidth=0.6, alpha=0.5, label="train loss (rank 0, per iteration)")
        w = max(1, len(loss) // 20)
        if len(loss) >= w:
            a.plot(x[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"train loss ({w}-iteration mean)")
    if evals:
        it = [e["iteration"] for e in evals]
        a.plot(it, [e["eval_logloss"] for e in evals], "o-", label="eval logloss")
        b.plot(it, [e["eval_ne"] for e in evals], "o-", label="eval NE")
        b.plot(it, [e["eval_auc"] for e in evals], "s-", label="eval AUC")
    a.set_xlabel("iteration")
    a.set_ylabel("logloss (nats)")
    a.legend(fontsize=8)
    b.set_xlabel("iteration")
    b.set_title("evaluations")
    b.legend(fontsize=8)
    fig.suptitle(f"policy {metrics.get('policy')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
