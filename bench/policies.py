"""``bagpipe bench``: the same job under each policy, side by side, in one invocation.

Policies alternate within each repeat (local, none, lru, ..., then again),
so drift on a shared machine hits all alike. Beside the policies, the row
``torchrec`` trains the same model and batches on TorchRec's fused
all-in-memory tables (``bench.torchrec_peer``), placed like a trainer. Per
policy: samples/s (median, min, max), ratios to ``local``, ``torchrec`` and
``none``, stall time, rows fetched and written back, peak memory, and the
trainer's own timers per iteration. ``--sweep KEY=V1,V2,...`` runs it all at
each value of one key and says, per policy, where it still holds 0.9x
``local``. Writes ``report.json``, ``report.md`` and ``report.png`` into the
run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time
from pathlib import Path

from bagpipe.config import ConfigError, RunConfig, add_set_argument
from bagpipe.log import init_logger

log = logging.getLogger("bagpipe")

DEFAULT_POLICIES = "local,torchrec,none,lru,lfu,lru-prefetch,static,bagpipe,bagpipe-original"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench-quick.toml"


PEER = "torchrec"  # not a policy: the same model and batches on TorchRec's fused tables (bench.torchrec_peer)


def _run_one(cfg: RunConfig, policy: str, run_dir: Path) -> dict:
    if policy == PEER:
        import subprocess
        import sys

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        out = run_dir / "metrics.json"
        # Its own process, placed as a trainer of `bagpipe run` is (bench.torchrec_peer places itself).
        cmd = [sys.executable, "-m", "bench.torchrec_peer", "--config-json", str(run_dir / "config.json"),
               "--out", str(out)]
        with open(run_dir / "peer.log", "wb") as logf:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"the torchrec peer failed (exit {rc}); see {run_dir / 'peer.log'}")
        return json.loads(out.read_text())
    from bagpipe.runner.job import run_job

    return run_job(cfg.replace(policy=policy), run_dir, quiet=True)


def run_bench(cfg: RunConfig, policies: list[str], repeats: int, run_dir: Path, link: bool = False) -> dict:
    """Every policy ``repeats`` times, alternating. With ``link``, the shards sit behind a real
    rate-limited link at ``store_bandwidth_gbps`` (bench.netlink) instead of the in-process stand-in."""
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    described = None
    with contextlib.ExitStack() as stack:
        job_cfg = cfg
        if link:
            from bench.netlink import EmulatedLink

            net = stack.enter_context(EmulatedLink(cfg.store_bandwidth_gbps, cfg.shards, run_dir / "link"))
            job_cfg = cfg.replace(redis_urls=tuple(net.urls), store_bandwidth_gbps=0.0)
            described = net.describe()
        for r in range(repeats):
            for p in policies:
                metrics = _run_one(job_cfg, p, run_dir / f"{p}-{r}")
                runs[p].append(metrics)
                log.info("repeat %d %-16s %8.0f samples/s (steady)  %8.0f (whole run)  stall %.2fs", r, p,
                         _steady(metrics), metrics["samples_per_s"], metrics["stall_s"])
    placement = next((m[0].get("placement") for m in runs.values() if m and m[0].get("placement")), None)
    report: dict = {"settings": {"batch_size": cfg.batch_size, "trainers": cfg.trainers, "shards": cfg.shards,
                                 "iterations": cfg.iterations, "cache_rows": cfg.cache_rows, "lead": cfg.lead,
                                 "horizon": cfg.horizon, "store_latency_us": cfg.store_latency_us,
                                 "store_bandwidth_gbps": cfg.store_bandwidth_gbps, "repeats": repeats,
                                 "embedding_dim": cfg.embedding_dim, "store_io": cfg.store_io,
                                 "cpu_placement": cfg.cpu_placement, "placement": placement, "link": described,
                                 "date": time.strftime("%Y-%m-%d")},
                    "policies": {}}
    for p, ms in runs.items():
        sps = [_steady(m) for m in ms]
        mid = ms[len(ms) // 2]
        report["policies"][p] = {
            "samples_per_s": statistics.median(sps), "samples_per_s_min": min(sps), "samples_per_s_max": max(sps),
            "samples_per_s_whole_run": statistics.median(m["samples_per_s"] for m in ms),
            "warmup_iterations": ms[0].get("warmup_iterations", 0),
            "stall_s": statistics.median(m["stall_s"] for m in ms),
            "rows_fetched": ms[0]["rows_fetched"], "rows_written_back": ms[0]["rows_written_back"],
            "peak_rss_bytes": ms[0]["peak_rss_bytes"], "eval_auc": ms[0].get("eval_auc"),
            "trainer_phase_s": {k: statistics.median(m.get("trainer_phase_s", {}).get(k, 0.0) for m in ms)
                                for k in mid.get("trainer_phase_s", {})},
            "stall_per_iteration": mid["stall_per_iteration"],
        }
    _add_ratios(report)
    return report


def _add_ratios(report: dict) -> None:
    for p, row in report["policies"].items():
        for base in ("local", "none", PEER):
            if base in report["policies"]:
                row[f"ratio_to_{base}"] = row["samples_per_s"] / report["policies"][base]["samples_per_s"]


STORE_FREE = ("local", PEER)  # rows all in memory: the store's latency and bandwidth do not touch them


def run_sweep(cfg: RunConfig, key: str, values: list, policies: list[str], repeats: int, run_dir: Path,
              link: bool = False) -> dict:
    """The bench at each value of one config key (alternating policies within each value).

    When the key is the store's or the oracle's (``store_*``, ``oracle_*``), ``local`` and the peer,
    which touch neither, run at the first value only (alternating with the others there) and stand
    as the same line at every value: a sweep costs a third less, and every point is read against
    one ``local``.
    """
    points = []
    fixed: dict = {}
    for n, v in enumerate(values):
        skip = [p for p in policies if p in STORE_FREE and key.startswith(("store_", "oracle_")) and n > 0]
        report = run_bench(cfg.replace(**{key: v}), [p for p in policies if p not in skip], repeats,
                           run_dir / f"{key}={v}", link)
        if n == 0:
            fixed = {p: r for p, r in report["policies"].items() if p in STORE_FREE}
        for p in skip:
            report["policies"][p] = dict(fixed[p], measured_at=values[0])
        _add_ratios(report)
        points.append({"value": v, "report": report})
    return {"key": key, "points": points}


def holds_local(sweep: dict, share: float = 0.9) -> dict[str, list]:
    """Per policy, the swept values at which it still runs at ``share`` x ``local`` or better."""
    out: dict[str, list] = {}
    for point in sweep["points"]:
        pols = point["report"]["policies"]
        if "local" not in pols:
            continue
        for p, row in pols.items():
            if p in STORE_FREE:
                continue  # the line the others are read against
            if row["samples_per_s"] >= share * pols["local"]["samples_per_s"]:
                out.setdefault(p, []).append(point["value"])
            else:
                out.setdefault(p, [])
    return out


def _steady(metrics: dict) -> float:
    """Samples/s after the warm-up iterations (start-up and first plans), else the whole run's."""
    return metrics.get("samples_per_s_steady") or metrics["samples_per_s"]


def _table(report: dict) -> list[str]:
    s = report["settings"]
    placed = s.get("placement") or {}
    where = (f"placement {s['cpu_placement']}: trainer cores {placed.get('trainers')}, others {placed.get('services')}"
             if placed.get("trainers") else f"placement {s['cpu_placement']}: nothing pinned "
                                            f"({placed.get('reason') or 'off'})")
    lines = [f"batch {s['batch_size']}, dim {s['embedding_dim']}, {s['trainers']} trainers, {s['shards']} shards, "
             f"{s['iterations']} iterations, cache {s['cache_rows']} rows per trainer, lead {s['lead']}, horizon "
             f"{s['horizon']}, store latency {s['store_latency_us']} us, bandwidth "
             f"{s['store_bandwidth_gbps'] or 'unlimited'} Gb/s "
             f"({'a real veth link, rate-limited by tbf; latency the stand-in' if s.get('link') else 'in-process stand-in'}), "
             f"store I/O in the {s['store_io']}, {where}; "
             f"{s['repeats']} repeats (median, min-max); samples/s in steady state, after the first "
             f"{next(iter(report['policies'].values())).get('warmup_iterations', 0)} iterations", "",
             "| policy | samples/s | min-max | x local | x torchrec | x none | stall s | rows fetched | "
             "rows written back | peak RSS MiB (max) | ms/iteration: plan, install, evict, forward, backward, optimizer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for p, r in report["policies"].items():
        rss = max(r["peak_rss_bytes"].values()) / 2**20
        t = r.get("trainer_phase_s", {})
        ms = ", ".join(f"{1000 * t.get(k, 0.0):.1f}" for k in ("plan", "install", "evict", "forward", "backward",
                                                                "optimizer"))
        ratio = {k: "-" if r.get(f"ratio_to_{k}") is None else f"{r[f'ratio_to_{k}']:.2f}"
                 for k in ("local", "torchrec", "none")}  # "-": that policy was not in the run
        lines.append(f"| {p} | {r['samples_per_s']:.0f} | {r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f} | "
                     f"{ratio['local']} | {ratio['torchrec']} | "
                     f"{ratio['none']} | {r['stall_s']:.2f} | {r['rows_fetched']} | "
                     f"{r['rows_written_back']} | {rss:.0f} | {ms} |")
    local = report["policies"].get("local")
    if local and local["samples_per_s"] > 0:
        local_ms = 1000 * s["batch_size"] / local["samples_per_s"]
        lines += ["", f"Trainer overhead (plan + install + evict, steady means) against `local`'s {local_ms:.1f} ms "
                      f"iteration:", ""]
        for p, r in report["policies"].items():
            if p in ("local", PEER):
                continue
            t = r.get("trainer_phase_s", {})
            over = 1000 * sum(t.get(k, 0.0) for k in ("plan", "install", "evict"))
            lines.append(f"- {p}: {over:.1f} ms, {100 * over / local_ms:.1f}%")
    return lines


def write_report(report: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    slim = {"settings": report["settings"],
            "policies": {p: {k: v for k, v in r.items() if k != "stall_per_iteration"}
                         for p, r in report["policies"].items()}}
    # report.json is keyed by policy, as the issue asks; the settings sit beside them.
    flat = dict(slim["policies"], _settings=slim["settings"])
    (run_dir / "report.json").write_text(json.dumps(flat, indent=1))
    lines = [f"# Policies side by side ({report['settings']['date']})", ""] + _table(report)
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot(report, run_dir / "report.png")


def write_sweep_report(sweep: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    key = sweep["key"]
    (run_dir / "report.json").write_text(json.dumps(
        {"key": key, "points": [{"value": pt["value"], "policies": {
            p: {k: v for k, v in r.items() if k != "stall_per_iteration"}
            for p, r in pt["report"]["policies"].items()}} for pt in sweep["points"]]}, indent=1))
    holds = holds_local(sweep)
    fixed = sorted(p for p, r in sweep["points"][-1]["report"]["policies"].items() if "measured_at" in r)
    lines = [f"# Sweep of {key} ({sweep['points'][0]['report']['settings']['date']})", "",
             *([f"{', '.join(f'`{p}`' for p in fixed)} {'never touch' if len(fixed) > 1 else 'never touches'} the "
                f"store: measured at {key} = "
                f"{sweep['points'][0]['value']} only (alternating with the others there), the same line at every "
                "value.", ""] if fixed else []),
             f"Per policy, the {key} values at which it still runs at 0.9x `local` or better:", "",
             f"| policy | holds 0.9x local at | lowest | highest |", "| --- | --- | ---: | ---: |"]
    for p, vals in holds.items():
        lines.append(f"| {p} | {', '.join(map(str, vals)) or 'none'} | {min(vals) if vals else '-'} | "
                     f"{max(vals) if vals else '-'} |")
    for pt in sweep["points"]:
        lines += ["", f"## {key} = {pt['value']}", ""] + _table(pt["report"])
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(sweep, run_dir / "report.png")


def _plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [pt["value"] for pt in sweep["points"]]
    pols = list(sweep["points"][0]["report"]["policies"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in pols:
        ys = [pt["report"]["policies"][p]["samples_per_s"] for pt in sweep["points"]]
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if p in ("local", PEER) else {"marker": "o"}
        ax.plot(xs, ys, label=p, **style)
    ax.set_xlabel(sweep["key"])
    ax.set_ylabel("samples/s (median, steady state)")
    if all(isinstance(x, (int, float)) and x > 0 for x in xs):
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"throughput against {sweep['key']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["policies"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    med = [report["policies"][p]["samples_per_s"] for p in pols]
    lo = [m - report["policies"][p]["samples_per_s_min"] for p, m in zip(pols, med)]
    hi = [report["policies"][p]["samples_per_s_max"] - m for p, m in zip(pols, med)]
    a.bar(pols, med, yerr=[lo, hi], color="tab:blue")
    a.set_ylabel("samples/s (median, min-max)")
    a.tick_params(axis="x", rotation=40)
    a.set_title("throughput")
    for p in pols:
        stall = report["policies"][p]["stall_per_iteration"]
        if stall:
            b.plot(range(len(stall)), [x * 1000 for x in stall], label=p, linewidth=1)
    b.set_xlabel("iteration")
    b.set_ylabel("stall per iteration (ms, rank 0)")
    b.set_title("time waiting for embeddings")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    add_set_argument(parser)
    parser.add_argument("--policies", default=DEFAULT_POLICIES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "bench")
    parser.add_argument("--link", action="store_true",
                        help="shards in a network namespace behind a real link at store_bandwidth_gbps (root, iproute2)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help="run the bench at each value of one config key (e.g. store_bandwidth_gbps=0.1,0.5,1)")
    args = parser.parse_args(argv)
    init_logger("bench")
    try:
        cfg = RunConfig.load(args.config, args.set)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    policies = [p for p in args.policies.split(",") if p]
    if args.sweep:
        key, _, text = args.sweep.partition("=")
        try:
            values = [RunConfig.load(None, [f"{key}={v}"]).to_dict()[key] for v in text.split(",") if v]
        except ConfigError as exc:
            log.error("--sweep %s: %s", args.sweep, exc)
            return 2
        if not values:
            log.error("--sweep %s: expected KEY=V1,V2,...", args.sweep)
            return 2
        write_sweep_report(run_sweep(cfg, key, values, policies, args.repeats, args.run_dir, args.link), args.run_dir)
        print((args.run_dir / "report.md").read_text())
        return 0
    report = run_bench(cfg, policies, args.repeats, args.run_dir, args.link)
    write_report(report, args.run_dir)
    print((args.run_dir / "report.md").read_text())
    return 0
