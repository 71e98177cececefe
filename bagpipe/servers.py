"""The embedding servers: local ``redis-server`` processes, as shards or a Redis Cluster.

``RedisServers`` starts ``cfg.shards`` independent servers (the store spreads
rows over them by key hash); ``RedisClusterServers`` starts N >= 3 masters and
joins them into a Redis Cluster. Both own exactly the processes they start:
``stop()`` ends those pids and nothing else, and each child is asked by the
kernel to exit when its launcher dies (``PR_SET_PDEATHSIG``), so a launcher
killed with SIGKILL leaves no server behind.

Each server reads a config file written into its own directory with mode
0600: the password (``requirepass``) is read from the environment variable
named by ``cfg.password_env`` and written there, never onto a command line
where ``ps`` would show it.

``bagpipe servers ...`` (``main``) starts servers for a multi-node job, prints
their URLs and waits for SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
import redis

from bagpipe.auth import write_private
from bagpipe.config import ConfigError, StoreConfig
from bagpipe.log import init_logger
from bagpipe.procs import child_setup, free_ports
from bagpipe.tls import TlsError, tls_files

log = logging.getLogger("bagpipe.servers")

# Start-up (and AOF reload) may take a while; running commands use cfg.timeout_s.
START_TIMEOUT_FACTOR = 6.0
PORT_TRIES = 3  # fresh ports to try when a picked free port was taken meanwhile


class ServersError(RuntimeError):
    """A redis-server that could not be started, joined or stopped; names the shard and port."""


def redis_server_binary() -> str:
    """``redis-server`` from ``$BAGPIPE_REDIS_SERVER`` or PATH."""
    return _binary("BAGPIPE_REDIS_SERVER", "redis-server")


def redis_cli_binary() -> str:
    """``redis-cli`` from ``$BAGPIPE_REDIS_CLI``, beside redis-server, or PATH."""
    if os.environ.get("BAGPIPE_REDIS_CLI"):
        return _binary("BAGPIPE_REDIS_CLI", "redis-cli")
    try:
        sibling = Path(redis_server_binary()).with_name("redis-cli")
        if sibling.exists():
            return str(sibling)
    except ServersError:
        pass
    return _binary("BAGPIPE_REDIS_CLI", "redis-cli")


def _binary(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        where = f"${env}={os.environ[env]!r}" if os.environ.get(env) else "PATH"
        raise ServersError(f"{name} binary not found ({where}); install Redis >= 6 (e.g. apt-get install redis-server) "
                           f"or set ${env}")
    return path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """A host as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _conf_string(text: str) -> str:
    """A redis.conf string argument that survives any byte (spaces, quotes, '#')."""
    # Printable ASCII stays readable; quotes, backslashes and any other byte become \xHH.
    safe = (bytes([b]).decode() if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in text.encode())
    return '"' + "".join(safe) + '"'


class _RedisProcesses:
    """Start, watch and stop a set of redis-server processes, one directory each."""

    kind = "shard"

    def __init__(self, cfg: StoreConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = Path(workdir).resolve()  # redis-server runs in its shard dir
        self.host = cfg.host
        self.ports: list[int] = []
        self.bus_ports: list[int] = []
        self._procs: list[subprocess.Popen | None] = []
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- public
    @property
    def count(self) -> int:
        return self.cfg.shards

    @property
    def urls(self) -> list[str]:
        """``redis://host:port/0`` per server; never with the password in it."""
        scheme = "rediss" if self.cfg.tls_dir else "redis"
        return [f"{scheme}://{url_host(self.host)}:{p}/0" for p in self.ports]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def start(self) -> None:
        """Start every server and wait until each answers PING; on failure stop those started."""
        if any(self.alive()):
            raise ServersError("servers already started")
        binary = redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not is_loopback(self.host) and not self.cfg.password:
            if not self.cfg.allow_no_password:
                raise ServersError(f"refusing to bind redis-server to {self.host} without a password: anyone on that "
                                   f"network could read and write the embeddings (set ${self.cfg.password_env}, or "
                                   "config key 'redis_allow_no_password = true' / --allow-no-password to accept it)")
            log.warning("redis-server bound to %s without a password: anyone on that network can read and "
                        "write the embeddings (set $%s)", self.host, self.cfg.password_env)
        try:
            for attempt in range(PORT_TRIES):
                self.ports, self.bus_ports = self._pick_ports()
                atexit.register(self.stop)  # a launcher that returns without stop() still ends them
                self._procs = []
                for i in range(self.count):
                    self._procs.append(self._launch(binary, i))
                try:
                    for i in range(self.count):
                        self._wait_ready(i)
                    break
                except _PortTaken as exc:
                    self.stop()
                    if self.cfg.base_port or attempt == PORT_TRIES - 1:
                        raise ServersError(str(exc)) from None
                    log.info("%s; trying other ports", exc)
            self._after_start()
        except BaseException:
            self.stop()
            raise
        log.info("started %d redis-server %ss: %s (pids %s, persistence %s)", self.count, self.kind,
                 " ".join(self.urls), self.pids, self.cfg.persistence)

    def stop(self) -> None:
        """Stop exactly the processes started here: SIGTERM, then SIGKILL after a timeout. Idempotent."""
        with self._lock:
            live = [p for p in self._procs if p is not None and p.poll() is None]
            for p in live:
                _signal(p, signal.SIGTERM)
            deadline = time.monotonic() + max(5.0, self.cfg.timeout_s)
            for p in live:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("redis-server pid %d ignored SIGTERM; killing it", p.pid)
                    _signal(p, signal.SIGKILL)
                    p.wait()
        atexit.unregister(self.stop)

    def restart_shard(self, i: int) -> None:
        """Start server ``i`` again on the same port and directory (its AOF, if any, reloads)."""
        if not 0 <= i < len(self._procs):
            raise ServersError(f"no {self.kind} {i}: {len(self._procs)} started")
        old = self._procs[i]
        if old is not None and old.poll() is None:
            _signal(old, signal.SIGTERM)
            try:
                old.wait(max(5.0, self.cfg.timeout_s))
            except subprocess.TimeoutExpired:
                _signal(old, signal.SIGKILL)
                old.wait()
        self._procs[i] = self._launch(redis_server_binary(), i)
        try:
            self._wait_ready(i)
        except _PortTaken as exc:
            raise ServersError(str(exc)) from None
        atexit.register(self.stop)

    def alive(self) -> list[bool]:
        return [p is not None and p.poll() is None for p in self._procs]

    def __enter__(self) -> "_RedisProcesses":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------- internal
    def _pick_ports(self) -> tuple[list[int], list[int]]:
        n = self.count
        if self.cfg.base_port:
            ports = [self.cfg.base_port + i for i in range(n)]
            if ports[-1] > 65535:
                raise ServersError(f"base_port {self.cfg.base_port} + {n} shards runs past port 65535")
            return ports, []
        return free_ports(self.host, n), []

    def _shard_dir(self, i: int) -> Path:
        return self.workdir / f"shard-{i}"

    def _conf_lines(self, i: int) -> list[str]:
        cfg = self.cfg
        d = self._shard_dir(i)
        lines = [
            f"bind {self.host}",
            *self._port_lines(i),
            f"dir {_conf_string(str(d.resolve()))}",
            "daemonize no",
            'save ""',  # no RDB snapshots: durability, when wanted, comes from the AOF
            "databases 1",
            # Start-up and shutdown must not wait on a failed background save.
            "stop-writes-on-bgsave-error no",
        ]
        if cfg.persistence == "appendonly":
            lines += ["appendonly yes", f"appendfsync {cfg.appendfsync}"]
        else:
            lines += ["appendonly no"]
        password = cfg.password
        if password:
            lines.append(f"requirepass {_conf_string(password)}")
        if not is_loopback(self.host):
            # Redis 7's protected mode refuses every non-loopback client while the default user
            # has no password, whatever 'bind' says; we bound this address on purpose (and warn
            # at start when no password protects it).
            lines.append("protected-mode no")
        return lines

    def _tls_files(self) -> dict[str, Path]:
        try:
            return tls_files(self.cfg.tls_dir)
        except TlsError as exc:
            raise ServersError(str(exc)) from None

    def _port_lines(self, i: int) -> list[str]:
        if not self.cfg.tls_dir:
            return [f"port {self.ports[i]}"]
        files = self._tls_files()
        # TLS only: the plain port is off, so nothing travels in the clear.
        return ["port 0", f"tls-port {self.ports[i]}", f"tls-cert-file {_conf_string(str(files['cert'].resolve()))}",
                f"tls-key-file {_conf_string(str(files['key'].resolve()))}",
                f"tls-ca-cert-file {_conf_string(str(files['ca'].resolve()))}",
                "tls-auth-clients no"]  # clients prove themselves with the password

    def _launch(self, binary: str, i: int) -> subprocess.Popen:
        d = self._shard_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "redis.conf"
        text = "\n".join(self._conf_lines(i)) + "\n"
        # Created 0600 before anything is written: the file may hold the password.
        write_private(conf, text.encode())
        log_file = open(d / "redis.log", "ab")
        try:
            return subprocess.Popen([binary, str(conf)], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, cwd=d, preexec_fn=child_setup())
        except OSError as exc:
            raise ServersError(f"cannot start {binary} for {self.kind} {i} on {self.host}:{self.ports[i]}: "
                               f"{exc}") from None
        finally:
            log_file.close()

    def _client(self, i: int, timeout: float) -> redis.Redis:
        tls = dict(ssl=True, ssl_ca_certs=str(self._tls_files()["ca"])) if self.cfg.tls_dir else {}
        return redis.Redis(host=self.host, port=self.ports[i], password=self.cfg.password, **tls,
                           socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))

    def _wait_ready(self, i: int) -> None:
        """Wait until server ``i`` answers PING (a dataset still loading counts as not yet)."""
        proc = self._procs[i]
        where = f"{self.host}:{self.ports[i]}"
        limit = max(10.0, self.cfg.timeout_s * START_TIMEOUT_FACTOR)
        deadline = time.monotonic() + limit
        last = ""
        while True:
            rc = proc.poll()
            if rc is not None:
                tail = self._log_tail(i)
                if "already in use" in tail:
                    raise _PortTaken(f"port {self.ports[i]} on {self.host} for {self.kind} {i} is already in use")
                raise ServersError(f"redis-server for {self.kind} {i} on {where} exited with code {rc} "
                                   f"during start-up: {tail or '(no output)'} (log: {self._shard_dir(i) / 'redis.log'})")
            client = self._client(i, 1.0)
            try:
                if client.ping():
                    return
            except redis.exceptions.AuthenticationError as exc:
                raise ServersError(f"authentication failed for {self.kind} {i} at {where}: {exc}") from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.BusyLoadingError) as exc:
                last = str(exc)
            finally:
                client.close()
            if time.monotonic() > deadline:
                raise ServersError(f"redis-server for {self.kind} {i} on {where} did not answer PING within "
                                   f"{limit:.0f}s ({last})")
            time.sleep(0.02)

    def _log_tail(self, i: int, lines: int = 3) -> str:
        try:
            text = (self._shard_dir(i) / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def _after_start(self) -> None:
        pass


class _PortTaken(ServersError):
    pass


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


class RedisServers(_RedisProcesses):
    """``cfg.shards`` independent redis-server processes on ``cfg.host``.

    Ports are ``cfg.base_port + i`` when set, else free ports. With
    ``persistence = "appendonly"`` each shard keeps an append-only file in
    ``workdir/shard-i`` and ``restart_shard(i)`` reloads it.
    """


class RedisClusterServers(_RedisProcesses):
    """A Redis Cluster of ``cfg.shards`` (>= 3) masters, no replicas, created with ``redis-cli --cluster``."""

    kind = "cluster node"

    def __init__(self, cfg: StoreConfig, workdir: Path) -> None:
        if cfg.shards < 3:
            raise ServersError(f"a Redis Cluster needs at least 3 masters; shards = {cfg.shards}")
        super().__init__(cfg, workdir)

    def start(self) -> None:
        if self.cfg.persistence == "off":
            # A node file left by an earlier cluster in this directory names other ports and node ids.
            for i in range(self.count):
                (self._shard_dir(i) / "nodes.conf").unlink(missing_ok=True)
        super().start()

    @property
    def cluster_url(self) -> str:
        """A node to bootstrap from (any node would do: clients discover the rest)."""
        return self.urls[0]

    def _pick_ports(self) -> tuple[list[int], list[int]]:
        n = self.count
        if self.cfg.base_port:
            ports = [self.cfg.base_port + i for i in range(n)]
            bus = [p + 10000 for p in ports]  # Redis's own default bus port
            if bus[-1] > 65535:
                raise ServersError(f"base_port {self.cfg.base_port}: cluster bus ports (port + 10000) run past 65535")
            return ports, bus
        ports = free_ports(self.host, 2 * n)
        return ports[:n], ports[n:]

    def _conf_lines(self, i: int) -> list[str]:
        return super()._conf_lines(i) + [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",  # relative to the shard's dir
            f"cluster-port {self.bus_ports[i]}",
            "cluster-node-timeout 5000",
        ]

    def _after_start(self) -> None:
        """Join the nodes (slots spread evenly) and wait until every node reports cluster_state:ok."""
        if not self._cluster_ok(0):
            env = dict(os.environ)
            env.pop("REDISCLI_AUTH", None)
            if self.cfg.password:
                env["REDISCLI_AUTH"] = self.cfg.password  # not -a: argv is visible to every user
            cmd = [redis_cli_binary(), "--cluster", "create",
                   *[f"{self.host}:{p}" for p in self.ports], "--cluster-replicas", "0", "--cluster-yes"]
            limit = max(30.0, self.cfg.timeout_s * START_TIMEOUT_FACTOR)
            try:
                out = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                     timeout=limit)
            except subprocess.TimeoutExpired:
                raise ServersError(f"redis-cli --cluster create did not finish within {limit:.0f}s") from None
            if out.returncode != 0:
                tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
                raise ServersError(f"redis-cli --cluster create on ports {self.ports} failed: {tail}")
        deadline = time.monotonic() + max(30.0, self.cfg.timeout_s * START_TIMEOUT_FACTOR)
        for i in range(self.count):
            while not self._cluster_ok(i):
                if time.monotonic() > deadline:
                    raise ServersError(f"cluster node {i} at {self.host}:{self.ports[i]} did not reach "
                                       "cluster_state:ok")
                time.sleep(0.1)

    def _cluster_ok(self, i: int) -> bool:
        client = self._client(i, max(1.0, self.cfg.timeout_s))
        try:
            info = client.cluster("INFO")  # parsed by redis-py into a dict
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()
        return str(info.get("cluster_state", "")) == "ok"

    def restart_shard(self, i: int) -> None:
        super().restart_shard(i)
        deadline = time.monotonic() + max(30.0, self.cfg.timeout_s * START_TIMEOUT_FACTOR)
        while not self._cluster_ok(i):
            if time.monotonic() > deadline:
                raise ServersError(f"cluster node {i} at {self.host}:{self.ports[i]} did not rejoin the cluster")
            time.sleep(0.1)


# ------------------------------------------------------------------ command
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bagpipe servers", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2, help="servers to start (cluster: masters, >= 3)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (other nodes connect to it)")
    p.add_argument("--base-port", type=int, default=0, help="ports base-port + i (default: free ports)")
    p.add_argument("--persistence", choices=("off", "appendonly"), default="off")
    p.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="everysec")
    p.add_argument("--dir", type=Path, default=None,
                   help="working directory (default: a temporary one, removed at exit; required with appendonly)")
    p.add_argument("--cluster", action="store_true", help="join the servers into a Redis Cluster")
    p.add_argument("--password-env", default="BAGPIPE_REDIS_PASSWORD",
                   help="environment variable holding the password (unset: no password)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for socket operations")
    p.add_argument("--tls-dir", default="", help="serve TLS only, with DIR's certificates (bagpipe keys --tls-host)")
    p.add_argument("--allow-no-password", action="store_true",
                   help="bind a non-loopback --host even with no password (anyone there can read the rows)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start servers, print their URLs (one a line, then one JSON line), wait for SIGTERM/SIGINT, stop them."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    init_logger("servers")
    try:
        cfg = StoreConfig(shards=args.shards, host=args.host, base_port=args.base_port,
                          persistence=args.persistence, appendfsync=args.appendfsync,
                          password_env=args.password_env, timeout_s=args.timeout, tls_dir=args.tls_dir,
                          allow_no_password=args.allow_no_password)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if args.dir is None and cfg.persistence == "appendonly":
        log.error("--persistence appendonly needs --dir (where the append-only files survive)")
        return 2
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bagpipe-redis-"))
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    servers = (RedisClusterServers if args.cluster else RedisServers)(cfg, workdir)
    try:
        servers.start()
        for url in servers.urls:
            print(url)
        info = {"urls": servers.urls, "pids": servers.pids, "dir": str(workdir),
                "cluster_url": servers.cluster_url if args.cluster else ""}
        print(json.dumps(info), flush=True)
        while not stop.wait(0.5):
            dead = [i for i, ok in enumerate(servers.alive()) if not ok]
            if dead:
                log.error("redis-server %s %s at %s exited; stopping the others", servers.kind, dead[0],
                          servers.urls[dead[0]])
                return 1
        return 0
    except ServersError as exc:
        log.error("%s", exc)
        return 1
    finally:
        servers.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
