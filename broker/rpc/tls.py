"""gRPC credentials for mutual TLS, built from PEM files, and the channel to the broker every
process that calls it opens with them (plain TCP when no TLS is configured).

Production brings its own CA and certificates and points KEYBROKER_TLS_CA / _CERT / _KEY (and
_CLIENT_CERT / _CLIENT_KEY for processes that call the broker) at them; `keybroker certs init`
(broker.cli.dev_certs) writes a development set.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from broker.core.errors import ConfigurationError
from broker.core.settings import Settings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate issued by `ca`."""
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=_read(ca, "TLS CA bundle"),
        require_client_auth=True,
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca`, present `cert`."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA bundle"),
        private_key=_read(key, "TLS client key"),
        certificate_chain=_read(cert, "TLS client certificate"),
    )


def listen_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The server's credentials when the settings configure mutual TLS (None: plain TCP, which
    Settings.check_listen allows on loopback only). Read before the server is made, so a missing
    file stops the start before there is a server to clean up."""
    if not settings.tls:
        return None
    return server_credentials(
        Path(settings.tls_ca), Path(settings.tls_cert), Path(settings.tls_key)
    )


def broker_channel(settings: Settings, address: str) -> grpc.aio.Channel:
    """A channel to the broker at `address`: mutual TLS with this process's client certificate
    (Settings.client_cert_and_key) when TLS is configured, else plain TCP."""
    if not settings.tls_ca:
        return grpc.aio.insecure_channel(address)
    cert, key = settings.client_cert_and_key
    if not cert or not key:
        raise ConfigurationError("a TLS client needs a certificate and key (--tls-client-cert)")
    credentials = channel_credentials(Path(settings.tls_ca), Path(cert), Path(key))
    return grpc.aio.secure_channel(address, credentials)
