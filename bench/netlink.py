"""A real network link for the bench: the shards on another host (a network namespace), behind a rate limit.

The in-process stand-in (``store_latency_us``, ``store_bandwidth_gbps``)
sleeps in the client; it cannot show TCP, batching into segments, or several
trainers sharing one link. Here the redis-server shards run in a network
namespace of their own, reached over a veth pair whose two ends each carry
a token-bucket filter (``tc qdisc ... tbf``) at the link's rate, so every
byte of store traffic crosses a real, rate-limited TCP path.

Delay: ``tc netem`` would add it, but not every kernel has it (the machines
this project is measured on do not: "Specified qdisc kind is unknown"), so
latency stays the client-side stand-in, added on top of the real link.
``available()`` says what this machine allows.

Needs root and iproute2 (``ip``, ``tc``). Everything made is removed on exit,
and the servers are stopped by their pid.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from bagpipe.auth import split_url_password

_SUBNET = "10.214"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)


def available() -> str:
    """'' when a rate-limited link can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}`"
    return ""


class EmulatedLink:
    """Shards in namespace ``bpl<pid>`` at ``10.214.<n>.2``, this host at ``.1``, ``rate_gbps`` each way."""

    def __init__(self, rate_gbps: float, shards: int, workdir: Path) -> None:
        why = available()
        if why:
            raise RuntimeError(f"cannot emulate a link: {why}")
        if rate_gbps <= 0:
            raise ValueError("the link's rate must be > 0 (store_bandwidth_gbps)")
        self.rate_gbps, self.shards, self.workdir = rate_gbps, shards, Path(workdir)
        n = os.getpid() % 250 + 1
        self.ns, self.outer, self.inner = f"bpl{os.getpid()}", f"bpl{os.getpid()}a", f"bpl{os.getpid()}b"
        self.host_addr, self.shard_addr = f"{_SUBNET}.{n}.1", f"{_SUBNET}.{n}.2"
        self.urls: list[str] = []
        self._servers: subprocess.Popen | None = None
        self._made: list[str] = []

    def __enter__(self) -> "EmulatedLink":
        try:
            self._make()
            self._start_servers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _must(self, *cmd: str) -> None:
        out = _run(*cmd)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")

    def _make(self) -> None:
        self._must("ip", "netns", "add", self.ns)
        self._made.append("ns")
        self._must("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._made.append("link")
        self._must("ip", "link", "set", self.inner, "netns", self.ns)
        self._must("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.outer)
        self._must("ip", "link", "set", self.outer, "up")
        self._must("ip", "-n", self.ns, "addr", "add", f"{self.shard_addr}/30", "dev", self.inner)
        self._must("ip", "-n", self.ns, "link", "set", self.inner, "up")
        self._must("ip", "-n", self.ns, "link", "set", "lo", "up")
        # A burst of 1 ms at the rate (at least 64 KiB) keeps TCP from stalling on the bucket.
        rate = f"{self.rate_gbps * 1000:.3f}mbit"
        burst = f"{max(64 * 1024, int(self.rate_gbps * 1e9 / 8 / 1000))}b"
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"]
        self._must("tc", "qdisc", "add", "dev", self.outer, *tbf)
        self._must("ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", self.inner, *tbf)

    def _start_servers(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "servers.err", "wb")
        # `ip netns exec` execs the command, so this pid is the `bagpipe servers` process itself.
        # Shards on a non-loopback address take a password (docs/security.md); the job gets it in the
        # URLs, which it keeps out of every file it writes.
        password = secrets.token_hex(16)
        self._servers = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "bagpipe", "servers", "--shards", str(self.shards),
             "--host", self.shard_addr, "--dir", str(self.workdir / "redis")],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "BAGPIPE_REDIS_PASSWORD": password})
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self._servers.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                self.urls = [u.replace("redis://", f"redis://:{password}@", 1) for u in json.loads(line)["urls"]]
                return
        raise RuntimeError(f"the shards behind the link did not start: {(self.workdir / 'servers.err').read_text()[-500:]}")

    def close(self) -> None:
        if self._servers is not None and self._servers.poll() is None:
            self._servers.send_signal(signal.SIGTERM)
            try:
                self._servers.wait(20)
            except subprocess.TimeoutExpired:
                self._servers.kill()
                self._servers.wait()
        if "link" in self._made:
            _run("ip", "link", "del", self.outer)
        if "ns" in self._made:
            _run("ip", "netns", "del", self.ns)
        self._made = []

    def describe(self) -> dict:
        shards = [split_url_password(u)[0] for u in self.urls]  # the password stays out of the report
        return {"kind": "veth + tbf", "rate_gbps": self.rate_gbps, "shards": shards, "namespace": self.ns}
