"""A throwaway certificate authority made with the ``openssl`` CLI, for TLS tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# EC keys: generated in milliseconds, and both grpc and Triton accept them.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed for ``server_name`` only, and a
    client certificate it signed (for mutual TLS)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _issue(where: Path, name: str, subject: str, extensions: str, ca: Path, ca_key: Path) -> None:
    key, csr, ext = where / f"{name}.key", where / f"{name}.csr", where / f"{name}.ext"
    _openssl("req", *_NEW_KEY, "-keyout", key, "-out", csr, "-subj", subject)
    ext.write_text(extensions)
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "2"),
        *("-days", "1", "-extfile", ext, "-out", where / f"{name}.pem"),
    )


def make_pki(where: Path, server_name: str = "localhost") -> Pki:
    """Make the files in ``where``. The server certificate names no IP address, so a
    client that dials 127.0.0.1 must be told to expect ``server_name``."""
    ca, ca_key = where / "ca.pem", where / "ca.key"
    _openssl(
        *("req", "-x509", *_NEW_KEY, "-days", "1", "-keyout", ca_key, "-out", ca),
        *("-subj", "/CN=meshgate test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    server_ext = f"subjectAltName=DNS:{server_name}\nextendedKeyUsage=serverAuth\n"
    _issue(where, "server", f"/CN={server_name}", server_ext, ca, ca_key)
    _issue(where, "client", "/CN=meshgate", "extendedKeyUsage=clientAuth\n", ca, ca_key)
    return Pki(
        ca=ca,
        server_cert=where / "server.pem",
        server_key=where / "server.key",
        client_cert=where / "client.pem",
        client_key=where / "client.key",
    )
