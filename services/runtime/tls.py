"""Mutual-TLS credentials for every gRPC server and client in the suite.

Layout of a TLS directory (as written by ``python -m services.runtime.devpki``)::

    ca.pem            the CA every peer's certificate must chain to
    <name>.pem        a certificate (server and client usage) for <name>
    <name>.key        its private key (mode 0600)

Servers load ``ca.pem`` plus their own pair (``server.pem`` / ``server.key`` by default) and
*require* a client certificate that chains to ``ca.pem``
(``grpc.ssl_server_credentials(..., require_client_auth=True)``); there is no insecure mode.

Clients load ``ca.pem`` plus their own pair and verify the server's certificate. The name the
server certificate is checked against is ``server_name`` (one of its DNS SANs): it is passed as
the channel option ``("grpc.ssl_target_name_override", server_name)``. That option is required
when connecting over a unix socket (``unix:/run/x/worker.sock``), where the target carries no
host name; over TCP it lets a client dial an address that is not in the certificate.
"""

from __future__ import annotations

from pathlib import Path

import grpc

CA_FILE = "ca.pem"
DEFAULT_SERVER_NAME = "server"
DEFAULT_CLIENT_NAME = "client"


class TlsConfigError(RuntimeError):
    """A TLS directory lacks a file or a file cannot be read."""

    log_safe = True  # the message names a path, never key material


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsConfigError(f"cannot read {path}: {e.strerror}") from None


def load_pair(tls_dir: Path, name: str) -> tuple[bytes, bytes]:
    """(private key PEM, certificate chain PEM) for ``name`` in ``tls_dir``."""
    return _read(tls_dir / f"{name}.key"), _read(tls_dir / f"{name}.pem")


def server_credentials(tls_dir: Path, name: str = DEFAULT_SERVER_NAME) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate (mTLS)."""
    ca = _read(tls_dir / CA_FILE)
    key, cert = load_pair(tls_dir, name)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(tls_dir: Path, name: str = DEFAULT_CLIENT_NAME) -> grpc.ChannelCredentials:
    """Client credentials presenting ``<name>.pem`` and trusting only ``ca.pem``."""
    ca = _read(tls_dir / CA_FILE)
    key, cert = load_pair(tls_dir, name)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options(server_name: str) -> list[tuple[str, str | int]]:
    """Channel options for reaching a server whose certificate names ``server_name``."""
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
    ]


def secure_channel(
    target: str, tls_dir: Path, *, server_name: str, client_name: str = DEFAULT_CLIENT_NAME
) -> grpc.Channel:
    """An mTLS channel to ``target`` (``host:port`` or ``unix:/path``)."""
    return grpc.secure_channel(
        target, channel_credentials(tls_dir, client_name), options=channel_options(server_name)
    )
