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

Sealing alone would let a value recorded from an earlier launch with the same
secret be replayed into this one. So every launch has a session: node 0 makes
a random one (``open``); node k proves freshness with a nonce of its own,
written in the clear under ``join/k`` when it connects, and node 0 seals the
job description for node k under a name that includes that nonce (``join``
reads it). Every later value is sealed under ``<session>/<key>``, so nothing
sealed in another launch authenticates in this one.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from datetime import timedelta

from torch.distributed import Store, TCPStore

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

    def __init__(self, host: str, port: int, is_master: bool, timeout_s: float, secret: bytes,
                 node_rank: int = 0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.secret, self.node_rank = secret, node_rank
        self.session = ""  # this launch's (``open`` on node 0, ``join`` elsewhere)
        self.nonce = secrets.token_hex(16)  # node k's proof that the job it reads is this launch's
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
        if not is_master:
            self._lost_unless(lambda: self._bounded(self.store.set, f"join/{node_rank}", self.nonce.encode()))

    # ------------------------------------------------------------ sessions
    def open(self, job: object, nnodes: int) -> None:
        """Node 0: start this launch's session and hand ``job`` to every other node, sealed for the
        nonce it sent (waits for each to connect, at most the join timeout)."""
        self.session = secrets.token_hex(16)
        for r in range(1, nnodes):
            nonce = self._wait_plain(f"join/{r}", f"node {r} (it never joined)")
            value = json.dumps({"session": self.session, "job": job}).encode()
            self._lost_unless(lambda: self._bounded(self.store.set, f"job/{r}",
                                                    seal(self.secret, f"job/{r}/{nonce}", value)))

    def join(self, who: str = "") -> object:
        """Node k: the job node 0 handed over for this launch (``open``); joins its session."""
        key = f"job/{self.node_rank}"
        self._wait(key, self.timeout_s, who)
        sealed = self._lost_unless(lambda: self._bounded(self.store.get, key))
        try:
            value = json.loads(unseal(self.secret, f"{key}/{self.nonce}", sealed))
        except AuthError:
            raise self._refused(key) from None
        self.session = value["session"]
        return value["job"]

    def _wait_plain(self, key: str, who: str) -> str:
        self._wait(key, self.timeout_s, who)
        raw = self._lost_unless(lambda: self._bounded(self.store.get, key))
        return raw.decode("ascii", "replace")

    def _name(self, key: str) -> str:
        if not self.session:
            raise RendezvousError(f"rendezvous key '{key}' used before the session was opened (open) or joined (join)")
        return f"{self.session}/{key}"

    def _lost_unless(self, op):
        try:
            return op()
        except RendezvousError:
            raise
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"lost the rendezvous store at {self.host}:{self.port} (node 0 stopped, or the "
                                  f"link to it is cut): {str(exc).splitlines()[0]}") from None

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
        sealed = seal(self.secret, self._name(key), json.dumps(value).encode())
        self._lost_unless(lambda: self._bounded(self.store.set, key, sealed))

    def _value(self, key: str) -> object:
        name = self._name(key)
        sealed = self._lost_unless(lambda: self._bounded(self.store.get, key))
        try:
            return json.loads(unseal(self.secret, name, sealed))
        except AuthError:
            raise self._refused(key) from None

    def _refused(self, key: str) -> RendezvousError:
        return RendezvousError(f"rendezvous store {self.host}:{self.port}: the value under '{key}' does not "
                               "authenticate: planted, sealed in another launch, or sealed with another secret "
                               "(every node must be given the same --secret-file)")

    def get(self, key: str, timeout_s: float | None = None, who: str = "") -> object:
        """Wait for ``key`` (at most ``timeout_s``) and return its value."""
        self._name(key)  # a session first
        self._wait(key, self.timeout_s if timeout_s is None else timeout_s, who)
        return self._value(key)

    def _wait(self, key: str, timeout_s: float, who: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._check(key):
            if time.monotonic() > deadline:
                raise RendezvousError(f"{who or key!s} did not arrive at the rendezvous store "
                                      f"{self.host}:{self.port} within {timeout_s:g}s")
            time.sleep(0.05)

    def _check(self, key: str) -> bool:
        return self._lost_unless(lambda: self._bounded(self.store.check, [key]))

    def poll(self, key: str) -> object | None:
        """The value of ``key`` if it is there now, else None."""
        return self._value(key) if self._check(key) else None


# ------------------------------------------------------- the trainers' store
SESSION_ENV = "BAGPIPE_SESSION"  # the launch's session, handed to the trainers by the job runner


class SealedStore(Store):
    """torchrun's store as the trainers' process group sees it, with every value sealed.

    torchrun's store (on node 0, at MASTER_ADDR:MASTER_PORT) cannot check who
    connects. What the process group exchanges on it (gloo's listening
    addresses, nccl's unique id) is set and read here sealed with the job's
    secret under ``<session>/<attempt>/<key>``: a client without the secret
    reads ciphertext and cannot point a rank at an address of its own, and
    nothing from another launch or restart authenticates. Counters (``add``)
    cannot be sealed; tampering with one can only stop the job, within the
    process group's timeout.
    """

    def __init__(self, inner: Store, secret: bytes, session: str, attempt: int = 0) -> None:
        super().__init__()
        self.inner, self.secret = inner, secret
        self.prefix = f"bagpipe/{session}/{attempt}/"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def set(self, key: str, value) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self.inner.set(self._key(key), seal(self.secret, self._key(key), data))

    def get(self, key: str) -> bytes:
        raw = self.inner.get(self._key(key))
        try:
            return unseal(self.secret, self._key(key), raw)
        except AuthError:
            if raw.isdigit():  # a counter that ``add`` made, read back as text
                return raw
            raise RendezvousError(f"torchrun's store: the value under '{key}' does not authenticate (planted, "
                                  "or sealed in another launch)") from None

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(self._key(key), amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self.inner.compare_set(self._key(key), expected, desired)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        keys = [self._key(k) for k in keys]
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check([self._key(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(self._key(key))

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)


def trainers_store(secret: bytes, session: str, timeout_s: float, environ=os.environ) -> SealedStore:
    """The sealed view of torchrun's store for this worker (MASTER_ADDR, MASTER_PORT and the restart
    count from torchrun's environment)."""
    host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    try:
        inner = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        raise RendezvousError(f"cannot reach torchrun's store at {host}:{port} within {timeout_s:g}s: "
                              f"{str(exc).splitlines()[0]}") from None
    return SealedStore(inner, secret, session, int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
