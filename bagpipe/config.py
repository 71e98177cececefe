"""Configuration: one flat ``RunConfig`` a user writes (TOML, ``--set k=v``),
and a small validated config per component derived from it.

Each component receives only its own config (``StoreConfig``,
``OracleConfig``, ``CacheConfig``, ``ModelConfig``, ``TrainerConfig``), so
nothing reaches into a global namespace. Each key is validated once, by the
component config that owns it; ``RunConfig`` checks only the run's own
keys (iterations, epochs, seed, the kind of store). Every check raises
``ConfigError`` naming the key at fault; every number is checked for range,
and every float for being finite (``inf`` and ``nan`` parse as TOML floats).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bagpipe.placement import MODES as PLACEMENT_MODES
from bagpipe.policies import NAMES as POLICIES, policy as policy_row

OPTIMIZERS = ("sgd", "adagrad")
STORE_IO = ("agent", "thread")
MODELS = ("dlrm", "dcn")
POOLINGS = ("sum", "mean")
INT64_MAX = (1 << 63) - 1
MAX_CACHE_ROWS = (1 << 31) - 1  # plans address cache slots as int32


class ConfigError(ValueError):
    """A configuration value that is missing, out of range or inconsistent."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _positive(value: float, key: str) -> None:
    """A float key that must be a finite number > 0."""
    _require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")


def _non_negative(value: float, key: str) -> None:
    """A float key that must be a finite number >= 0."""
    _require(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")


def capacity_message(cache_rows: int, trainer: int, need: int, iteration: int | None, smallest: int,
                     at_least: bool = False) -> str:
    """The one error a cache too small for a batch gets, wherever it is found (the job's preflight,
    either planner): what is too small, where, and the size to use instead."""
    where = f"in iteration {iteration}" if iteration is not None else "in one iteration"
    bound = "at least " if at_least else ""
    return (f"config key 'cache_rows': {cache_rows} is too small: trainer {trainer} reads {need} distinct rows "
            f"{where}; the smallest workable cache_rows is {bound}{smallest}")


def partition_shares(cache_rows: int, partitions: int) -> list[int]:
    """Each partition's share of a trainer's cache slots, as even as possible (the first ones one larger);
    partition p owns the slots from the sum of the shares before it."""
    q, r = divmod(cache_rows, partitions)
    return [q + (p < r) for p in range(partitions)]


def smallest_partitioned_cache(most: list[int]) -> int:
    """The smallest cache_rows whose shares (``partition_shares``) hold ``most[p]`` rows in partition p.

    The shares of K partitions differ by one at most, the larger ones first: with M the largest need,
    K (M - 1) slots plus one for each partition up to the last that needs M."""
    k, m = len(most), max(most, default=0)
    if m == 0:
        return k
    last = max(p for p in range(k) if most[p] == m)
    return k * (m - 1) + last + 1


def partition_capacity_message(cache_rows: int, partitions: int, partition: int, share: int, trainer: int,
                               need: int, iteration: int | None, smallest: int, at_least: bool = False) -> str:
    """``capacity_message`` for partitioned planning: the share that is too small, and the cache_rows
    that gives every partition a share its rows fit in."""
    where = f"in iteration {iteration}" if iteration is not None else "in one iteration"
    bound = "at least " if at_least else ""
    return (f"config key 'cache_rows': {cache_rows} is too small for oracle_partitions = {partitions}: trainer "
            f"{trainer} reads {need} distinct rows of partition {partition} {where}, whose share of the cache is "
            f"{share} slots; the smallest workable cache_rows is {bound}{smallest} with {partitions} partitions")


@dataclass(frozen=True)
class StoreConfig:
    """Where the embedding rows live: S local redis-server shards, given URLs, or a cluster."""

    shards: int = 2
    host: str = "127.0.0.1"
    base_port: int = 0  # 0: pick free ports
    urls: tuple[str, ...] = ()  # existing servers (redis://host:port/0), one per shard
    cluster_url: str = ""  # a Redis Cluster node to bootstrap from
    password_env: str = "BAGPIPE_REDIS_PASSWORD"  # the password is read from this variable
    timeout_s: float = 5.0
    persistence: str = "off"  # off | appendonly
    appendfsync: str = "everysec"
    latency_us: float = 0.0  # added to every round trip (a network stand-in)
    bandwidth_gbps: float = 0.0  # 0: unlimited
    seed: int = 0
    # The password the job itself chose (from its secret, bagpipe.auth), used when the environment
    # gives none; never part of a saved config.
    job_password: str = dataclasses.field(default="", repr=False, compare=False)
    tls_dir: str = ""  # ca.crt, redis.crt, redis.key (bagpipe keys --tls-host): shards serve TLS only
    allow_no_password: bool = False  # bind a non-loopback address with no password (anyone there reads the rows)

    def __post_init__(self) -> None:
        _require(self.shards >= 1 or bool(self.cluster_url), "shards", f"must be >= 1, got {self.shards}")
        _require(0 <= self.base_port < 65536, "redis_base_port", f"not a port: {self.base_port}")
        _positive(self.timeout_s, "redis_timeout_s")
        _require(self.persistence in ("off", "appendonly"), "redis_persistence", "must be off or appendonly")
        _require(self.appendfsync in ("always", "everysec", "no"), "redis_appendfsync", "must be always, everysec or no")
        _non_negative(self.latency_us, "store_latency_us")
        _non_negative(self.bandwidth_gbps, "store_bandwidth_gbps")

    @property
    def password(self) -> str | None:
        return os.environ.get(self.password_env) or self.job_password or None


@dataclass(frozen=True)
class OracleConfig:
    """The Oracle Cacher: what it plans (policy, capacity per trainer, lead P, horizon H, for
    ``trainers`` trainers sharing global batches of ``batch_size``, ``iterations`` of them) and how
    it streams the plans (flow control, endpoint, timeout). The planners take it as their config
    (``oracle.planner_types.PlannerConfig`` is this class)."""

    policy: str = "bagpipe"
    cache_rows: int = 100_000  # validated by CacheConfig, the cache that holds the rows
    lead: int = 2
    horizon: int | str = "auto"  # "auto": sized by oracle.horizon within memory_mb; or iterations >= lead
    trainers: int = 1
    batch_size: int = 1  # global
    iterations: int = 0
    max_ahead: int = 16  # credits: plans sent ahead of the slowest trainer
    bind: str = "tcp://127.0.0.1:0"
    recv_timeout_s: float = 120.0  # validated by TrainerConfig (key 'plan_timeout_s')
    memory_mb: float = 1024.0  # key 'oracle_memory_mb': the budget an automatic horizon's window stays within
    # key 'oracle_partitions': planners, each planning the rows that hash to it in its own share of every
    # trainer's slots (oracle.partitions; docs/oracle.md, "Partitions")
    partitions: int = 1
    # key 'oracle_workers': processes besides the oracle that plan partitions (partition p is planned by
    # process p % (workers + 1), 0 the oracle) and stream them to it (oracle.workers; docs/oracle.md)
    workers: int = 0
    # key 'oracle_bypass': a row that would be evicted before any row it could displace goes through a
    # per-iteration scratch area beside the cache instead (policies whose table row allows it;
    # docs/oracle.md, "Bypass")
    bypass: bool = True

    def __post_init__(self) -> None:
        _require(self.policy in POLICIES, "policy", f"'{self.policy}' is not one of {', '.join(POLICIES)}")
        _require(self.lead >= 0, "lead", f"must be >= 0, got {self.lead}")
        _require(self.horizon == "auto" or (isinstance(self.horizon, int) and not isinstance(self.horizon, bool)),
                 "horizon", f"must be \"auto\" or a number of iterations, got {self.horizon!r}")
        _require(self.horizon == "auto" or self.horizon >= self.lead, "horizon",
                 f"must be >= lead ({self.lead}), got {self.horizon}")
        _require(math.isfinite(self.memory_mb) and self.memory_mb > 0, "oracle_memory_mb",
                 f"must be a positive number of MB, got {self.memory_mb}")
        _require(self.trainers >= 1, "trainers", f"must be >= 1, got {self.trainers}")
        _require(self.batch_size % self.trainers == 0, "batch_size",
                 f"{self.batch_size} is not divisible by trainers={self.trainers}")
        _require(self.max_ahead >= max(1, self.lead), "max_ahead", f"must be >= lead and >= 1, got {self.max_ahead}")
        _require(isinstance(self.partitions, int) and not isinstance(self.partitions, bool) and self.partitions >= 1,
                 "oracle_partitions", f"must be an integer >= 1, got {self.partitions!r}")
        _require(isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 0,
                 "oracle_workers", f"must be an integer >= 0, got {self.workers!r}")
        _require(isinstance(self.bypass, bool), "oracle_bypass", f"must be true or false, got {self.bypass!r}")
        _require(self.workers < self.partitions, "oracle_workers",
                 f"{self.workers} worker process(es) need oracle_partitions >= {self.workers + 1} (one partition "
                 f"each, and one for the oracle), got oracle_partitions = {self.partitions}")
        # cache_rows < 1 is CacheConfig's to name (key 'cache_rows'), not a partition problem.
        _require(self.cache_rows < 1 or self.partitions <= self.cache_rows, "oracle_partitions",
                 f"{self.partitions} partitions cannot each own a share of cache_rows = {self.cache_rows}")

    @property
    def rules(self):
        """The policy's row of ``bagpipe.policies``."""
        return policy_row(self.policy)

    @property
    def fetch_lead(self) -> int:
        """How many iterations before its install the policy issues a row's store fetch."""
        return self.rules.lead(self.lead)

    @property
    def bypasses(self) -> bool:
        """Whether the planners send rows through the scratch area (the key, where the policy allows it)."""
        return self.bypass and self.rules.bypass


@dataclass(frozen=True)
class CacheConfig:
    """A trainer's hot-row cache: capacity in rows (the plan says how many slots it needs) and the
    row-wise optimizer it applies to the rows it holds."""

    cache_rows: int = 100_000
    optimizer: str = "adagrad"
    lr: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _require(1 <= self.cache_rows <= MAX_CACHE_ROWS, "cache_rows",
                 f"must be in [1, {MAX_CACHE_ROWS}], got {self.cache_rows}")
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"'{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        _positive(self.lr, "lr")
        _positive(self.eps, "eps")

    @property
    def state_width(self) -> int:
        """Optimizer state columns stored with each row (row-wise Adagrad: 1)."""
        return 1 if self.optimizer == "adagrad" else 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "dlrm"
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)
    top_mlp: tuple[int, ...] = (64, 32, 1)
    dcn_layers: int = 2
    dcn_rank: int = 8
    pooling: tuple[str, ...] = ("sum",)

    def pooling_per_table(self, tables: int) -> list[str]:
        """One pooling per table (a single entry stands for every table)."""
        if len(self.pooling) == 1:
            return list(self.pooling) * tables
        if len(self.pooling) != tables:
            raise ConfigError(f"config key 'pooling': {len(self.pooling)} entries for the data's {tables} tables "
                              "(give one for every table, or one per table)")
        return list(self.pooling)

    def __post_init__(self) -> None:
        _require(self.name in MODELS, "model", f"'{self.name}' is not one of {', '.join(MODELS)}")
        _require(self.embedding_dim >= 1, "embedding_dim", "must be >= 1")
        _require(len(self.bottom_mlp) >= 1 and self.bottom_mlp[-1] == self.embedding_dim, "bottom_mlp",
                 f"must end in embedding_dim ({self.embedding_dim}), got {list(self.bottom_mlp)}")
        _require(len(self.top_mlp) >= 1 and self.top_mlp[-1] == 1, "top_mlp", "must end in 1")
        _require(self.dcn_layers >= 1, "dcn_layers", f"must be >= 1, got {self.dcn_layers}")
        _require(self.dcn_rank >= 1, "dcn_rank", f"must be >= 1, got {self.dcn_rank}")
        _require(len(self.pooling) >= 1 and all(p in POOLINGS for p in self.pooling), "pooling",
                 f"each entry must be one of {', '.join(POOLINGS)}, got {list(self.pooling)}")


@dataclass(frozen=True)
class TrainerConfig:
    """One trainer rank's loop: its device and threads, the dense optimizer, evaluation and the plan stream."""

    batch_size: int = 1024  # global
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads; 0: the cores divided among the trainers
    dense_lr: float = 0.05
    eval_every: int = 0
    eval_batches: int = 8
    checkpoint_every: int = 0
    plan_timeout_s: float = 120.0
    curve_dir: str = ""
    store_io: str = "agent"  # agent: a process of its own (trainers.storeagent); thread: in the trainer
    staging_mib: int = 32  # each shared-memory ring between a trainer and its store agent
    tensorboard: bool = True  # event files in the run directory's tensorboard/

    def __post_init__(self) -> None:
        _require(self.store_io in STORE_IO, "store_io", f"'{self.store_io}' is not one of {', '.join(STORE_IO)}")
        _require(self.staging_mib >= 1, "staging_mib", f"must be >= 1, got {self.staging_mib}")
        self._check_common()

    def _check_common(self) -> None:
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        _require(self.threads >= 0, "trainer_threads", "must be >= 0 (0: automatic)")
        _positive(self.dense_lr, "dense_lr")
        _require(self.eval_every >= 0, "eval_every", "must be >= 0")
        _require(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _positive(self.plan_timeout_s, "plan_timeout_s")


@dataclass(frozen=True)
class RunConfig:
    """Everything one job needs, as a user writes it (flat keys)."""

    data: str = ""
    model: str = "dlrm"
    policy: str = "bagpipe"
    trainers: int = 2
    shards: int = 2
    batch_size: int = 1024  # global
    iterations: int = 100  # 0: every batch of every epoch
    epochs: int = 1  # epochs read one after another, each in its own shuffled order
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)
    top_mlp: tuple[int, ...] = (64, 32, 1)
    dcn_layers: int = 2  # model "dcn": cross layers (MLPerf DLRM-DCNv2: 3)
    dcn_rank: int = 8  # model "dcn": rank of each cross layer's weight (MLPerf: 512)
    pooling: tuple[str, ...] = ("sum",)  # how a bag of ids pools: sum or mean; one for all tables, or one each
    cache_rows: int = 100_000
    lead: int = 2
    horizon: int | str = "auto"  # "auto" (oracle.horizon, docs/oracle.md) or iterations of lookahead
    oracle_memory_mb: float = 1024.0  # what an automatic horizon's window may take in the oracle
    oracle_partitions: int = 1  # planners over disjoint rows, in threads (docs/oracle.md, "Partitions")
    oracle_workers: int = 0  # processes besides the oracle that plan some of the partitions (docs/oracle.md)
    oracle_bypass: bool = True  # rows read once before they would be evicted use a scratch area (docs/oracle.md)
    max_ahead: int = 16
    optimizer: str = "adagrad"
    lr: float = 0.05
    dense_lr: float = 0.05
    eps: float = 1e-8
    seed: int = 0
    shuffle: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 0
    device: str = "auto"  # auto | cpu | cuda
    trainer_threads: int = 0  # torch threads per trainer; 0: its placed cores, else the cores divided among trainers
    cpu_placement: str = "auto"  # auto: trainers on cores of their own, the rest on the others (bagpipe.placement)
    store_io: str = "agent"
    staging_mib: int = 32
    tensorboard: bool = True  # rank 0 writes TensorBoard event files into RUN_DIR/tensorboard
    redis_host: str = "127.0.0.1"
    redis_base_port: int = 0
    redis_urls: tuple[str, ...] = ()
    redis_cluster_url: str = ""
    redis_cluster: bool = False  # start a local Redis Cluster of 'shards' (>= 3) masters instead of shards
    redis_timeout_s: float = 5.0
    redis_persistence: str = "off"
    redis_appendfsync: str = "everysec"
    redis_tls_dir: str = ""  # TLS for the shards and their clients (bagpipe.tls); empty: plain TCP
    redis_allow_no_password: bool = False  # say so to bind a non-loopback address without a password
    store_latency_us: float = 0.0
    store_bandwidth_gbps: float = 0.0
    oracle_bind: str = "tcp://127.0.0.1:0"
    zmq_curve_dir: str = ""  # CURVE keys for the plan stream (`bagpipe keys`); empty: in the clear
    plan_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        # Keys of the run as a whole; every other key is checked by the component config that
        # owns it, built here once (trainers and their share of a batch: the oracle's).
        _require(self.iterations >= 0, "iterations", "must be >= 0")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(self.cpu_placement in PLACEMENT_MODES, "cpu_placement",
                 f"'{self.cpu_placement}' is not one of {', '.join(PLACEMENT_MODES)}")
        # The seed orders the data, draws the dense weights and keys every row's initial value
        # (a uint64 hash): one non-negative 64-bit integer for all three.
        _require(0 <= self.seed <= INT64_MAX, "seed", f"must be in [0, {INT64_MAX}], got {self.seed}")
        _require(not (self.redis_cluster and self.redis_tls_dir), "redis_tls_dir",
                 "TLS is for sharded servers; a Redis Cluster the job starts runs without it")
        _require(not self.redis_cluster or self.shards >= 3, "shards",
                 f"a Redis Cluster (redis_cluster = true) needs at least 3 masters, got {self.shards}")
        self.oracle_config()
        self.trainer_config()
        self.cache_config()
        self.store_config()
        self.model_config()

    @property
    def rules(self):
        """The policy's row of ``bagpipe.policies``."""
        return policy_row(self.policy)

    @property
    def state_width(self) -> int:
        """Optimizer state columns stored with each row (row-wise Adagrad: 1)."""
        return self.cache_config().state_width

    @property
    def local_batch(self) -> int:
        """Samples per trainer per iteration."""
        return self.batch_size // self.trainers

    def segment_end(self, start: int, iterations: int) -> int:
        """End (exclusive) of the plan segment that begins at ``start``.

        Segments end after every ``checkpoint_every``-th and ``eval_every``-th
        iteration and at the last: there every cache is flushed to the store,
        so a checkpoint or an evaluation reads every row from the store.
        """
        end = iterations
        for every in (self.checkpoint_every, self.eval_every):
            if every:
                end = min(end, (start // every + 1) * every)
        return end

    def flushes_after(self, iteration: int, iterations: int) -> bool:
        """Whether a segment ends after ``iteration``."""
        return self.segment_end(iteration, iterations) == iteration + 1

    def checkpoints_after(self, iteration: int, iterations: int) -> bool:
        """Whether a checkpoint is taken after ``iteration``: every ``checkpoint_every`` and after the last."""
        every = self.checkpoint_every
        return every > 0 and ((iteration + 1) % every == 0 or iteration == iterations - 1)

    def evaluates_after(self, iteration: int, iterations: int) -> bool:
        """Whether the periodic evaluation runs after ``iteration`` (the final one runs after training)."""
        every = self.eval_every
        return every > 0 and (iteration + 1) % every == 0 and iteration != iterations - 1

    def store_config(self, cluster_url: str | None = None) -> StoreConfig:
        """The store's config; ``cluster_url`` names a cluster this job started (see bagpipe.runner.job)."""
        return StoreConfig(
            shards=self.shards, host=self.redis_host, base_port=self.redis_base_port,
            urls=tuple(self.redis_urls), cluster_url=cluster_url or self.redis_cluster_url,
            timeout_s=self.redis_timeout_s, persistence=self.redis_persistence,
            appendfsync=self.redis_appendfsync, latency_us=self.store_latency_us,
            bandwidth_gbps=self.store_bandwidth_gbps, seed=self.seed, tls_dir=self.redis_tls_dir,
            allow_no_password=self.redis_allow_no_password,
        )

    def oracle_config(self, iterations: int | None = None) -> OracleConfig:
        """The oracle's config; ``iterations`` (the run's count once the data is known) replaces the key."""
        return OracleConfig(
            policy=self.policy, cache_rows=self.cache_rows, lead=self.lead, horizon=self.horizon,
            trainers=self.trainers, batch_size=self.batch_size,
            iterations=self.iterations if iterations is None else iterations,
            max_ahead=self.max_ahead, bind=self.oracle_bind, recv_timeout_s=self.plan_timeout_s,
            memory_mb=self.oracle_memory_mb, partitions=self.oracle_partitions, workers=self.oracle_workers,
            bypass=self.oracle_bypass,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(cache_rows=self.cache_rows, optimizer=self.optimizer, lr=self.lr, eps=self.eps)

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig(batch_size=self.batch_size, device=self.device, threads=self.trainer_threads,
                             dense_lr=self.dense_lr, eval_every=self.eval_every, eval_batches=self.eval_batches,
                             checkpoint_every=self.checkpoint_every, plan_timeout_s=self.plan_timeout_s,
                             curve_dir=self.zmq_curve_dir, store_io=self.store_io, staging_mib=self.staging_mib,
                             tensorboard=self.tensorboard)

    def model_config(self) -> ModelConfig:
        return ModelConfig(name=self.model, embedding_dim=self.embedding_dim, bottom_mlp=tuple(self.bottom_mlp),
                           top_mlp=tuple(self.top_mlp), dcn_layers=self.dcn_layers, dcn_rank=self.dcn_rank,
                           pooling=tuple(self.pooling))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config",
                  sources: dict[str, str] | None = None) -> "RunConfig":
        """A validated config from key/value pairs; ``sources`` names where each key came from
        (a file, ``--set``), for the error an unknown key or a bad value gets."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            source = (sources or {}).get(key, where)
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else " (see bagpipe/config.py for the keys)"
                raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
            kwargs[key] = _coerce(key, value, known[key].type, source)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None, overrides: list[str] = (),
             base: dict[str, Any] | None = None) -> "RunConfig":
        """Read a TOML file (or ``base``, or defaults) and apply ``KEY=VALUE`` overrides."""
        values: dict[str, Any] = dict(base or {})
        sources: dict[str, str] = {k: "the saved config.json" for k in values}
        if path is not None:
            p = Path(path)
            try:
                values = tomllib.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {p} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{p}: not valid TOML: {exc}") from None
            # [synthetic_data]: how launch.sh makes data for this config when given none
            # (scripts/synthetic_data.py reads it); not a key of the run.
            values.pop("synthetic_data", None)
            # Relative data paths are relative to the config file.
            if values.get("data") and not Path(values["data"]).is_absolute():
                values["data"] = str((p.parent / values["data"]).resolve())
            sources = {k: str(p) for k in values}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            values[k.strip()] = _parse_override(v.strip())
            sources[k.strip()] = f"--set {item}"
        return cls.from_dict(values, where=str(path) if path else "--set", sources=sources)


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set K=V [K=V ...]``, repeatable: every command that takes a config takes overrides alike."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys (--set a=1 b=2, or --set a=1 --set b=2)")


def _parse_override(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as a policy name or a path


def _coerce(key: str, value: Any, typ: Any, where: str) -> Any:
    typ = str(typ)
    try:
        if typ == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if not -INT64_MAX - 1 <= int(value) <= INT64_MAX:
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
        if typ.startswith("tuple[int"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return tuple(int(v) for v in value)
        if typ.startswith("tuple[str"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: config key '{key}': {value!r} is not a valid {typ}") from None
    return value
