"""The plan stream over CURVE: known trainers are served, others never hear a thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from bagpipe.curve import CurveError, ServerSecurity, secure_client, write_keys


def _pair(tmp_path: Path, client_dir: Path):
    ctx = zmq.Context()
    server_dir = tmp_path / "keys"
    security = ServerSecurity(ctx, str(server_dir))
    server = ctx.socket(zmq.ROUTER)
    security.apply(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    secure_client(client, str(client_dir))
    client.connect(f"tcp://127.0.0.1:{port}")
    return ctx, security, server, client


def _close(ctx, security, *socks):
    for s in socks:
        s.close(linger=0)
    security.close()
    ctx.term()


def test_a_trainer_with_the_keys_is_served(tmp_path):
    write_keys(tmp_path / "keys")
    ctx, security, server, client = _pair(tmp_path, tmp_path / "keys")
    try:
        client.send(b"hello")
        assert server.poll(5000), "the server never heard the keyed client"
        ident, msg = server.recv_multipart()
        assert msg == b"hello"
        server.send_multipart([ident, b"plan"])
        assert client.poll(5000) and client.recv() == b"plan"
    finally:
        _close(ctx, security, server, client)


def test_a_client_with_other_keys_is_refused(tmp_path):
    write_keys(tmp_path / "keys")
    write_keys(tmp_path / "intruder")
    # The intruder knows the oracle's public key but holds another trainer key.
    (tmp_path / "intruder" / "oracle.key").write_bytes((tmp_path / "keys" / "oracle.key").read_bytes())
    ctx, security, server, client = _pair(tmp_path, tmp_path / "intruder")
    try:
        client.send(b"hello")
        assert not server.poll(1500), "a client without the trainer key got through"
    finally:
        _close(ctx, security, server, client)


def test_missing_keys_are_named(tmp_path):
    ctx = zmq.Context()
    try:
        with pytest.raises(CurveError, match="zmq_curve_dir.*oracle.key_secret"):
            ServerSecurity(ctx, str(tmp_path / "nowhere"))
    finally:
        ctx.term()
