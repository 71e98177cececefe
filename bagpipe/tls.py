"""TLS for store traffic between hosts: certificates (``bagpipe keys --tls-host``) and their use.

``write_certificates(DIR, hosts)`` makes a private CA and one redis-server
certificate signed by it, valid for the given addresses and loopback, with
the ``openssl`` command (keys generated to a pipe and written owner-only
with their final mode). With config key ``redis_tls_dir = DIR`` (copied to
every node), the shards a job starts listen with ``tls-port`` only (the
plain port is off) and the store clients connect with ``rediss://``,
checking the server's certificate against ``DIR/ca.crt``. TLS encrypts the
rows on the wire; the password (bagpipe.auth) still decides who may connect.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path

from bagpipe.auth import write_private, write_public

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "redis.crt", "redis.key"
VALID_DAYS = 825


class TlsError(RuntimeError):
    """Certificates that cannot be made or found (names the file or the command)."""


def _openssl(args: list[str], stdin: bytes | None = None) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        raise TlsError("the openssl command is not on PATH (apt-get install openssl)")
    out = subprocess.run([binary] + args, input=stdin, capture_output=True, timeout=60)
    if out.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {out.stderr.decode(errors='replace').strip()[-300:]}")
    return out.stdout


def _new_key() -> bytes:
    return _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])


def write_certificates(out: Path, hosts: list[str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(hosts) | {"127.0.0.1", "localhost"})
    san = ",".join((f"IP:{h}" if _is_ip(h) else f"DNS:{h}") for h in names)
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # owner-only (mkdtemp's 0700)
        t = Path(tmp)
        write_private(t / "ca.key", _new_key())
        write_private(out / SERVER_KEY, _new_key())
        _openssl(["req", "-x509", "-new", "-key", str(t / "ca.key"), "-subj", "/CN=bagpipe job CA",
                  "-days", str(VALID_DAYS), "-out", str(t / CA_CERT)])
        _openssl(["req", "-new", "-key", str(out / SERVER_KEY), "-subj", "/CN=bagpipe redis-server",
                  "-out", str(t / "redis.csr")])
        (t / "ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
        _openssl(["x509", "-req", "-in", str(t / "redis.csr"), "-CA", str(t / CA_CERT), "-CAkey", str(t / "ca.key"),
                  "-CAcreateserial", "-days", str(VALID_DAYS), "-extfile", str(t / "ext"),
                  "-out", str(t / SERVER_CERT)])
        # The CA's key is not kept: no one can sign another certificate this job's clients trust.
        for name in (CA_CERT, SERVER_CERT):
            write_public(out / name, (t / name).read_bytes())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def tls_files(tls_dir: str) -> dict[str, Path]:
    d = Path(tls_dir)
    files = {"ca": d / CA_CERT, "cert": d / SERVER_CERT, "key": d / SERVER_KEY}
    for path in files.values():
        if not path.is_file():
            raise TlsError(f"config key 'redis_tls_dir': {path} does not exist (`bagpipe keys --out {d} --tls-host "
                           "HOST` writes it)")
    return files
