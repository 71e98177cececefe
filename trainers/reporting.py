"""Where rank 0's figures go while it trains: each sink behind ``log(metrics, step)`` and ``close()``.

- ``LogLines``: a timestamped log line every few iterations and after every evaluation (what CI and
  files show; the runner shows a progress bar instead when its output is a terminal);
- ``ProgressFile``: ``progress.json`` in the run directory, at most twice a second, which the
  runner turns into that progress bar;
- ``EvalHistory``: one JSON line per evaluation in ``metrics.jsonl``;
- ``TensorBoard``: event files in ``tensorboard/`` (config key ``tensorboard``), the same scalars.

Training figures are logged under ``train/``, evaluations under ``eval/``.
"""

from __future__ import annotations

import json
import logging
import time

from bagpipe.rundir import RunDir

log = logging.getLogger("bagpipe")


class Sink:
    def log(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LogLines(Sink):
    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.every = max(1, iterations // 20)

    def log(self, metrics: dict, step: int) -> None:
        if "eval/auc" in metrics:
            log.info("eval after iteration %d: AUC %.4f, logloss %.4f nats, NE %.4f", step, metrics["eval/auc"],
                     metrics["eval/logloss"], metrics["eval/ne"])
        elif (step + 1) % self.every == 0 or step + 1 == self.iterations:
            log.info("iteration %d/%d  %.0f samples/s  loss %.4f  hit rate %.1f%%  stalled %.2fs  ETA %.0fs",
                     step + 1, self.iterations, metrics["train/samples_per_s"], metrics["train/loss_mean"],
                     100 * metrics["train/hit_rate"], metrics["train/stall_s"], metrics["train/eta_s"])


class ProgressFile(Sink):
    INTERVAL_S = 0.5

    def __init__(self, run: RunDir, iterations: int) -> None:
        self.run, self.iterations, self.last = run, iterations, 0.0
        self.state: dict = {"iterations": iterations}

    def log(self, metrics: dict, step: int) -> None:
        self.state.update(metrics, iteration=step + 1)
        now = time.monotonic()
        if now - self.last >= self.INTERVAL_S or step + 1 == self.iterations or "eval/auc" in metrics:
            self.run.write_progress(self.state)
            self.last = now


class EvalHistory(Sink):
    def __init__(self, run: RunDir) -> None:
        self.run = run

    def log(self, metrics: dict, step: int) -> None:
        if "eval/auc" in metrics:
            self.run.append_eval({"iteration": step, **{k[5:]: v for k, v in metrics.items() if k.startswith("eval/")}})


class TensorBoard(Sink):
    def __init__(self, run: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Sinks(Sink):
    """Every sink at once."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict, step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def rank0_sinks(run: RunDir, iterations: int, tensorboard: bool) -> Sinks:
    sinks: list[Sink] = [LogLines(iterations), ProgressFile(run, iterations), EvalHistory(run)]
    if tensorboard:
        sinks.append(TensorBoard(run))
    return Sinks(sinks)
