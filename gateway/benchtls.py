"""A bench certificate authority and server certificate for ``gateway broker-config --tls``,
made with the ``openssl`` command (no new Python dependency): EC P-256 keys, written 0600 from
the first byte, the certificates 0644."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.errors import ConfigError


def openssl_exe() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError(
            "--tls needs the openssl command to create the bench CA and server certificate: "
            "install it (sudo apt-get install openssl) or leave out --tls"
        )
    return exe


def _openssl(args: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(
        [openssl_exe(), *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"openssl {args[0]} failed: {last}")


def _san(hostnames: Iterable[str]) -> str:
    out = []
    for h in dict.fromkeys(hostnames):
        try:
            ipaddress.ip_address(h)
            out.append(f"IP:{h}")
        except ValueError:
            out.append(f"DNS:{h}")
    return ",".join(out)


def make_bench_tls(
    tls_dir: Path, hostnames: Sequence[str], days: int, *, keep_ca: bool = False
) -> bool:
    """A bench CA (kept if ``keep_ca`` and present: clients keep trusting it) and a server
    certificate it signs (EC P-256) naming ``hostnames``. Returns True if the CA is new."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o755)  # the keys inside are 0600; the certificates are public
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    new_ca = not (keep_ca and (tls_dir / "ca.crt").exists() and (tls_dir / "ca.key").exists())
    for name in ("ca.key", "server.key", "server.csr") if new_ca else ("server.key",):
        (tls_dir / name).unlink(missing_ok=True)
    old = os.umask(0o077)  # openssl writes the keys: make them 0600 from the start
    try:
        if new_ca:
            _openssl(
                ["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", str(max(days, 3650)), "-subj", "/CN=gateway bench CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                tls_dir,
            )  # fmt: skip
        _openssl(
            ["req", "-new", *key, "-keyout", "server.key", "-out", "server.csr",
             "-subj", f"/CN={hostnames[0]}"],
            tls_dir,
        )  # fmt: skip
        ext = tls_dir / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName={_san(hostnames)}\n"
        )
        _openssl(
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", "0x" + secrets.token_hex(16), "-days", str(days),
             "-extfile", "server.ext", "-out", "server.crt"],
            tls_dir,
        )  # fmt: skip
    finally:
        os.umask(old)
        (tls_dir / "server.csr").unlink(missing_ok=True)
        (tls_dir / "server.ext").unlink(missing_ok=True)
    for name in ("ca.crt", "server.crt"):
        os.chmod(tls_dir / name, 0o644)
    return new_ca
