"""Endpoints published once, read everywhere: a torch.distributed ``TCPStore`` on node 0.

Node 0 hosts the store at ``MASTER_ADDR:rendezvous_port``; every node
publishes what it started (its redis-server shards) and reads what node 0
decided (the job's config, id, first iteration, the oracle's endpoint and
the full list of shards). Nobody types an address twice. Values are JSON:
nothing read from the store is unpickled.

The store listens on ``MASTER_ADDR`` only (a socket bound here and handed
to the TCPStore; loopback by default), and every value is sealed with the
job's secret (``bagpipe.auth.seal``): a client without it reads ciphertext
and any value it writes is refused by the nodes, naming the key.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta

from torch.distributed import TCPStore

from bagpipe.auth import AuthError, unseal, seal


# Every operation after the first connection: node 0 answers in milliseconds, so a store silent
# this long is behind a cut link (or stopped), and the node says so instead of waiting.
OPERATION_TIMEOUT_S = 10.0


class RendezvousError(RuntimeError):
    """A node or the master that could not be reached or never answered (names host and port)."""


def bound_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` only (TCPStore's own server would listen on every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


class Rendezvous:
    """JSON values under string keys, shared by the nodes of one job, sealed with its secret."""

    def __init__(self, host: str, port: int, is_master: bool, timeout_s: float, secret: bytes) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.secret = secret
        self._listener: socket.socket | None = None
        try:
            kwargs = {}
            if is_master:
                self._listener = bound_listener(host, port)
                kwargs["master_listen_fd"] = self._listener.fileno()
            self.store = TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False, use_libuv=True, **kwargs)
        except (RuntimeError, OSError) as exc:
            what = "bind" if is_master else "reach"
            raise RendezvousError(f"cannot {what} the rendezvous store at {host}:{port} within "
                                  f"{timeout_s:g}s: {str(exc).splitlines()[0]}") from None
        self.store.set_timeout(timedelta(seconds=min(timeout_s, OPERATION_TIMEOUT_S)))
        self.op_timeout_s = min(timeout_s, OPERATION_TIMEOUT_S)

    def _bounded(self, op, *args):
        """``op(*args)`` on the store, given up after ``op_timeout_s``: a TCPStore client whose server
        went silent retries past its own timeout, so the wait is bounded here (the call runs in a
        daemon thread; the store's calls release the GIL)."""
        result: list = []

        def call() -> None:
            try:
                result.append((True, op(*args)))
            except BaseException as exc:  # handed to the caller
                result.append((False, exc))

        worker = threading.Thread(target=call, daemon=True, name="rendezvous-op")
        worker.start()
        worker.join(self.op_timeout_s)
        if not result:
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port}: no answer within "
                                  f"{self.op_timeout_s:g}s (node 0 stopped, or the link to it is cut)")
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def publish(self, key: str, value: object) -> None:
        try:
            self._bounded(self.store.set, key, seal(self.secret, key, json.dumps(value).encode()))
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port} (node 0 stopped, or the "
                                  f"link to it is cut): {str(exc).splitlines()[0]}") from None

    def _value(self, key: str) -> object:
        try:
            return json.loads(unseal(self.secret, key, self._bounded(self.store.get, key)))
        except AuthError as exc:  # before RuntimeError, which it is
            raise RendezvousError(f"rendezvous store {self.host}:{self.port}: {exc}; every node must be given the "
                                  "same --secret-file") from None
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port} (node 0 stopped, or the link to it is cut): "
                                  f"{str(exc).splitlines()[0]}") from None

    def get(self, key: str, timeout_s: float | None = None, who: str = "") -> object:
        """Wait for ``key`` (at most ``timeout_s``) and return its value."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self._check(key):
            if time.monotonic() > deadline:
                raise RendezvousError(f"{who or key!s} did not arrive at the rendezvous store "
                                      f"{self.host}:{self.port} within {timeout_s:g}s")
            time.sleep(0.05)
        return self._value(key)

    def _check(self, key: str) -> bool:
        try:
            return self._bounded(self.store.check, [key])
        except (RuntimeError, OSError) as exc:  # DistNetworkError and kin: node 0 went away
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port} (node 0 stopped, or the link to it is cut): "
                                  f"{str(exc).splitlines()[0]}") from None

    def poll(self, key: str) -> object | None:
        """The value of ``key`` if it is there now, else None."""
        return self._value(key) if self._check(key) else None
