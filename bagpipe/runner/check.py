"""``bagpipe check``: every cached run must train the model synchronous training trains.

Like for like, bit for bit. Each variation (policy, capacity, lead and
horizon, shards, cluster, optimizer, model, fault) is compared with the
synchronous reference of the SAME trainer count: policy ``local`` with N
trainers, the same data and the same reduction order (each rank sums its
samples, the all-reduce adds the ranks' sums). Any bit that differs, in any
dense parameter or any touched row's weights or optimizer state, is a
failure. For N = 1 the reference is ``local`` in one process. References are
trained once per (trainer count, model, optimizer) and reused.

N trainers against one process is data-parallel drift, not a bug: the order
of float sums differs and the dense Adagrad turns a last-bit difference into
a full step, so parameters diverge chaotically. It is reported apart, by
train and eval logloss and eval AUC side by side over the run, and judged
by the eval AUC: the two must agree within ``DRIFT_SE`` standard errors
(Hanley and McNeil) of the eval sets they were measured on (see
docs/consistency.md).

Planted mutants (a trainer that skips the gradient combine, one that fetches
before its write-backs have landed) must be caught: the harness fails if a
mutant passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bagpipe.config import ConfigError, RunConfig, add_set_argument
from bagpipe.dataset import Dataset
from bagpipe.keys import batch_keys, distinct_rows_per_trainer
from bagpipe.log import init_logger

log = logging.getLogger("bagpipe")

DRIFT_SE = 3.0  # N trainers vs one process: |AUC_N - AUC_1| within this many standard errors


@dataclass
class Variation:
    name: str
    overrides: dict
    mutant: str = ""  # a planted bug the harness must catch
    fault: str = ""  # an injected fault (bagpipe.faults): harmless, or caught with an error saying ...
    caught_by: str = ""  # ... this (empty: the model must equal the reference)

    def trainers(self, base: RunConfig) -> int:
        return int(self.overrides.get("trainers", base.trainers))


@dataclass
class Comparison:
    max_abs: dict[str, float] = field(default_factory=dict)
    max_rel: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    def worst_rel(self) -> float:
        return max(self.max_rel.values(), default=0.0)

    def worst_abs(self) -> float:
        return max(self.max_abs.values(), default=0.0)


def compare_models(ref: dict, got: dict) -> Comparison:
    """Per table and for the dense parameters: largest absolute and relative differences."""
    cmp = Comparison()
    dense_abs, dense_rel = 0.0, 0.0
    for name, tensor in ref["dense"].items():
        other = got["dense"].get(name)
        if other is None or other.shape != tensor.shape:
            cmp.problems.append(f"dense tensor {name} missing or of another shape")
            continue
        a, r = _diff(tensor, other)
        dense_abs, dense_rel = max(dense_abs, a), max(dense_rel, r)
    cmp.max_abs["dense"], cmp.max_rel["dense"] = dense_abs, dense_rel
    for table, ref_rows in ref["tables"].items():
        got_rows = got["tables"].get(table)
        if got_rows is None:
            cmp.problems.append(f"table {table} missing")
            continue
        if not torch.equal(ref_rows["ids"], got_rows["ids"]):
            missing = np.setdiff1d(ref_rows["ids"].numpy(), got_rows["ids"].numpy())
            extra = np.setdiff1d(got_rows["ids"].numpy(), ref_rows["ids"].numpy())
            cmp.problems.append(f"table {table}: touched rows differ ({len(missing)} missing, {len(extra)} extra)")
            continue
        cmp.rows += len(ref_rows["ids"])
        a1, r1 = _diff(ref_rows["weights"], got_rows["weights"])
        a2, r2 = _diff(ref_rows["state"], got_rows["state"])
        cmp.max_abs[table], cmp.max_rel[table] = max(a1, a2), max(r1, r2)
    return cmp


def _diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    if ref.numel() == 0:
        return 0.0, 0.0
    d = (ref.double() - got.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return d, (d / scale if scale > 0 else d)


def identical(ref: dict, got: dict) -> bool:
    """Every dense tensor and every table's ids, weights and state equal bit for bit (torch.equal)."""
    if ref["dense"].keys() != got["dense"].keys() or ref["tables"].keys() != got["tables"].keys():
        return False
    if not all(torch.equal(t, got["dense"][k]) for k, t in ref["dense"].items()):
        return False
    return all(torch.equal(rows[f], got["tables"][table][f])
               for table, rows in ref["tables"].items() for f in ("ids", "weights", "state"))


def verdict(cmp: Comparison, ref: dict, got: dict) -> bool:
    return not cmp.problems and identical(ref, got)


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley and McNeil (1982): the standard error of an AUC measured on these many of each class."""
    if positives < 1 or negatives < 1:
        return float("inf")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return float(np.sqrt(max(var, 0.0)))


def eval_classes(cfg: RunConfig, trainers: int, eval_rows: int) -> tuple[int, int]:
    """Positives and negatives in the eval samples rank 0 scores with ``trainers`` trainers
    (it reads ``eval_batches`` batches of its own batch size, batch_size / trainers)."""
    ds = Dataset(cfg.data)
    cfg = cfg.replace(eval_batches=max(cfg.eval_batches, -(-eval_rows // max(1, cfg.batch_size // trainers))))
    local_b = cfg.batch_size // trainers
    if ds.num_rows("eval") < local_b:
        return 0, 0
    reader = ds.batches(local_b, seed=cfg.seed, shuffle=False, split="eval")
    labels = np.concatenate([reader[j].labels for j in range(min(len(reader), cfg.eval_batches))])
    pos = int((labels > 0.5).sum())
    return pos, int(len(labels) - pos)


def drift_row(cfg: RunConfig, n: int, one: dict, many: dict, eval_rows: int) -> dict:
    """N trainers against one process, by metrics: eval AUC within DRIFT_SE standard errors."""
    row = {"variation": f"DRIFT trainers={n} vs one process", "exact": False, "mutant": "", "fault": "",
           "drift": True, "rows": 0, "max_abs": {}, "max_rel": {}}
    for key in ("train_logloss", "eval_logloss", "eval_auc"):
        row[key] = [one.get(key), many.get(key)]
    row["eval_history"] = [one.get("eval_history", []), many.get("eval_history", [])]
    a1, an = one.get("eval_auc"), many.get("eval_auc")
    if a1 is None or an is None:
        row.update(ok=False, passed=False, error="no eval AUC (the eval split is smaller than a batch, "
                                                 "config key 'eval_batches')")
        return row
    se = float(np.hypot(auc_standard_error(a1, *eval_classes(cfg, 1, eval_rows)),
                        auc_standard_error(an, *eval_classes(cfg, n, eval_rows))))
    row.update(auc_se=se, auc_diff=abs(an - a1), bound=DRIFT_SE * se)
    row["ok"] = row["passed"] = bool(abs(an - a1) <= DRIFT_SE * se)
    return row


def matrix(name: str, base: RunConfig, min_cache: dict[int, int], all_rows: int,
           bags_data: str | None = None) -> list[Variation]:
    """The variations to run; ``small`` fits in make test, ``full`` covers every axis."""
    v = [Variation(f"policy={p}", {"policy": p, "trainers": 1})
         for p in ("none", "lru", "lfu", "lru-prefetch", "static", "bagpipe", "bagpipe-original")]
    v += [
        Variation("bagpipe trainers=2", {"policy": "bagpipe", "trainers": 2}),
        Variation("bagpipe trainers=3", {"policy": "bagpipe", "trainers": 3}),
        Variation(f"bagpipe cache_rows={min_cache[2]} (one batch)", {"policy": "bagpipe", "trainers": 2,
                                                                    "cache_rows": min_cache[2]}),
        Variation(f"bagpipe cache_rows={all_rows} (all fit)", {"policy": "bagpipe", "trainers": 1, "cache_rows": all_rows}),
        Variation("bagpipe lead=0 horizon=0", {"policy": "bagpipe", "trainers": 1, "lead": 0, "horizon": 0}),
        Variation("bagpipe lead=4 horizon=16", {"policy": "bagpipe", "trainers": 2, "lead": 4, "horizon": 16}),
        # Two partitions, one planned by the oracle and one by a worker process (two oracle processes).
        Variation("bagpipe oracle_partitions=2 oracle_workers=1", {"policy": "bagpipe", "trainers": 2,
                                                                   "oracle_partitions": 2, "oracle_workers": 1}),
        Variation("bagpipe shards=1", {"policy": "bagpipe", "trainers": 1, "shards": 1}),
        Variation("bagpipe shards=3", {"policy": "bagpipe", "trainers": 2, "shards": 3}),
        Variation("bagpipe optimizer=sgd", {"policy": "bagpipe", "trainers": 2, "optimizer": "sgd"}),
        Variation("bagpipe model=dcn", {"policy": "bagpipe", "trainers": 1, "model": "dcn"}),
        Variation("bagpipe redis cluster (3 masters)", {"policy": "bagpipe", "trainers": 2, "shards": 3,
                                                        "redis_cluster": True}),
        *([] if bags_data is None else [
            # The base data made multi-hot (bags of 0-3 ids, empty bags, repeats in small tables).
            Variation("bagpipe multi-hot sum", {"policy": "bagpipe", "trainers": 1, "data": bags_data,
                                                "pooling": ("sum",), "cache_rows": 3 * min_cache[1]}),
            Variation("lru multi-hot mean", {"policy": "lru", "trainers": 1, "data": bags_data, "pooling": ("mean",),
                                             "cache_rows": 3 * min_cache[1]}),
        ]),
        Variation("FAULT plan delayed 2s", {"policy": "bagpipe", "trainers": 2}, fault="plan-delay"),
        Variation("FAULT plan duplicated", {"policy": "bagpipe", "trainers": 2}, fault="plan-duplicate",
                  caught_by="arrived when iteration"),
        Variation("FAULT plans reordered", {"policy": "bagpipe", "trainers": 2}, fault="plan-reorder",
                  caught_by="arrived when iteration"),
        Variation("FAULT plan dropped", {"policy": "bagpipe", "trainers": 2}, fault="plan-drop",
                  caught_by="arrived when iteration"),
        Variation("FAULT plan buffer corrupted", {"policy": "bagpipe", "trainers": 2}, fault="plan-corrupt",
                  caught_by="checksum mismatch"),
        Variation("FAULT write-back lands after the next fetch", {"policy": "lru", "trainers": 1,
                                                                   "cache_rows": min_cache[1]},
                  fault="writeback-delay"),
        Variation("FAULT slow store (2 ms a round trip)", {"policy": "bagpipe", "trainers": 2,
                                                         "store_latency_us": 2000}),
        Variation("MUTANT skip gradient combine", {"policy": "bagpipe", "trainers": 2}, mutant="skip-sync"),
        Variation("MUTANT fetch before write-back", {"policy": "lru", "trainers": 1, "cache_rows": min_cache[1]},
                  mutant="fetch-before-writeback"),
    ]
    if name == "full":
        v += [Variation(f"policy={p} trainers=3", {"policy": p, "trainers": 3})
              for p in ("none", "lru", "lfu", "lru-prefetch", "static", "bagpipe-original")]
        v += [
            Variation("bagpipe trainers=3 cache=one batch", {"policy": "bagpipe", "trainers": 3,
                                                                   "cache_rows": min_cache[3]}),
            Variation("bagpipe sgd trainers=3 lead=1", {"policy": "bagpipe", "trainers": 3, "optimizer": "sgd", "lead": 1, "horizon": 2}),
            Variation("bagpipe dcn trainers=2", {"policy": "bagpipe", "trainers": 2, "model": "dcn"}),
            Variation("bagpipe oracle_partitions=4 trainers=3", {"policy": "bagpipe", "trainers": 3,
                                                                 "oracle_partitions": 4}),
        ]
    return v


def _sizes(cfg: RunConfig, trainer_counts: tuple[int, ...]) -> tuple[dict[int, int], int]:
    """The smallest workable cache per trainer count (the most distinct rows one trainer reads in
    one iteration) and the distinct rows of the whole run, for this config's batches."""
    sparse = Dataset(cfg.data).sparse_batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
    iterations = cfg.iterations or len(sparse)
    most = {n: 0 for n in trainer_counts}
    seen: set[int] = set()
    for i in range(iterations):
        rows = sparse[i]
        for n in trainer_counts:
            most[n] = max(most[n], int(distinct_rows_per_trainer(rows, n, sparse.column_tables).max()))
        keys = batch_keys(rows, sparse.column_tables)
        seen.update(np.unique(keys[keys >= 0]).tolist())
    return most, len(seen)


def run_check(cfg: RunConfig, matrix_name: str, work: Path, only: list[str] | None = None,
              eval_rows: int = 2048) -> list[dict]:
    from bagpipe.runner.export import load_model
    from bagpipe.runner.job import run_job

    min_cache, all_rows = _sizes(cfg, (1, 2, 3))
    results = []
    references: dict[tuple, tuple[dict, dict]] = {}

    def reference(trainers: int, model: str, optimizer: str, data: str | None = None,
                  pooling: tuple[str, ...] | None = None) -> tuple[dict, dict]:
        """Policy local with this many trainers (same data, same reduction order): model, metrics."""
        data, pooling = data or cfg.data, pooling or cfg.pooling
        key = (trainers, model, optimizer, data, pooling)
        if key not in references:
            rd = work / f"reference-{len(references)}-t{trainers}-{model}-{optimizer}"
            # Enough eval samples for the drift's standard error (evaluation reads the model, never
            # changes it; the bitwise comparison would show it if it did).
            eval_batches = max(cfg.eval_batches, -(-eval_rows // max(1, cfg.batch_size // trainers)))
            metrics = run_job(cfg.replace(policy="local", trainers=trainers, model=model, optimizer=optimizer,
                                          eval_batches=eval_batches, data=data, pooling=pooling), rd, quiet=True)
            references[key] = (load_model(rd), metrics)
        return references[key]

    bags_data = None
    if not Dataset(cfg.data).multi_hot:  # one-hot data: check its multi-hot twin as well
        from data.multihot import MultiHotConfig, materialize

        bags = work / "multi-hot-data"
        if not (bags / "meta.json").exists():
            materialize(MultiHotConfig(Path(cfg.data), bags, (3,) * len(Dataset(cfg.data).tables), "uniform", 0))
        bags_data = str(bags)

    for n, var in enumerate(matrix(matrix_name, cfg, min_cache, all_rows, bags_data)):
        if only and not any(o in var.name for o in only):
            continue
        rd = work / f"variation-{n:02d}"
        error = ""
        try:
            vcfg = cfg.replace(**var.overrides)
        except ConfigError as exc:  # this base config cannot make that variation
            results.append({"variation": var.name, "exact": False, "mutant": var.mutant, "fault": var.fault,
                            "ok": False, "passed": False, "error": str(exc), "rows": 0, "max_abs": {}, "max_rel": {}})
            log.info("%-45s FAILED: %s", var.name, exc)
            continue
        try:
            with _environment(BAGPIPE_MUTANT=var.mutant, BAGPIPE_FAULT=var.fault):
                run_job(vcfg, rd, quiet=True)
        except Exception as exc:  # a run that stops with an error is a verdict too
            error = str(exc)
        row = {"variation": var.name, "exact": True, "trainers": vcfg.trainers, "mutant": var.mutant,
               "fault": var.fault}
        if error:
            row.update(ok=False, error=_first_reason(error, var.caught_by), rows=0, max_abs={}, max_rel={})
        else:
            ref, _ = reference(vcfg.trainers, vcfg.model, vcfg.optimizer, vcfg.data, vcfg.pooling)
            got = load_model(rd)
            cmp = compare_models(ref, got)
            row.update(ok=verdict(cmp, ref, got), rows=cmp.rows, max_abs=cmp.max_abs, max_rel=cmp.max_rel,
                       problems=cmp.problems)
        if var.mutant:  # a mutant passes the check only by being caught
            row["passed"] = not row["ok"]
        elif var.caught_by:  # a fault that must stop the job, saying why
            row["passed"] = bool(error) and var.caught_by in error
        else:
            row["passed"] = row["ok"]
        results.append(row)
        log.info("%-45s %s", var.name, "ok" if row["passed"] else "FAILED")
    # Data-parallel drift: every trainer count the matrix ran, against one process, by metrics.
    base = (cfg.model, cfg.optimizer, cfg.data, cfg.pooling)
    counts = sorted({key[0] for key in references if key[0] > 1 and key[1:] == base})
    if counts:
        _, one = reference(1, *base)
        for t in counts:
            row = drift_row(cfg, t, one, references[(t, *base)][1], eval_rows)
            results.append(row)
            log.info("%-45s %s", row["variation"], "ok" if row["passed"] else "FAILED")
    return results


@contextlib.contextmanager
def _environment(**values: str):
    """Set (non-empty) or clear environment variables for the jobs started inside."""
    before = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_reason(error: str, wanted: str) -> str:
    """The line of a job's error that says why it stopped (the wanted one, if there)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    for ln in lines:
        if wanted and wanted in ln:
            return ln[:160]
    return lines[0][:160] if lines else ""


def format_table(results: list[dict]) -> str:
    lines = [f"{'variation':<45} {'rows':>7} {'dense abs':>10} {'dense rel':>10} {'tables abs':>10} "
             f"{'tables rel':>10}  verdict"]
    for r in results:
        if r.get("drift"):
            continue
        tables_abs = max((v for k, v in r["max_abs"].items() if k != "dense"), default=0.0)
        tables_rel = max((v for k, v in r["max_rel"].items() if k != "dense"), default=0.0)
        if r["mutant"]:
            word = "caught" if r["passed"] else "MUTANT NOT CAUGHT"
        elif r.get("fault") and r.get("error"):
            word = (f"stopped: {r['error']}" if r["passed"] else f"FAILED: {r['error']}")
        elif r["passed"]:
            word = f"identical to local trainers={r.get('trainers', 1)}"
        else:
            word = "FAILED" + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"{r['variation']:<45} {r['rows']:>7} {r['max_abs'].get('dense', 0):>10.2e} "
                     f"{r['max_rel'].get('dense', 0):>10.2e} {tables_abs:>10.2e} {tables_rel:>10.2e}  {word}")
    drift = [r for r in results if r.get("drift")]
    if drift:
        lines += ["", "Data-parallel drift (N trainers vs one process; reported by metrics, not parameters):",
                  f"{'':<45} {'train logloss':>17} {'eval logloss':>17} {'eval AUC':>17}  verdict"]
        for r in drift:
            cells = [" / ".join("n/a" if v is None else f"{v:.4f}" for v in r[k])
                     for k in ("train_logloss", "eval_logloss", "eval_auc")]
            word = (f"ok: |dAUC| {r['auc_diff']:.4f} <= {DRIFT_SE:g} SE = {r['bound']:.4f}" if r["passed"] else
                    f"FAILED: " + (r.get("error") or f"|dAUC| {r['auc_diff']:.4f} > {DRIFT_SE:g} SE = {r['bound']:.4f}"))
            lines.append(f"{r['variation']:<45} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17}  {word}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    add_set_argument(parser)
    parser.add_argument("--matrix", choices=["small", "full"], default="small")
    parser.add_argument("--iterations", type=int, help="iterations per run (default: the config's)")
    parser.add_argument("--only", action="append", help="run only variations whose name contains this")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--eval-rows", type=int, default=2048,
                        help="eval samples the references score, for the drift's standard error (default 2048)")
    args = parser.parse_args(argv)
    init_logger("check")
    try:
        cfg = RunConfig.load(args.config, args.set)
        if args.iterations:
            cfg = cfg.replace(iterations=args.iterations)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    with tempfile.TemporaryDirectory(prefix="bagpipe-check-") as tmp:
        work = args.work_dir or Path(tmp)
        results = run_check(cfg, args.matrix, work, args.only, args.eval_rows)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r["variation"] for r in results if not r["passed"]]
    if failed:
        print(f"\n{len(failed)} of {len(results)} variations failed: {', '.join(failed)}")
        return 1
    print(f"\nall {len(results)} variations passed")
    return 0
