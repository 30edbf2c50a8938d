"""Certificates, keys and CRLs made by strongSwan's ``pki`` tool, for the certificate tests.

``pki`` is an encoder independent of the ``cryptography`` package our code uses, so a chain
made here checks our parsing and verification against strongSwan's idea of X.509. Files are
written in PEM under a directory the caller owns; ``PkiTool.available()`` says whether the tool
is installed.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from dataclasses import dataclass

PKI = "pki"

# pki --gen --type / --size for the key kinds the tests use
KEY_TYPES = {
    "rsa2048": ("rsa", "2048"),
    "rsa3072": ("rsa", "3072"),
    "rsa4096": ("rsa", "4096"),
    "p256": ("ecdsa", "256"),
    "p384": ("ecdsa", "384"),
    "p521": ("ecdsa", "521"),
    "ed25519": ("ed25519", ""),
}


@dataclass(frozen=True)
class Issued:
    """One certificate and its private key (PEM files)."""

    cert: pathlib.Path
    key: pathlib.Path
    kind: str


class PkiTool:
    def __init__(self, workdir: pathlib.Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def available() -> bool:
        return shutil.which(PKI) is not None

    def _run(self, args: list[str], stdin: bytes | None = None) -> bytes:
        proc = subprocess.run(
            [PKI, *args], input=stdin, capture_output=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pki {' '.join(args)} failed: {proc.stderr.decode()[-500:]}")
        return proc.stdout

    def key(self, name: str, kind: str) -> pathlib.Path:
        ktype, size = KEY_TYPES[kind]
        args = ["--gen", "--type", ktype, "--outform", "pem"]
        if size:
            args += ["--size", size]
        path = self.dir / f"{name}.key"
        path.write_bytes(self._run(args))
        path.chmod(0o600)
        return path

    def self_signed(self, name: str, kind: str, dn: str, *, lifetime: int = 30) -> Issued:
        key = self.key(name, kind)
        args = ["--self", "--ca", "--in", str(key), "--dn", dn]
        args += ["--lifetime", str(lifetime), "--outform", "pem"]
        cert = self.dir / f"{name}.crt"
        cert.write_bytes(self._run(args))
        return Issued(cert, key, kind)

    def issue(
        self,
        name: str,
        kind: str,
        dn: str,
        issuer: Issued,
        *,
        ca: bool = False,
        sans: tuple[str, ...] = (),
        lifetime: int = 30,
        not_before: str | None = None,
        not_after: str | None = None,
        pathlen: int | None = None,
        flags: tuple[str, ...] = (),
        key: pathlib.Path | None = None,
    ) -> Issued:
        """A certificate for a new key (or ``key``) signed by ``issuer``. Dates as
        ``"YYYY-MM-DD hh:mm:ss"`` UTC (pki's --dateform is set to match)."""
        key = key or self.key(name, kind)
        pub = self._run(["--pub", "--in", str(key), "--outform", "pem"])
        args = ["--issue", "--cacert", str(issuer.cert), "--cakey", str(issuer.key)]
        args += ["--type", "pub", "--dn", dn, "--outform", "pem", "--lifetime", str(lifetime)]
        if ca:
            args.append("--ca")
        if pathlen is not None:
            args += ["--pathlen", str(pathlen)]
        for s in sans:
            args += ["--san", s]
        for f in flags:
            args += ["--flag", f]
        if not_before or not_after:
            args += ["--dateform", "%Y-%m-%d %H:%M:%S"]
            if not_before:
                args += ["--not-before", not_before]
            if not_after:
                args += ["--not-after", not_after]
        cert = self.dir / f"{name}.crt"
        cert.write_bytes(self._run(args, stdin=pub))
        return Issued(cert, key, kind)

    def crl(self, name: str, issuer: Issued, revoked: tuple[Issued, ...]) -> pathlib.Path:
        args = ["--signcrl", "--cacert", str(issuer.cert), "--cakey", str(issuer.key)]
        args += ["--lifetime", "15", "--outform", "pem"]
        for r in revoked:
            args += ["--reason", "key-compromise", "--cert", str(r.cert)]
        path = self.dir / f"{name}.crl"
        path.write_bytes(self._run(args))
        return path
