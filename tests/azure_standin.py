"""A LOCAL STAND-IN for Azure Key Vault's REST contract (not Azure).

No Azure emulator exists, so the azure-keyvault provider's tests drive the real
azure-keyvault-keys SDK against this small aiohttp server: HTTPS on 127.0.0.1 with a throwaway
certificate authority (its PEM file goes to the SDK as `connection_verify`), serving the few
endpoints the provider calls, in the JSON shapes of the keys API (2025-07-01, the SDK's default):

    GET  /keys/{name}[/]                 the latest version (KeyBundle: key, attributes, tags)
    GET  /keys/{name}/{version}
    POST /keys/{name}/{version}/wrapkey  {"alg", "value"} -> {"kid", "value"} (base64url)
    POST /keys/{name}/{version}/unwrapkey

Keys are real: RSA keys wrap with RSA-OAEP-256 (pyca/cryptography) and oct-HSM keys with AES key
wrap (RFC 3394); an RSA key's GET answers its public half only, an oct-HSM key's no material at
all, as Managed HSM does. It behaves as the notes in /work/shared/NOTES.md say Azure does:

- Bearer challenge: a request without the accepted token gets 401 with
  `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{tenant}",
  resource="..."`. The SDK checks that the vault's host is a subdomain of that resource (as
  x.vault.azure.net is of vault.azure.net); 127.0.0.1 has no parent domain, but the SDK's test
  is a suffix match on host:port, so the stand-in names `https://0.0.1:{port}` and the SDK's
  check stays on (no `verify_challenge_resource=False` anywhere).
- A disabled key answers wrapKey and unwrapKey with 403 Forbidden, inner code KeyDisabled, and
  still answers GET (with enabled: false). Outside nbf/exp, wrapKey answers 403 and unwrapKey
  works. `forbid` answers the key's wrap/unwrap with 403, inner code KeyOperationForbidden.
- `throttle(n)` answers the key's next n requests with 429 Throttled and Retry-After: 1;
  `deleted` and unknown names or versions answer 404 KeyNotFound; bad ciphertext 400
  BadParameter. Errors have the service's shape {"error": {"code", "message", "innererror"}}.

What it does not model: access policies and RBAC, list/create/rotate, key release, request
signing headers, real throttling limits.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import ipaddress
import json
import os
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from azure.core.credentials import AccessToken
from azure.keyvault.keys._shared import http_challenge_cache
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOKEN = "stand-in-access-token"
"""The only bearer token the stand-in accepts."""
TENANT = "72f988bf-0000-4000-8000-000000000000"
API_VERSION = "2025-07-01"
RSA_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey")
OCT_OPS = ("encrypt", "decrypt", "wrapKey", "unwrapKey")
_OAEP_256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_AES_KW = {16: "A128KW", 24: "A192KW", 32: "A256KW"}


class StaticTokenCredential:
    """An AsyncTokenCredential with a fixed token: the identity the stand-in accepts (or, with
    another token, one it rejects). Records what the SDK asked it for."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[tuple[str, ...], str | None]] = []
        self.closed = False

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()


@dataclass
class KeyVersion:
    """One version of a stand-in key. Switch `enabled`, `not_before`, `expires` freely."""

    version: str
    kty: str
    material: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | bytes
    key_ops: tuple[str, ...]
    enabled: bool = True
    not_before: dt.datetime | None = None
    expires: dt.datetime | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class StandInKey:
    """A stand-in key: its versions (the last is the latest) and per-key switches."""

    name: str
    versions: list[KeyVersion]
    recovery_level: str | None = "Recoverable"
    deleted: bool = False
    forbidden: bool = False
    """wrapKey and unwrapKey answer 403 KeyOperationForbidden."""
    throttled: int = 0
    """The next `throttled` requests for this key answer 429."""

    @property
    def latest(self) -> KeyVersion:
        return self.versions[-1]

    def version(self, version: str) -> KeyVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    def throttle(self, requests: int) -> None:
        self.throttled = requests


class KeyVaultStandIn:
    """See the module docstring. `async with KeyVaultStandIn(tmp_path) as vault: vault.url`."""

    def __init__(self, directory: Path, *, tenant: str = TENANT) -> None:
        self._directory = directory
        self.tenant = tenant
        self.keys: dict[str, StandInKey] = {}
        self.calls: Counter[str] = Counter()
        """Requests answered, by kind: challenge, get, wrapkey, unwrapkey."""
        self.ca_file = directory / "standin-ca.pem"
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def resource(self) -> str:
        """What the challenge names (see the module docstring)."""
        return f"https://0.0.1:{self.port}"

    async def __aenter__(self) -> KeyVaultStandIn:
        # The SDK caches each vault URL's bearer challenge for the whole process; a new stand-in
        # may get the port of an earlier one, whose challenge must not be taken for its own.
        http_challenge_cache.clear()
        server_context = _tls(self._directory, self.ca_file)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add_rsa_key(
        self,
        name: str,
        *,
        versions: int = 1,
        hsm: bool = False,
        recovery_level: str | None = "Recoverable",
        key_ops: tuple[str, ...] = RSA_OPS,
    ) -> StandInKey:
        kty = "RSA-HSM" if hsm else "RSA"
        return self._add(
            name,
            [KeyVersion(uuid.uuid4().hex, kty, _new_rsa_key(), key_ops) for _ in range(versions)],
            recovery_level,
        )

    def add_oct_key(
        self,
        name: str,
        *,
        material: bytes | None = None,
        versions: int = 1,
        recovery_level: str | None = "Recoverable",
    ) -> StandInKey:
        """An oct-HSM key (Managed HSM); `material` fixes the first version's AES key."""
        keys = [material or os.urandom(32)] + [os.urandom(32) for _ in range(1, versions)]
        return self._add(
            name,
            [KeyVersion(uuid.uuid4().hex, "oct-HSM", k, OCT_OPS) for k in keys],
            recovery_level,
        )

    def add_ec_key(self, name: str) -> StandInKey:
        key = ec.generate_private_key(ec.SECP256R1())
        return self._add(name, [KeyVersion(uuid.uuid4().hex, "EC", key, ("sign", "verify"))], None)

    def _add(self, name: str, versions: list[KeyVersion], recovery_level: str | None) -> StandInKey:
        key = self.keys[name] = StandInKey(name, versions, recovery_level)
        return key

    async def _handle(self, request: web.Request) -> web.Response:
        if request.query.get("api-version") != API_VERSION:
            return _error(400, "BadParameter", "The api-version is missing or not supported.")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.calls["challenge"] += 1
            response = _error(401, "Unauthorized", "AKV10000: Request is missing a Bearer token.")
            response.headers["WWW-Authenticate"] = (
                f'Bearer authorization="https://login.microsoftonline.com/{self.tenant}", '
                f'resource="{self.resource}"'
            )
            return response
        parts = request.path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "keys":
            return _error(404, "NotFound", "No such endpoint in this stand-in.")
        key = self.keys.get(parts[1])
        if key is not None and key.throttled > 0:
            key.throttled -= 1
            self.calls["throttled"] += 1
            response = _error(
                429,
                "Throttled",
                "Request was not processed because too many requests were received.",
            )
            response.headers["Retry-After"] = "1"
            return response
        version_name = parts[2] if len(parts) > 2 else ""
        version = None
        if key is not None and not key.deleted:
            version = key.version(version_name) if version_name else key.latest
        if key is None or version is None:
            return _error(
                404,
                "KeyNotFound",
                f"A key with (name/id) {parts[1]} was not found in this key vault.",
            )
        if request.method == "GET" and len(parts) <= 3:
            self.calls["get"] += 1
            return web.json_response(self._bundle(key, version))
        if request.method == "POST" and len(parts) == 4 and parts[3] in ("wrapkey", "unwrapkey"):
            self.calls[parts[3]] += 1
            body = await request.json()
            return self._operate(parts[3], key, version, body["alg"], _b64decode(body["value"]))
        return _error(405, "MethodNotAllowed", "Not supported by this stand-in.")

    def _operate(
        self, operation: str, key: StandInKey, version: KeyVersion, alg: str, value: bytes
    ) -> web.Response:
        op_name = "wrapKey" if operation == "wrapkey" else "unwrapKey"
        if key.forbidden or op_name not in version.key_ops:
            return _error(
                403,
                "Forbidden",
                f"Operation {op_name} is not permitted on this key.",
                inner="KeyOperationForbidden",
            )
        if not version.enabled:
            return _error(
                403,
                "Forbidden",
                f"Operation {op_name} is not allowed on a disabled key.",
                inner="KeyDisabled",
            )
        now = dt.datetime.now(dt.UTC)
        if operation == "wrapkey" and (
            (version.not_before is not None and now < version.not_before)
            or (version.expires is not None and now >= version.expires)
        ):
            return _error(
                403,
                "Forbidden",
                f"Operation {op_name} is not allowed outside the key's validity period.",
            )
        try:
            result = _crypt(operation, version, alg)(value)
        except _Unsupported as exc:
            return _error(400, "BadParameter", str(exc))
        except (ValueError, InvalidUnwrap):
            return _error(400, "BadParameter", "The parameter is incorrect.")
        kid = f"{self.url}/keys/{key.name}/{version.version}"
        return web.json_response({"kid": kid, "value": _b64encode(result)})

    def _bundle(self, key: StandInKey, version: KeyVersion) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": f"{self.url}/keys/{key.name}/{version.version}",
            "kty": version.kty,
            "key_ops": list(version.key_ops),
        }
        material = version.material
        if isinstance(material, rsa.RSAPrivateKey):
            numbers = material.public_key().public_numbers()
            jwk["n"] = _b64encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            jwk["e"] = _b64encode(numbers.e.to_bytes(3, "big"))
        elif isinstance(material, ec.EllipticCurvePrivateKey):
            point = material.public_key().public_numbers()
            jwk.update(crv="P-256", x=_b64encode(point.x.to_bytes(32, "big")))
            jwk["y"] = _b64encode(point.y.to_bytes(32, "big"))
        attributes: dict[str, Any] = {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.created,
            "exportable": False,
        }
        if version.not_before is not None:
            attributes["nbf"] = int(version.not_before.timestamp())
        if version.expires is not None:
            attributes["exp"] = int(version.expires.timestamp())
        if key.recovery_level is not None:
            attributes["recoveryLevel"] = key.recovery_level
            attributes["recoverableDays"] = 90 if "Customized" not in key.recovery_level else 7
        return {"key": jwk, "attributes": attributes, "tags": {}}


class _Unsupported(Exception):
    pass


def _crypt(operation: str, version: KeyVersion, alg: str) -> Any:
    material = version.material
    if isinstance(material, rsa.RSAPrivateKey):
        if alg != "RSA-OAEP-256":
            raise _Unsupported(f"Algorithm {alg} is not supported by this stand-in for RSA keys.")
        if operation == "wrapkey":
            return functools.partial(material.public_key().encrypt, padding=_OAEP_256)
        return functools.partial(material.decrypt, padding=_OAEP_256)
    if isinstance(material, bytes):
        if alg != _AES_KW[len(material)]:
            raise _Unsupported(f"Algorithm {alg} does not fit this {len(material) * 8}-bit key.")
        if operation == "wrapkey":
            return functools.partial(aes_key_wrap, material)
        return functools.partial(aes_key_unwrap, material)
    raise _Unsupported(f"Operation {operation} is not supported for {version.kty} keys.")


def _error(status: int, code: str, message: str, *, inner: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        error["innererror"] = {"code": inner}
    return web.Response(
        status=status,
        text=json.dumps({"error": error}),
        content_type="application/json",
        charset="utf-8",
    )


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _tls(directory: Path, ca_file: Path) -> ssl.SSLContext:
    """A throwaway CA (written to `ca_file` for the client) and a server certificate for
    127.0.0.1 signed by it; returns the server's TLS context."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "keybroker Key Vault stand-in CA")]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file = directory / "standin-server.pem"
    key_file = directory / "standin-server.key"
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
