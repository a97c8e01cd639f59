"""A development CA for mutual TLS (`keybroker certs init`); the credentials built from PEM files
are broker.rpc.tls.

`init_dev_certs(dir)` writes, in `dir`:

    ca.pem, ca.key               the development CA (EC P-256, self-signed, 10 years)
    server.pem, server.key       the servers' certificate: SAN DNS localhost, IP 127.0.0.1 and ::1,
                                 extended key usage serverAuth and clientAuth
    {client}.pem, {client}.key   one client certificate per identity, SAN URI
                                 spiffe://keybroker.local/{client}, clientAuth only
                                 (admin, workers, app, auditor by default)
    policy.toml                  a development policy granting those identities their roles
                                 (broker.rpc.policy), written only when absent

Every certificate is EC P-256 signed with ECDSA-SHA256; the caller's identity the broker sees is
the SAN URI (broker.core.identity). Private keys are PKCS#8 PEM, unencrypted, created with mode
0600 (the directory 0700) and never logged. Existing files are not overwritten: `init` refuses,
so a CA that already issued certificates is never replaced by accident.

This CA is for development and tests. Production brings its own CA and certificates and points
KEYBROKER_TLS_CA / _CERT / _KEY (and _CLIENT_CERT / _CLIENT_KEY for processes that call the broker)
at them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.core.errors import ConfigurationError

TRUST_DOMAIN = "keybroker.local"
DEFAULT_CLIENTS = ("admin", "workers", "app", "auditor")
# The development policy's grants: the workers run the re-encrypt job, which lists and destroys
# superseded key versions (admin RPCs), besides fetching data keys.
DEV_ROLES = {
    "admin": ("admin",),
    "workers": ("admin", "data-plane"),
    "app": ("data-plane",),
    "auditor": ("auditor",),
}
_VALIDITY_CA = datetime.timedelta(days=3650)
_VALIDITY_LEAF = datetime.timedelta(days=825)


def spiffe_id(client: str) -> str:
    """The SAN URI of a development client certificate."""
    return f"spiffe://{TRUST_DOMAIN}/{client}"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in PEM."""

    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keybroker development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "keybroker development CA") -> Issued:
    """A self-signed CA certificate (path length 0: it signs leaves only)."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY_CA)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    common_name: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    server: bool = False,
) -> Issued:
    """A leaf certificate signed by `ca` with the given SANs; clientAuth, plus serverAuth when
    `server`."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError("the CA key must be an EC key")
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY_LEAF)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace an existing key or certificate; the mode is set at creation, so a
    # private key is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def dev_policy_toml(clients: Sequence[str]) -> str:
    """The development policy (broker.rpc.policy format) for the given client names."""
    lines = ["# Development policy written by `keybroker certs init` (see broker.rpc.policy)."]
    for client in clients:
        roles = DEV_ROLES.get(client, ())
        if not roles:
            continue
        quoted = ", ".join(f'"{r}"' for r in roles)
        lines += ["", f'[identities."{spiffe_id(client)}"]', f"roles = [{quoted}]"]
    return "\n".join(lines) + "\n"


def init_dev_certs(directory: Path, clients: Sequence[str] = DEFAULT_CLIENTS) -> list[Path]:
    """Writes a development CA, a server certificate and client certificates (see the module
    docstring); returns the files written. Refuses if any of them exists."""
    names = ["ca", "server", *clients]
    targets = [directory / f"{n}{ext}" for n in names for ext in (".pem", ".key")]
    existing = [p for p in targets if p.exists()]
    if existing:
        raise ConfigurationError(
            f"{existing[0]} exists; `certs init` never overwrites (use another --dir)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = make_ca()
    issued = {
        "ca": ca,
        "server": issue(ca, "localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True),
    }
    for client in clients:
        issued[client] = issue(ca, client, uris=(spiffe_id(client),))
    written: list[Path] = []
    for name in names:
        _write(directory / f"{name}.pem", issued[name].cert_pem, 0o644)
        _write(directory / f"{name}.key", issued[name].key_pem, 0o600)
        written += [directory / f"{name}.pem", directory / f"{name}.key"]
    policy = directory / "policy.toml"
    if not policy.exists():
        _write(policy, dev_policy_toml(clients).encode(), 0o644)
        written.append(policy)
    return written
