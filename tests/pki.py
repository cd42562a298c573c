"""Certificates for tests, made with the ``openssl`` CLI: a CA, a server certificate for
``localhost`` only (clients dialing 127.0.0.1 override the TLS name to it), client
certificates with the CNs asked for, and a second, unrelated CA (``other``)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)


def _leaf(d: Path, name: str, cn: str, ext: str, serial: int) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
             str(serial), "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
             cwd=d)


def make_pki(d: Path, clients: Sequence[tuple[str, str]]) -> Path:
    """``ca``, ``other`` (an unrelated CA), ``server`` (for ``localhost``) and one client
    certificate per ``(file name, CN)`` of ``clients``, under ``d``; skips the test when the
    openssl CLI is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed: the tests make their certificates with it")
    _ca(d, "ca")
    _ca(d, "other")
    _leaf(d, "server", "fedkrso-server", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost", 1)
    for serial, (name, cn) in enumerate(clients, 2):
        _leaf(d, name, cn, "extendedKeyUsage=clientAuth", serial)
    return d


def server_tls(pki: Path, **extra) -> dict:
    """A ``security`` section serving TLS with the server certificate, plus ``extra``."""
    return {"tls_cert": str(pki / "server.crt"), "tls_key": str(pki / "server.key"), **extra}


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text("# client_id token\n" + "".join(f"{cid} {tok}\n" for cid, tok in tokens.items()))
    return path
