"""Settings: read once, from command-line flags and KEYBROKER_* environment variables, into one
frozen object that is passed down. Flags win over the environment, which wins over defaults.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from broker.core.errors import ConfigurationError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> timedelta:
    """'90d', '5m', '30s', '250ms' or plain seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ConfigurationError(f"not a duration: {text!r} (examples: 90d, 5m, 30s, 250ms)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Settings:
    """Everything a broker process needs to know; built by `load`."""

    data_dir: Path = Path(".keybroker")
    listen: str = "127.0.0.1:50051"
    # Where `keybroker workers` serves Storage (its --listen); the broker's port is not its default.
    workers_listen: str = "127.0.0.1:50052"
    # Share the listen port with other processes (SO_REUSEPORT), on purpose. Off: an address in
    # use is refused (broker.rpc.listen).
    reuse_port: bool = False
    # Empty: SQLite in the data directory.
    database_url: str = ""
    # What a serving process waits for the database (a connection, a statement, a lock) before
    # the call fails UNAVAILABLE, reason DATABASE_UNAVAILABLE (broker.db.engine).
    database_timeout: timedelta = timedelta(seconds=2)
    cache_ttl: timedelta = timedelta(minutes=5)
    cache_max_entries: int = 100_000
    rotation_period: timedelta = timedelta(days=90)
    pending_window: timedelta = timedelta(days=7)
    # Production keeps a floor under the pending window; tests set it to 0.
    min_pending_window: timedelta = timedelta(days=1)
    max_pending_window: timedelta = timedelta(days=120)
    janitor_interval: timedelta = timedelta(minutes=1)
    shutdown_grace: timedelta = timedelta(seconds=10)
    audit_max_pending: int = 10_000
    # Longest a call runs when its caller set no earlier deadline (broker.core.limits): unary calls,
    # and streams (uploads, downloads).
    max_unary_duration: timedelta = timedelta(seconds=30)
    max_stream_duration: timedelta = timedelta(hours=1)
    # Longest a group commit of the audit trail waits under load for its group to fill
    # (broker.audit); 0 commits at once.
    audit_commit_delay: timedelta = timedelta(milliseconds=2)
    log_level: str = "INFO"
    # Customer-managed keys.
    # Resources created before this day cannot enable CMK (the seed's 2020-05-11).
    cmk_cutoff: date = date(2020, 5, 11)
    # How often keys that follow their latest version are checked.
    cmk_poll_interval: timedelta = timedelta(hours=1)
    # How often each customer key in use is probed (wrap + unwrap) in the background.
    cmk_probe_interval: timedelta = timedelta(seconds=30)
    # How long a failed root-key call is remembered (so a revoked key is not hammered).
    cmk_failure_ttl: timedelta = timedelta(seconds=10)
    # Offer the file-backed dev vault ("dev-vault" provider; `keybroker up` turns it on).
    dev_vault: bool = False
    # PKCS#11 provider: the module (e.g. /usr/lib/softhsm/libsofthsm2.so) and the user PIN.
    pkcs11_module: str = ""
    pkcs11_pin: str = ""
    # RSA-OAEP with SHA-1 (for tokens without OAEP-SHA256, such as SoftHSM 2.6); off by default.
    pkcs11_allow_oaep_sha1: bool = False
    # The service master key in a PKCS#11 token instead of the key file (empty: the key file): a
    # key label in the token labelled master_key_pkcs11_token, opened with pkcs11_module and
    # pkcs11_pin. Versions are CKA_IDs under the label (broker.keys.master_key_pkcs11).
    master_key_pkcs11_label: str = ""
    master_key_pkcs11_token: str = ""
    # Azure Key Vault: a CA bundle to trust instead of the system's (a private endpoint's CA).
    azure_ca_bundle: str = ""
    # Workers.
    # Where `keybroker workers` finds the broker (`keybroker up` uses its own listen address).
    broker_address: str = ""
    # Analyze results live this long after their operation completes (or last changed).
    result_retention: timedelta = timedelta(hours=24)
    # How often the retention sweeper runs.
    sweep_interval: timedelta = timedelta(minutes=1)
    # Ciphertext segment size of stored objects (Tink's AES-GCM-HKDF streaming format).
    segment_size: int = 1 << 20
    # A claimed job's lease; renewed while the job runs.
    job_lease: timedelta = timedelta(seconds=30)
    # How often an idle job runner looks for work.
    job_poll_interval: timedelta = timedelta(seconds=1)
    # Deadline of each call to the broker.
    broker_deadline: timedelta = timedelta(seconds=10)
    # Mutual TLS (broker.rpc.tls): the CA bundle that client certificates must chain to, and this
    # server's certificate and key (PEM paths). All three or none; set, servers require client
    # certificates and the caller's identity is its certificate's SAN URI (broker.core.identity).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The certificate a process presents when it calls the broker (the workers; empty: tls_cert
    # and tls_key, which then need the clientAuth usage). Also read by the CLI's client commands.
    tls_client_cert: str = ""
    tls_client_key: str = ""
    # Authorization policy (broker.rpc.policy; TOML or JSON). Empty: no per-caller checks, which is
    # allowed only on plain loopback or with authz_allow_all (check_listen fails closed).
    policy_file: str = ""
    # With TLS and no policy: let every authenticated caller call everything (explicit opt-in).
    authz_allow_all: bool = False

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / "master.key"

    @property
    def database(self) -> str:
        return (
            self.database_url or f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'keybroker.db'}"
        )

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ConfigurationError(f"--listen must be HOST:PORT, got {self.listen!r}")
        return host.strip("[]"), int(port)

    @property
    def tls(self) -> bool:
        """Whether servers use mutual TLS."""
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    @property
    def client_cert_and_key(self) -> tuple[str, str]:
        """The certificate and key this process presents to the broker."""
        if self.tls_client_cert or self.tls_client_key:
            return self.tls_client_cert, self.tls_client_key
        return self.tls_cert, self.tls_key

    def check_listen(self) -> None:
        """Refuses what a server must not start with: a partial TLS configuration; a policy
        without TLS (it could name no certificate identity); TLS without a policy unless
        authz_allow_all says so (fail closed); and a non-loopback address without mutual TLS
        (only this machine may connect in the clear)."""
        if self.tls and not (self.tls_ca and self.tls_cert and self.tls_key):
            raise ConfigurationError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")
        if self.policy_file and not self.tls:
            raise ConfigurationError(
                "a policy file needs mutual TLS: identities come from client certificates"
            )
        if self.tls and not self.policy_file and not self.authz_allow_all:
            raise ConfigurationError(
                "mutual TLS without a policy file would let every certificate call everything: "
                "set --policy-file, or KEYBROKER_AUTHZ_ALLOW_ALL=true to allow that explicitly"
            )
        if self.tls:
            return
        host, _ = self.host_port
        if host == "localhost":
            return
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigurationError(
                f"refusing to listen on {host}: only loopback addresses are allowed until mutual "
                "TLS is configured"
            )


def _convert(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigurationError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, date):
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be a date (YYYY-MM-DD), got {raw!r}") from None
    if isinstance(default, timedelta):
        return parse_duration(raw)
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    return raw


def load(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Settings:
    """Settings from flags (field name -> text, None when not given) over KEYBROKER_* variables."""
    base = Settings()
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = flags.get(f.name)
        if raw is None:
            raw = environ.get(f"KEYBROKER_{f.name.upper()}")
        if raw is not None:
            values[f.name] = _convert(f.name, raw, getattr(base, f.name))
    return replace(base, **values)
