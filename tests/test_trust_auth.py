"""Issue 20's socket findings (1-5, 13, 15) and issue 17's TLS item: no one in who does not belong.

Real parts only: redis-server and redis-cli, ZeroMQ sockets, TCPStore
clients, whole jobs through their processes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
import zmq

from bagpipe.auth import (AuthError, hello_token, new_secret, read_secret, redis_password, seal, split_url_password, unseal,
                          write_secret)
from bagpipe.config import ConfigError, RunConfig, StoreConfig
from bagpipe.procs import free_port
from bagpipe.rendezvous import Rendezvous, RendezvousError
from bagpipe.servers import RedisServers, ServersError, redis_cli_binary
from bagpipe.store import EmbeddingStore
from bagpipe.wire import Hello, encode_control

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ the secret
def test_secret_is_owner_only_and_replaces_a_planted_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("planted by someone else\n")
    os.chmod(path, 0o666)
    planted = open(path, "rb")  # held open: its inode cannot be reused for the new file
    old = os.umask(0)  # the mode comes from os.open, not from the umask
    try:
        secret = write_secret(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and path.stat().st_ino != os.fstat(planted.fileno()).st_ino
    assert planted.read() == b"planted by someone else\n"  # never written through
    planted.close()
    assert read_secret(path) == secret and len(secret) == 32
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match=f"{path}.*readable by others"):
        read_secret(path)


def test_sealed_values_authenticate_and_stay_bound_to_their_key():
    secret = new_secret()
    blob = seal(secret, "job", b'{"config": 1}')
    assert b"config" not in blob
    assert unseal(secret, "job", blob) == b'{"config": 1}'
    with pytest.raises(AuthError, match="'endpoints' does not authenticate"):
        unseal(secret, "endpoints", blob)  # moved to another key
    with pytest.raises(AuthError):
        unseal(b"another secret of 32 bytes......", "job", blob)
    damaged = bytearray(blob)
    damaged[20] ^= 1
    with pytest.raises(AuthError):
        unseal(secret, "job", bytes(damaged))


def test_bagpipe_keys_creates_secret_files_owner_only_whatever_the_umask(tmp_path):
    out = tmp_path / "keys"
    # umask 0: a file created world-readable and narrowed later would show here as created 0666.
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0); from bagpipe.curve import main; "
                           f"sys.exit(main(['--out', {str(out)!r}, '--tls-host', '10.1.2.3']))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    for name in ("oracle.key_secret", "trainer.key_secret", "job.secret", "redis.key"):
        assert _mode(out / name) == 0o600, name
    for name in ("oracle.key", "trainer.key", "ca.crt", "redis.crt"):
        assert _mode(out / name) == 0o644, name  # public halves: readable, writable by the owner only
    assert not list(out.glob("*ca.key*")), "the CA's key is not kept"
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(out / "oracle.key_secret"))
    assert secret is not None and zmq.auth.load_certificate(str(out / "oracle.key"))[0] == public


# ------------------------------------------------------------------ shards
def test_shards_require_the_job_password(tmp_path, redis_bin, monkeypatch):
    monkeypatch.delenv("BAGPIPE_REDIS_PASSWORD", raising=False)
    password = redis_password(write_secret(tmp_path / "secret"))
    servers = RedisServers(StoreConfig(shards=2, job_password=password), tmp_path / "redis")
    with servers:
        for port in servers.ports:
            out = subprocess.run([redis_cli_binary(), "-p", str(port), "GET", "x"], capture_output=True,
                                 text=True, timeout=10)
            assert "NOAUTH" in out.stdout + out.stderr
            out = subprocess.run([redis_cli_binary(), "-p", str(port), "SET", "x", "1"], capture_output=True,
                                 text=True, timeout=10)
            assert "NOAUTH" in out.stdout + out.stderr
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(port=port, password="guess").get("x")
        # The store's clients authenticate with the job's password.
        store = EmbeddingStore(StoreConfig(shards=2, job_password=password), servers.urls, 4, 1, [100])
        keys = np.arange(10, dtype=np.int64)
        store.put(keys, np.full((10, 5), 0.5, np.float32), 0)
        assert np.array_equal(store.get(keys)[0], np.full((10, 5), 0.5, np.float32))
        store.close()
        assert all(password not in u for u in servers.urls)
        conf = tmp_path / "redis" / "shard-0" / "redis.conf"
        assert _mode(conf) == 0o600


def test_a_non_loopback_bind_without_a_password_is_refused_unless_allowed(tmp_path, redis_bin, monkeypatch):
    monkeypatch.delenv("BAGPIPE_REDIS_PASSWORD", raising=False)
    with pytest.raises(ServersError, match="refusing to bind redis-server to 0.0.0.0 without a password.*"
                                           "redis_allow_no_password"):
        RedisServers(StoreConfig(shards=1, host="0.0.0.0"), tmp_path / "a").start()
    with RedisServers(StoreConfig(shards=1, host="0.0.0.0", allow_no_password=True), tmp_path / "b") as s:
        assert redis.Redis(port=s.ports[0]).ping()


def _tls_supported(redis_bin: str) -> bool:
    out = subprocess.run([redis_bin, "--port", "0", "--tls-port", "0", "--test-memory", "0"], capture_output=True,
                         text=True, timeout=10)
    return "not supported" not in (out.stdout + out.stderr).lower()


def test_shards_over_tls_on_loopback(tmp_path, redis_bin, monkeypatch):
    if not _tls_supported(redis_bin):
        pytest.skip(f"{redis_bin} was built without TLS (BUILD_TLS=no): tls-port is not supported")
    from bagpipe.tls import write_certificates

    write_certificates(tmp_path / "keys", [])
    monkeypatch.setenv("BAGPIPE_REDIS_PASSWORD", "tls-test-password")
    cfg = StoreConfig(shards=2, tls_dir=str(tmp_path / "keys"))
    with RedisServers(cfg, tmp_path / "redis") as servers:
        assert all(u.startswith("rediss://") for u in servers.urls)
        store = EmbeddingStore(cfg, servers.urls, 4, 1, [100])
        keys = np.arange(7, dtype=np.int64)
        store.put(keys, np.full((7, 5), 2.0, np.float32), 3)
        values, versions = store.get(keys)
        assert np.array_equal(values, np.full((7, 5), 2.0, np.float32)) and np.array_equal(versions, np.full(7, 3))
        store.close()
        port = servers.ports[0]
        # The plain protocol gets nowhere: the plain port is off, the TLS port talks only TLS.
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=port, password="tls-test-password", socket_timeout=2).ping()
        # A client that does not trust this job's CA refuses the server.
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=port, password="tls-test-password", ssl=True, ssl_cert_reqs="required",
                        socket_timeout=2).ping()


# ------------------------------------------------------------------ rendezvous
def _listening_addresses(port: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.split()[3].endswith(f":{port}")]


def _open_in_background(master: Rendezvous, job: object, nnodes: int) -> threading.Thread:
    opener = threading.Thread(target=master.open, args=(job, nnodes), daemon=True)
    opener.start()
    return opener


def test_rendezvous_is_bound_to_its_host_and_unreadable_without_the_secret(tmp_path):
    secret = write_secret(tmp_path / "secret")
    port = free_port("127.0.0.1")
    master = Rendezvous("127.0.0.1", port, True, 5.0, secret)
    job = {"config": {"data": "/the/users/private/dataset"}, "job_id": "0123abcd"}
    opener = _open_in_background(master, job, 2)
    node1 = Rendezvous("127.0.0.1", port, False, 5.0, secret, node_rank=1)
    assert node1.join() == job
    opener.join(5)
    master.publish("endpoints", {"oracle": "tcp://127.0.0.1:5555", "redis": ["redis://127.0.0.1:6379/0"]})
    assert node1.get("endpoints")["oracle"] == "tcp://127.0.0.1:5555"
    assert _listening_addresses(port) == ["127.0.0.1"]
    from torch.distributed import TCPStore

    stranger = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    for key in ("job/1", "endpoints"):
        raw = stranger.get(key)
        assert b"private" not in raw and b"tcp://" not in raw and b"redis://" not in raw and b"0123abcd" not in raw
        with pytest.raises(ValueError):
            json.loads(raw)
    # A node with another secret, or a value a stranger planted, is refused.
    with pytest.raises(RendezvousError, match=f"127.0.0.1:{port}.*'job/1' does not authenticate.*--secret-file"):
        other = Rendezvous("127.0.0.1", port, False, 5.0, b"x" * 32, node_rank=1)
        other.nonce = node1.nonce  # even knowing the nonce node 1 sent
        other.join()
    stranger.set("endpoints", json.dumps({"oracle": "tcp://evil:1"}))
    with pytest.raises(RendezvousError, match="'endpoints' does not authenticate"):
        master.get("endpoints")


def test_values_sealed_in_an_earlier_launch_are_refused(tmp_path):
    """One job.secret for several launches (the multi-node setup): a value recorded from an earlier
    launch's store and replayed into this one's is refused, the job description included."""
    from torch.distributed import TCPStore

    secret = write_secret(tmp_path / "secret")
    recorded = {}
    for launch in ("earlier", "now"):
        port = free_port("127.0.0.1")
        master = Rendezvous("127.0.0.1", port, True, 5.0, secret)
        stranger = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
        node1 = Rendezvous("127.0.0.1", port, False, 5.0, secret, node_rank=1)
        if launch == "earlier":
            opener = _open_in_background(master, {"launch": launch}, 2)
            assert node1.join() == {"launch": "earlier"}
            opener.join(5)
            master.publish("endpoints", {"oracle": "tcp://10.0.0.1:5555"})
            node1.publish("shards/1", {"urls": ["redis://10.0.0.2:6379/0"]})
            recorded = {k: stranger.get(k) for k in ("job/1", "endpoints", "shards/1")}
            continue
        # This launch: the stranger plants the earlier job for node 1 before node 0 hands out its own.
        stranger.set("job/1", recorded["job/1"])
        with pytest.raises(RendezvousError, match="'job/1' does not authenticate.*another launch"):
            node1.join()
        opener = _open_in_background(master, {"launch": launch}, 2)
        opener.join(5)
        assert node1.join() == {"launch": "now"}
        stranger.set("endpoints", recorded["endpoints"])
        with pytest.raises(RendezvousError, match="'endpoints' does not authenticate"):
            node1.get("endpoints")
        stranger.set("shards/1", recorded["shards/1"])
        with pytest.raises(RendezvousError, match="'shards/1' does not authenticate"):
            master.get("shards/1")


def test_what_the_ranks_exchange_on_torchruns_store_is_sealed(tmp_path):
    """torchrun's store takes anyone; what the process group puts there (gloo's addresses, nccl's id)
    goes through SealedStore: ciphertext to a stranger, a planted or earlier launch's value refused.
    (Two gloo ranks over it: every two-trainer job in the suite.)"""
    from torch.distributed import TCPStore

    from bagpipe.rendezvous import SealedStore

    secret = write_secret(tmp_path / "secret")
    port = free_port("127.0.0.1")
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    sealed = SealedStore(server, secret, "session-now", attempt=0)
    sealed.set("0//cpu//0/0", b"10.0.0.7:41234 the address")
    assert sealed.get("0//cpu//0/0") == b"10.0.0.7:41234 the address"
    stranger = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    raw = stranger.get("bagpipe/session-now/0/0//cpu//0/0")
    assert b"10.0.0.7" not in raw
    assert sealed.add("counter", 2) == 2 and sealed.get("counter") == b"2"  # counters pass, as text
    stranger.set("bagpipe/session-now/0/0//cpu//0/1", b"6.6.6.6:1")
    with pytest.raises(RendezvousError, match="'0//cpu//0/1' does not authenticate"):
        sealed.get("0//cpu//0/1")
    # Another launch (or restart) of the same job: the same key, another session or attempt.
    earlier = SealedStore(server, secret, "session-earlier", attempt=0)
    earlier.set("0//cpu//0/2", b"1.2.3.4:5")
    stranger.set("bagpipe/session-now/0/0//cpu//0/2", stranger.get("bagpipe/session-earlier/0/0//cpu//0/2"))
    with pytest.raises(RendezvousError, match="'0//cpu//0/2' does not authenticate"):
        sealed.get("0//cpu//0/2")


def test_url_passwords_are_split_off():
    assert split_url_password("redis://:s3cr%40t@10.0.0.2:6379/0") == ("redis://10.0.0.2:6379/0", "s3cr@t")
    assert split_url_password("rediss://bob:pw@h:1/0") == ("rediss://bob@h:1/0", "pw")
    assert split_url_password("redis://h:1/0") == ("redis://h:1/0", None)


# ------------------------------------------------------------------ whole jobs
def _attack(run_dir: Path, rdzv_port: int, report: dict, stop: threading.Event) -> None:
    """What a neighbour on the host tries while the job runs (issue 20 findings 1-3)."""
    endpoints_file = run_dir / "endpoints.json"
    while not endpoints_file.exists() and not stop.is_set():
        time.sleep(0.05)
    if stop.is_set():
        return
    endpoints = json.loads(endpoints_file.read_text())
    job_id = (run_dir / "job_id").read_text().strip()
    # 1. The shards: no password, no rows.
    report["redis"] = []
    for url in endpoints["redis"]:
        port = url.rsplit(":", 1)[1].split("/")[0]
        out = subprocess.run([redis_cli_binary(), "-p", port, "SCAN", "0"], capture_output=True, text=True, timeout=10)
        report["redis"].append(out.stdout + out.stderr)
        subprocess.run([redis_cli_binary(), "-p", port, "FLUSHALL"], capture_output=True, text=True, timeout=10)
    # 3. The rendezvous store: ciphertext only.
    from torch.distributed import TCPStore

    stranger = TCPStore("127.0.0.1", rdzv_port, is_master=False, timeout=timedelta(seconds=5))
    report["rendezvous"] = stranger.get("endpoints")  # a one-node job hands out no job description
    # 2. The oracle: garbage, a 100 MB frame, a hello forged for rank 1 with the job id.
    ctx = zmq.Context()
    try:
        for frames in ([b"garbage"], [b"\x01", b"{not json"], [b"\x02", b"x" * (100 << 20)],
                       encode_control(Hello(rank=1, token="0" * 64), job_id),
                       encode_control(Hello(rank=1, token=hello_token(b"a guessed secret", job_id, 1)), job_id)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(endpoints["oracle"])
            sock.send_multipart(frames)
            report.setdefault("plans_received", 0)
            report["plans_received"] += sock.poll(1500)  # a forged hello gets no plan
            sock.close()
    finally:
        ctx.term()
    report["done"] = True


@pytest.mark.slow
def test_a_job_under_attack_finishes_with_the_same_model_and_writes_no_password(small_criteo, tmp_path,
                                                                                 redis_servers, monkeypatch):
    from bagpipe.runner.export import load_model
    from bagpipe.runner.job import LaunchConfig, run_job

    monkeypatch.delenv("BAGPIPE_REDIS_PASSWORD", raising=False)
    base = RunConfig(data=str(small_criteo), policy="bagpipe", trainers=2, shards=2, batch_size=256,
                     iterations=24, cache_rows=3000, lead=2, horizon=6, eval_batches=2, checkpoint_every=12)
    # Reference: shards started outside the job, their password given in the URLs (finding 4).
    password = "url-password-that-must-not-leak"
    outside = redis_servers(2, job_password=password)
    urls = tuple(u.replace("redis://", f"redis://:{password}@") for u in outside.urls)
    run_job(base.replace(redis_urls=urls), tmp_path / "plain", quiet=True)
    export = tmp_path / "export.pt"
    subprocess.run([sys.executable, "-m", "bagpipe", "export", str(tmp_path / "plain"), "--out", str(export)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    files = [p for p in (tmp_path / "plain").rglob("*") if p.is_file()] + [export]
    assert any(p.name == "config.json" for p in files) and any(p.parent.name.startswith("iter") for p in files)
    for path in files:
        assert password.encode() not in path.read_bytes(), path
    # The same job with its own shards, while a neighbour tries every socket.
    run_dir = tmp_path / "attacked"
    rdzv_port = free_port("127.0.0.1")
    report: dict = {}
    stop = threading.Event()
    attacker = threading.Thread(target=_attack, args=(run_dir, rdzv_port, report, stop), daemon=True)
    attacker.start()
    try:
        run_job(base.replace(oracle_bind=f"tcp://127.0.0.1:{free_port('127.0.0.1')}"), run_dir, quiet=True,
                launch=LaunchConfig(rendezvous_port=rdzv_port))
    finally:
        stop.set()
        attacker.join(30)
    assert report.get("done"), report
    assert report["redis"] and all("NOAUTH" in out for out in report["redis"]), report["redis"]
    assert b"tcp://" not in report["rendezvous"] and b"redis://" not in report["rendezvous"]
    assert report["plans_received"] == 0
    oracle_log = (run_dir / "oracle.log").read_text()
    assert "dropped a message" in oracle_log and "without this job's token" in oracle_log
    assert _mode(run_dir / "secret") == 0o600
    ref, got = load_model(tmp_path / "plain"), load_model(run_dir)
    for name, tensor in ref["dense"].items():
        assert got["dense"][name].equal(tensor), name
    for table, rows in ref["tables"].items():
        assert got["tables"][table]["ids"].equal(rows["ids"]), table
        assert got["tables"][table]["weights"].equal(rows["weights"]), table


def test_overrides_on_node_1_are_refused_by_name(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bagpipe", "run", "--run-dir", str(tmp_path / "n1"), "--set", "lr=0.1",
                          "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--master-port", "29999",
                          "--secret-file", str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 1
    assert "--set lr=0.1 on node 1: only node 0 takes a config and overrides" in out.stderr
    assert "Traceback" not in out.stderr


def test_several_nodes_need_a_shared_secret_file():
    from bagpipe.runner.job import LaunchConfig

    with pytest.raises(ConfigError, match="--secret-file .* is required with several nodes.*bagpipe keys"):
        LaunchConfig(nnodes=2, node_rank=1, nproc_per_node=1, master_port=29999)


MASTER = """
import sys, time
from bagpipe.rendezvous import Rendezvous
r = Rendezvous("127.0.0.1", int(sys.argv[1]), True, 30.0, bytes.fromhex(sys.argv[2]))
print("ready", flush=True)
r.open({"ok": 1}, 2)
time.sleep(600)
"""


def test_a_node_whose_master_goes_silent_stops_naming_it(tmp_path):
    """Finding 13: node 0 behind a cut link (here: frozen with SIGSTOP, so TCP stays up and nothing
    answers) is reported within the rendezvous's operation timeout, naming host:port."""
    import signal

    from bagpipe.rendezvous import OPERATION_TIMEOUT_S

    secret = write_secret(tmp_path / "secret")
    port = free_port("127.0.0.1")
    master = subprocess.Popen([sys.executable, "-c", MASTER, str(port), secret.hex()], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert master.stdout.readline().strip() == "ready"
        node1 = Rendezvous("127.0.0.1", port, False, 120.0, secret, node_rank=1)  # the join timeout is long
        assert node1.join() == {"ok": 1}
        os.kill(master.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RendezvousError, match=f"lost the rendezvous store at 127.0.0.1:{port}"):
            node1.poll("finished")
        assert time.monotonic() - started < OPERATION_TIMEOUT_S + 5
    finally:
        os.kill(master.pid, signal.SIGKILL)
        master.wait()
