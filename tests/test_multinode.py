"""One job over three network hosts (Linux network namespaces) trains the single-host model.

Host A runs node 0 (the rendezvous store, the oracle, trainer rank 0), host
B node 1 (trainer rank 1), host C two redis-server shards; the hosts talk
only over veth links to a bridge, each with its own address. Every node is
started with ``launch.sh`` and its NODE_RANK, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bagpipe.runner.check import compare_models, identical
from bagpipe.config import RunConfig
from bagpipe.runner.export import load_model
from bagpipe.runner.job import run_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.213.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Namespaces ``<tag>h0..`` with addresses SUBNET.1.., joined by a bridge in namespace ``<tag>br``."""

    def __init__(self, count: int) -> None:
        self.tag = f"bp{os.getpid() % 100000}"
        self.names = [f"{self.tag}h{i}" for i in range(count)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.ifaces = [f"{self.tag}v{i}" for i in range(count)]
        self.bridge_ns = f"{self.tag}br"
        self.made: list[str] = []

    def create(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for ns, addr, iface in zip(self.names, self.addrs, self.ifaces):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", iface, "type", "veth", "peer", "name", iface + "b")
            _ip("link", "set", iface, "netns", ns)
            _ip("link", "set", iface + "b", "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", iface + "b", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", iface + "b", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")

    def delete(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def popen(self, i: int, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        out = open(log, "wb")
        try:
            return subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    h = Hosts(3)
    try:
        h.create()
    except (subprocess.CalledProcessError, OSError) as exc:
        h.delete()
        pytest.skip(f"cannot make network namespaces here: {getattr(exc, 'stderr', exc)}")
    yield h
    h.delete()


def test_multinode_job_over_three_hosts_equals_one_host(hosts, small_criteo, tmp_path):
    # As docs/multinode.md says: one `bagpipe keys` directory copied to every host (here one
    # filesystem), the shards' password in the environment of the shards and of node 0, the store
    # over TLS (issue 17 item 6).
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "bagpipe", "keys", "--out", str(keys), "--tls-host", hosts.addrs[2]],
                   check=True, cwd=REPO, capture_output=True, timeout=60)
    secret_env = {"BAGPIPE_REDIS_PASSWORD": "shard-password-between-hosts", "BAGPIPE_SECRET_FILE": str(keys / "job.secret")}
    # Two oracle partitions, the second planned by an oracle worker, which runs on node 1 (worker w on
    # node w % nnodes): the planning spans hosts too (issue 15 item 2).
    overrides = ["batch_size=256", "iterations=16", "cache_rows=3000", "lead=2", "horizon=6", "eval_batches=2",
                 "oracle_partitions=2", "oracle_workers=1", f"redis_tls_dir={keys}"]
    servers = hosts.popen(2, [sys.executable, "-m", "bagpipe", "servers", "--shards", "2", "--host",
                              hosts.addrs[2], "--dir", str(tmp_path / "shards"), "--tls-dir", str(keys)],
                          dict(os.environ, **secret_env), tmp_path / "servers.log")
    nodes: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        urls: list[str] = []
        while not urls:
            assert servers.poll() is None, (tmp_path / "servers.log").read_text()
            assert time.monotonic() < deadline, "shards never came up"
            lines = (tmp_path / "servers.log").read_text().splitlines()
            urls = next((json.loads(ln)["urls"] for ln in lines if ln.startswith("{")), [])
            time.sleep(0.2)
        for rank in (0, 1):
            env = dict(os.environ, **secret_env, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                       MASTER_ADDR=hosts.addrs[0], MASTER_PORT="29611", BAGPIPE_HOST=hosts.addrs[rank],
                       GLOO_SOCKET_IFNAME=hosts.ifaces[rank], DATA_DIR=str(small_criteo),
                       RUN_DIR=str(tmp_path / f"node{rank}"), BAGPIPE_JOIN_TIMEOUT="60")
            args = ["--redis", *urls] if rank == 0 else []
            for o in overrides if rank == 0 else []:
                args += ["--set", o]
            nodes.append(hosts.popen(rank, ["bash", "launch.sh", *args], env, tmp_path / f"node{rank}.log"))
        for rank, node in enumerate(nodes):
            try:
                rc = node.wait(timeout=240)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            assert rc == 0, f"node {rank}: {rc}\n" + (tmp_path / f"node{rank}.log").read_text()[-3000:]
    finally:
        for node in nodes:
            _stop(node)
        _stop(servers)
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert metrics["iterations"] == 16 and metrics["rows_fetched"] > 0
    assert all(u.startswith("rediss://") for u in urls)
    for rank in (0, 1):  # the password reached no file of either node
        for path in (tmp_path / f"node{rank}").rglob("*"):
            if path.is_file():
                assert b"shard-password-between-hosts" not in path.read_bytes(), path
    # Each node ran one trainer: rank 1 lived on host B, and so did the oracle's worker.
    assert (tmp_path / "node1" / "rank1.json").exists() and not (tmp_path / "node0" / "rank1.json").exists()
    assert "planning partitions [1] of 2" in (tmp_path / "node1" / "oracle-worker1.log").read_text()
    assert not (tmp_path / "node0" / "oracle-worker1.log").exists()
    assert f"tcp://{hosts.addrs[1]}:" in (tmp_path / "node0" / "endpoints.json").read_text()
    cfg = RunConfig.load(REPO / "configs" / "default.toml", [f"data={small_criteo}", *overrides[:-1]])
    run_job(cfg.replace(trainers=2), tmp_path / "single", quiet=True)
    cmp = compare_models(load_model(tmp_path / "single"), load_model(tmp_path / "node0"))
    assert cmp.rows > 0
    # Two ranks on two nodes add the same two partial sums as two ranks on one: bit for bit.
    assert identical(load_model(tmp_path / "single"), load_model(tmp_path / "node0")), (cmp.max_abs, cmp.problems)


def _pids_alive(run_dir: Path) -> list[int]:
    pids = json.loads((run_dir / "pids.json").read_text()) if (run_dir / "pids.json").exists() else {}
    alive = []
    for pid in pids.values():
        try:
            os.kill(int(pid), 0)
            alive.append(int(pid))
        except ProcessLookupError:
            pass
    return alive


def test_a_cut_link_stops_both_nodes_within_the_plan_timeout(hosts, small_criteo, tmp_path):
    """Finding 13 with a real link: node 1's cable is pulled mid-run (its veth's far end set down:
    its own link stays up, nothing passes, TCP connections go silent rather than closed). Both
    nodes stop within a bound set by plan_timeout_s, each naming the peer it lost, nothing left
    running."""
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "bagpipe", "keys", "--out", str(keys)], check=True, cwd=REPO,
                   capture_output=True, timeout=60)
    plan_timeout_s = 20  # also the oracle's wait for trainers to connect (start-up takes a while here)
    overrides = ["batch_size=128", "iterations=2000", "epochs=8", "cache_rows=3000", "eval_batches=1",
                 f"plan_timeout_s={plan_timeout_s}"]
    nodes: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            env = dict(os.environ, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", SHARDS_PER_NODE="1",
                       MASTER_ADDR=hosts.addrs[0], MASTER_PORT="29631", BAGPIPE_HOST=hosts.addrs[rank],
                       GLOO_SOCKET_IFNAME=hosts.ifaces[rank], DATA_DIR=str(small_criteo),
                       RUN_DIR=str(tmp_path / f"node{rank}"), BAGPIPE_JOIN_TIMEOUT="60",
                       BAGPIPE_SECRET_FILE=str(keys / "job.secret"))
            args = [a for o in overrides for a in ("--set", o)] if rank == 0 else []
            nodes.append(hosts.popen(rank, ["bash", "launch.sh", *args], env, tmp_path / f"node{rank}.log"))
        from bagpipe.rundir import RunDir

        run0 = RunDir(tmp_path / "node0")
        deadline = time.monotonic() + 180
        while (run0.progress() or {}).get("iteration", 0) < 20:
            for rank, node in enumerate(nodes):
                assert node.poll() is None, (tmp_path / f"node{rank}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.2)
        _ip("-n", hosts.bridge_ns, "link", "set", hosts.ifaces[1] + "b", "down")  # the cable, pulled
        cut = time.monotonic()
        bound = 3 * plan_timeout_s + 30  # a silent peer's wait, the report across nodes, the stops
        took = {}
        for rank, node in enumerate(nodes):
            try:
                rc = node.wait(timeout=max(1.0, cut + bound - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            took[rank] = time.monotonic() - cut
            assert rc not in (None, 0), f"node {rank}: {rc} after {took[rank]:.0f}s\n" + \
                (tmp_path / f"node{rank}.log").read_text()[-3000:]
    finally:
        for node in nodes:
            _stop(node)
    logs = {rank: (tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)}
    # Each leads with the peer it lost: node 1 with node 0's address; node 0 with rank 1 on node 1, or
    # node 1's shard at its address (whichever timeout fires first: the store's 5 s, gloo's plan timeout).
    lead = {rank: next((ln for ln in logs[rank].splitlines() if "ERROR [job]" in ln), "") for rank in (0, 1)}
    assert hosts.addrs[0] in lead[1], logs[1][-3000:]
    assert "lost rank(s) 1 on node 1" in lead[0] or f"at {hosts.addrs[1]}:" in lead[0], logs[0][-3000:]
    assert "Traceback" not in logs[0] and "Traceback" not in logs[1]
    for rank in (0, 1):
        assert _pids_alive(tmp_path / f"node{rank}") == [], f"node {rank} left processes running"
