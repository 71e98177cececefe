"""ZeroMQ CURVE for the plan stream between hosts: encryption, and only known trainers served.

``bagpipe keys --out DIR`` writes an oracle key pair and a trainer key pair
(ZeroMQ's certificate files, secret ones readable by the owner only). With
config key ``zmq_curve_dir = DIR`` (the same directory, copied to every
node), the oracle serves over CURVE and accepts only clients holding the
trainer key; trainers check the oracle's key. Without it, plans travel in
the clear: fine on loopback, not across an untrusted network.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from bagpipe.auth import write_private, write_public, write_secret

# Every message is bounded before ZeroMQ allocates it: the largest plan is a few MB.
MAX_MESSAGE_BYTES = 256 << 20


class CurveError(RuntimeError):
    pass


def write_keys(out: Path) -> None:
    """An oracle and a trainer key pair in ZeroMQ's certificate format; the secret files are created
    owner-only with that mode from the start (never world-readable, not even for a moment)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("oracle", "trainer"):
        public, secret = zmq.curve_keypair()
        _write_certificate(out / f"{name}.key", public, None)
        _write_certificate(out / f"{name}.key_secret", public, secret)


def _write_certificate(path: Path, public: bytes, secret: bytes | None) -> None:
    lines = ["#   ZeroMQ CURVE " + ("**Secret** " if secret else "Public ") + "Certificate (bagpipe keys)",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    data = ("\n".join(lines) + "\n").encode()
    if secret is not None:
        write_private(path, data)
    else:
        write_public(path, data)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"config key 'zmq_curve_dir': cannot read {path}: {exc}") from None


class ServerSecurity:
    """Applies CURVE (or nothing) to the oracle's socket; owns the authenticator thread."""

    def __init__(self, ctx: zmq.Context, curve_dir: str) -> None:
        self.auth: ThreadAuthenticator | None = None
        self.dir = Path(curve_dir) if curve_dir else None
        if self.dir is not None:
            self.public, self.secret = _load(self.dir / "oracle.key_secret")
            _load(self.dir / "trainer.key")  # fail early, naming the file
            self.auth = ThreadAuthenticator(ctx)
            self.auth.start()
            # Only clients whose public key is in the directory's *.key files are served.
            self.auth.configure_curve(domain="*", location=str(self.dir))

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if self.dir is not None:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_server = True

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()


def control_router(ctx: zmq.Context, security: ServerSecurity, endpoint: str, control_bytes: int) -> zmq.Socket:
    """A ROUTER bound to ``endpoint`` for peers that send control messages only (the oracle's for
    trainers, a worker's for the oracle): CURVE as ``security`` says, frames over ``control_bytes``
    refused by ZeroMQ before they are read, a send to a peer that is gone an error
    (ROUTER_MANDATORY). Raises ``zmq.ZMQError`` when it cannot bind."""
    sock = ctx.socket(zmq.ROUTER)
    security.apply(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, control_bytes)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close()
        raise
    return sock


def close_router(ctx: zmq.Context, security: ServerSecurity, sock: zmq.Socket, farewells: list[list]) -> None:
    """Send each message in ``farewells`` (identity frame first) without waiting, skipping a peer that
    is gone, then close the socket, the authenticator and the context."""
    for frames in farewells:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    sock.close()
    security.close()
    ctx.term()


def secure_client(sock: zmq.Socket, curve_dir: str) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if curve_dir:
        d = Path(curve_dir)
        public, secret = _load(d / "trainer.key_secret")
        server_public, _ = _load(d / "oracle.key")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagpipe keys", description="write the keys a job across hosts needs: "
                                     "CURVE key pairs for the plan stream, a job secret, TLS certificates")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tls-host", action="extend", nargs="+", default=[], metavar="HOST",
                        help="also write a CA and a redis-server certificate valid for these addresses (and loopback)")
    args = parser.parse_args(argv)
    write_keys(args.out)
    write_secret(args.out / "job.secret")
    print(f"wrote oracle and trainer key pairs and job.secret to {args.out}; set zmq_curve_dir = \"{args.out}\", "
          "give every node --secret-file DIR/job.secret, and copy the directory to every node (owner-only)")
    if args.tls_host:
        from bagpipe.tls import TlsError, write_certificates

        try:
            write_certificates(args.out, args.tls_host)
        except TlsError as exc:
            print(f"bagpipe keys: {exc}", file=sys.stderr)
            return 1
        print(f"wrote ca.crt, redis.crt and redis.key to {args.out}; set redis_tls_dir = \"{args.out}\"")
    return 0
