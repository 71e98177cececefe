"""The peer users would otherwise run: the same model and batches on TorchRec's fused all-in-memory tables.

Every table lives in one ``FusedEmbeddingBagCollection`` (fbgemm's table
batched embeddings on the CPU, row-wise Adagrad fused into the backward
pass), the dense part is the project's own DLRM/DCN (``trainers.models``)
with the same dense Adagrad, and the batches are the ones ``bagpipe run``
reads (``bagpipe.dataset``, same seed and order), read one ahead in a
background thread as the trainer does. One process, one trainer: the row
``bagpipe bench`` calls ``torchrec``.

It is a speed reference, not a consistency one: fbgemm rounds its fused
update differently in the last bit, so its model is not bitwise ours.

    python -m bench.torchrec_peer --config configs/bench-criteo.toml --out runs/peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bagpipe.config import ConfigError, RunConfig, add_set_argument
from bagpipe.dataset import Dataset
from bagpipe.log import init_logger
from bagpipe.placement import plan_placement
from trainers.cache import BagLayout
from trainers.models import build_dense_model
from trainers.trainer import BatchPrefetcher


def train_peer(cfg: RunConfig) -> dict:
    """Train ``cfg.iterations`` batches; return the figures ``bagpipe bench`` reports for a policy."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad

    dataset = Dataset(cfg.data)
    names = [name for name, _ in dataset.tables]
    reader = dataset.batches(cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle, epochs=cfg.epochs)
    iterations = cfg.iterations or len(reader)
    torch.manual_seed(cfg.seed)
    model = build_dense_model(cfg.model_config(), dataset.num_dense, len(names))
    pooling = cfg.model_config().pooling_per_table(len(names))
    kinds = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    tables = [EmbeddingBagConfig(num_embeddings=n, embedding_dim=cfg.embedding_dim, name=f"t_{name}",
                                 feature_names=[name], pooling=kinds[p])
              for (name, n), p in zip(dataset.tables, pooling)]
    layout = BagLayout(names, dataset.bags, pooling)  # bags of ids as the trainer makes them (multi-hot)
    ebc = FusedEmbeddingBagCollection(tables=tables, optimizer_type=RowWiseAdagrad,
                                      optimizer_kwargs={"lr": cfg.lr, "eps": cfg.eps}, device=torch.device("cpu"))
    dense_opt = torch.optim.Adagrad(model.parameters(), lr=cfg.dense_lr)
    batches = BatchPrefetcher(reader, iterations - 1)
    ended, phases = [], {"forward": [], "backward": [], "optimizer": []}
    started = time.perf_counter()
    try:
        for i in range(iterations):
            batch = batches.get(i)
            t0 = time.perf_counter()
            kjt = layout.kjt(torch.from_numpy(batch.sparse), batch.sparse)
            logits = model(torch.from_numpy(batch.dense), ebc(kjt))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(batch.labels))
            t1 = time.perf_counter()
            dense_opt.zero_grad(set_to_none=False)
            loss.backward()  # the embedding rows step here, fused
            t2 = time.perf_counter()
            dense_opt.step()
            t3 = time.perf_counter()
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
            ended.append(time.perf_counter() - started)
    finally:
        batches.close()
    warm = min(10, len(ended) // 5)
    steady = ((len(ended) - warm) * cfg.batch_size / (ended[-1] - ended[warm - 1])
              if warm >= 1 and ended[-1] > ended[warm - 1] else None)
    return {"policy": "torchrec", "iterations": iterations, "samples_per_s": iterations * cfg.batch_size / ended[-1],
            "samples_per_s_steady": steady, "warmup_iterations": warm, "stall_s": 0.0, "rows_fetched": 0,
            "rows_written_back": 0, "eval_auc": None, "train_logloss": float(loss.detach()), "stall_per_iteration": [],
            "peak_rss_bytes": {"trainer0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
            # Steady means, as the runner reports them for the other policies.
            "trainer_phase_s": {k: sum(v[warm:]) / max(1, len(v) - warm) for k, v in phases.items()}, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torchrec_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a TOML config, as for bagpipe run")
    parser.add_argument("--config-json", type=Path, help="a whole RunConfig as JSON (what bagpipe bench passes)")
    add_set_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    log = init_logger("torchrec peer")
    try:
        if args.config_json:
            cfg = RunConfig.from_dict(json.loads(args.config_json.read_text()), where=str(args.config_json))
        else:
            cfg = RunConfig.load(args.config, args.set)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    # Placed as one trainer of `bagpipe run` would be: on the trainer's cores, as many threads.
    placement = plan_placement(cfg.cpu_placement, 1)
    cores = placement.trainer_cpus(0)
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(cfg.trainer_threads or (len(cores) if cores else os.cpu_count() or 1))
    metrics = train_peer(cfg)
    metrics["placement"] = placement.to_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=1))
    log.info("torchrec: %.0f samples/s steady (%d threads)", metrics["samples_per_s_steady"] or 0,
             metrics["threads"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
