"""Endpoints published once, read everywhere: a torch.distributed ``TCPStore`` on node 0.

Node 0 hosts the store at ``MASTER_ADDR:rendezvous_port``; every node
publishes what it started (its redis-server shards) and reads what node 0
decided (the job's config, id, first iteration, the oracle's endpoint and
the full list of shards). Nobody types an address twice. Values are JSON:
nothing read from the store is unpickled.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

from torch.distributed import TCPStore


class RendezvousError(RuntimeError):
    """A node or the master that could not be reached or never answered (names host and port)."""


class Rendezvous:
    """JSON values under string keys, shared by the nodes of one job."""

    def __init__(self, host: str, port: int, is_master: bool, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        try:
            self.store = TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False, use_libuv=True)
        except (RuntimeError, OSError) as exc:
            what = "bind" if is_master else "reach"
            raise RendezvousError(f"cannot {what} the rendezvous store at {host}:{port} within "
                                  f"{timeout_s:g}s: {str(exc).splitlines()[0]}") from None

    def publish(self, key: str, value: object) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str, timeout_s: float | None = None, who: str = "") -> object:
        """Wait for ``key`` (at most ``timeout_s``) and return its value."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                raise RendezvousError(f"{who or key!s} did not arrive at the rendezvous store "
                                      f"{self.host}:{self.port} within {timeout_s:g}s")
            time.sleep(0.05)
        return json.loads(self.store.get(key))

    def poll(self, key: str) -> object | None:
        """The value of ``key`` if it is there now, else None."""
        try:
            return json.loads(self.store.get(key)) if self.store.check([key]) else None
        except (RuntimeError, OSError) as exc:  # DistNetworkError and kin: node 0 went away
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port} (node 0 stopped?): "
                                  f"{str(exc).splitlines()[0]}") from None
