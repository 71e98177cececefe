"""The job's secret and what is derived from it: who may talk to a job's sockets.

A job makes one random secret at start (``RunDir.secret_path``, created
owner-only with its final mode, never widened). From it, by HMAC-SHA256
with a fixed label per use, come:

* the password of the redis-server shards the job starts (``requirepass``),
  given to the store clients through the environment, never a file the job
  writes for others to read (config, endpoints, checkpoints, exports);
* the token each trainer's plan-stream hello carries (bound to the job id
  and the rank), without which the oracle ignores the connection;
* the keys that seal every value on the rendezvous store: encrypted (an
  HMAC-SHA256 keystream) and then authenticated (HMAC-SHA256 over the key
  name, nonce and ciphertext), so a client without the secret can neither
  read the job's config and endpoints nor plant a value the nodes accept.

Several nodes share one secret: ``bagpipe keys`` writes ``job.secret``, the
user copies it to every node and names it with ``--secret-file`` (see
docs/security.md). Only the standard library's primitives are used
(``hmac``, ``hashlib``, ``secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

SECRET_BYTES = 32
NONCE_BYTES = 16
TAG_BYTES = 32


class AuthError(RuntimeError):
    """A secret that cannot be read or used, or a value that does not authenticate (names what and where)."""


# ------------------------------------------------------------------ files
def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, with that mode from its first byte (O_EXCL: a file
    someone else planted there is replaced, never written through)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Create ``path`` readable by all and writable by its owner only (or less, as the umask says)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def write_secret(path: Path, secret: bytes | None = None) -> bytes:
    """Write ``secret`` (a fresh one if None) to ``path`` as hex, owner-only; returns it."""
    secret = new_secret() if secret is None else secret
    write_private(Path(path), secret.hex().encode() + b"\n")
    return secret


def read_secret(path: Path, what: str = "the job secret") -> bytes:
    """The secret in ``path``; refused when others may read the file or it is not one."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise AuthError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                        "make it owner-only (chmod 600) and treat the secret as known")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise AuthError(f"{what} {path} does not hold a secret (hex, at least 16 bytes; `bagpipe keys` writes one)")
    return secret


# ---------------------------------------------------------------- derived
def derive(secret: bytes, label: str) -> bytes:
    """A key for one use, independent of the keys for every other label."""
    return hmac.new(secret, b"bagpipe/" + label.encode(), hashlib.sha256).digest()


def redis_password(secret: bytes) -> str:
    """The ``requirepass`` of the shards a job starts."""
    return derive(secret, "redis").hex()


def hello_token(secret: bytes, job: str, rank: int) -> str:
    """What a trainer's hello carries: proof of the secret, for this job and this rank only."""
    return hmac.new(derive(secret, "hello"), f"{job}\0{rank}".encode(), hashlib.sha256).hexdigest()


def hello_valid(secret: bytes, job: str, rank: int, token: str) -> bool:
    return hmac.compare_digest(hello_token(secret, job, rank), token)


def _keystream(key: bytes, nonce: bytes, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(out[:n])


def seal(secret: bytes, name: str, plaintext: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated for the store key ``name`` (so it cannot be moved to another)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    stream = _keystream(derive(secret, "seal-encrypt"), nonce, len(plaintext))
    body = nonce + bytes(a ^ b for a, b in zip(plaintext, stream))
    tag = hmac.new(derive(secret, "seal-mac"), name.encode() + b"\0" + body, hashlib.sha256).digest()
    return body + tag


def unseal(secret: bytes, name: str, blob: bytes) -> bytes:
    """The plaintext ``seal`` sealed; ``AuthError`` when ``blob`` was not sealed with this secret for ``name``."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise AuthError(f"value under '{name}' does not authenticate (too short to be sealed: a forgery)")
    body, tag = blob[:-TAG_BYTES], blob[-TAG_BYTES:]
    want = hmac.new(derive(secret, "seal-mac"), name.encode() + b"\0" + body, hashlib.sha256).digest()
    if not hmac.compare_digest(want, tag):
        raise AuthError(f"value under '{name}' does not authenticate (another job's secret, or a forgery)")
    nonce, cipher = body[:NONCE_BYTES], body[NONCE_BYTES:]
    stream = _keystream(derive(secret, "seal-encrypt"), nonce, len(cipher))
    return bytes(a ^ b for a, b in zip(cipher, stream))


# ------------------------------------------------------------ redis URLs
def split_url_password(url: str) -> tuple[str, str | None]:
    """``redis://[user]:PW@host:port/db`` -> (the URL without its password, PW or None)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    user = parts.username or ""
    netloc = (f"{user}@" if user else "") + parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)
