"""The `keybroker` command.

Servers: `up` (everything on the embedded default, migrating its SQLite itself), `broker` (the
key plane alone), `migrate`. Admin commands (`resources`, `keys`, `status`) are gRPC clients of a
running broker, and so is `audit list`; `master-key rotate` works offline on the data directory
and database, and `audit verify` reads them offline (broker.audit.verify).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.audit import verify
from broker.audit.log import AuditLog
from broker.cli import dev_certs
from broker.cli.up import serve_up
from broker.core import data_dir_lock
from broker.core import settings as settings_module
from broker.core.audit_event import AuditEvent
from broker.core.clock import utc_now
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine, session_factory
from broker.lifecycle.master_key_rotation import rotate_master_key
from broker.providers.dev_vault import FILE_NAME as DEV_VAULT_FILE
from broker.providers.dev_vault import DevVaultStore
from broker.rpc import tls
from broker.service.server import serve
from workers.server import serve_workers

log = logging.getLogger("keybroker")

_SETTING_FLAGS = (
    "data_dir",
    "listen",
    "workers_listen",
    "reuse_port",
    "database_url",
    "log_level",
    "broker_address",
    "policy_file",
)


def _add_setting_flags(p: argparse.ArgumentParser, *, workers: bool = False) -> None:
    p.add_argument("--data-dir", dest="data_dir", help="data directory (default ./.keybroker)")
    if workers:
        # The workers' own default, so that they never land on the broker's port by accident.
        p.add_argument(
            "--listen",
            dest="workers_listen",
            help="HOST:PORT to serve Storage on (default 127.0.0.1:50052; "
            "KEYBROKER_WORKERS_LISTEN)",
        )
    else:
        p.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:50051)")
    p.add_argument(
        "--database-url",
        dest="database_url",
        help="sqlite+aiosqlite:///PATH or postgresql+asyncpg://... "
        "(default: SQLite in the data directory)",
    )
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ... (default INFO)")


def _add_tls_flags(p: argparse.ArgumentParser, *, client: bool = False) -> None:
    p.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS with the files of `keybroker certs init` in --certs-dir "
        "(or set KEYBROKER_TLS_CA, _CERT, _KEY, _CLIENT_CERT, _CLIENT_KEY)",
    )
    p.add_argument("--certs-dir", dest="certs_dir", help="default DATA_DIR/certs")
    if client:
        p.add_argument(
            "--tls-identity",
            dest="tls_identity",
            default="admin",
            help="with --tls: present CERTS_DIR/NAME.pem (default admin)",
        )
    else:
        p.add_argument("--policy-file", dest="policy_file", help="authorization policy (TOML/JSON)")


def _certs_dir(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.certs_dir) if getattr(args, "certs_dir", None) else settings.data_dir / "certs"


def _settings(args: argparse.Namespace) -> Settings:
    settings = settings_module.load({k: getattr(args, k, None) for k in _SETTING_FLAGS}, os.environ)
    if not getattr(args, "tls", False):
        return settings
    # --tls: the `certs init` layout; the workers present workers.pem, and policy.toml applies
    # unless a policy file was named.
    d = _certs_dir(args, settings)
    client = getattr(args, "tls_identity", None)
    return replace(
        settings,
        tls_ca=str(d / "ca.pem"),
        tls_cert=str(d / "server.pem"),
        tls_key=str(d / "server.key"),
        tls_client_cert=str(d / f"{client or 'workers'}.pem"),
        tls_client_key=str(d / f"{client or 'workers'}.key"),
        policy_file=settings.policy_file or str(d / "policy.toml"),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("up", "run everything on the embedded default (SQLite, key file) in one process"),
        ("broker", "run the KeyBroker server (the database must be migrated)"),
        ("workers", "run the Storage server, retention and jobs (needs --broker-address)"),
        ("migrate", "upgrade the database schema to this version"),
    ):
        p = sub.add_parser(name, help=help_text)
        _add_setting_flags(p, workers=name == "workers")
        if name == "workers":
            p.add_argument("--broker-address", dest="broker_address", help="the broker's HOST:PORT")
        if name != "migrate":
            _add_tls_flags(p)
            p.add_argument(
                "--reuse-port",
                dest="reuse_port",
                action="store_const",
                const="true",
                help="share the port with other processes (SO_REUSEPORT) on purpose; without "
                "it an address in use is refused",
            )

    certs = sub.add_parser("certs", help="development certificates for mutual TLS (offline)")
    certs_sub = certs.add_subparsers(dest="action", required=True)
    p = certs_sub.add_parser(
        "init", help="write a development CA, server and client certificates and a policy"
    )
    p.add_argument("--dir", dest="certs_dir", help="where to write them (default DATA_DIR/certs)")
    p.add_argument("--data-dir", dest="data_dir", help="data directory (default ./.keybroker)")

    mk = sub.add_parser("master-key", help="master key administration (offline)")
    mk_sub = mk.add_subparsers(dest="action", required=True)
    _add_setting_flags(
        mk_sub.add_parser("rotate", help="re-seal every root key under a new master key")
    )

    audit = sub.add_parser("audit", help="the audit trail: verify its chains, list a resource's")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    _add_setting_flags(
        audit_sub.add_parser(
            "verify", help="check every audit chain and checkpoint (offline; exit 1 on a finding)"
        )
    )

    address_help = "broker address (default 127.0.0.1:50051 or $KEYBROKER_ADDRESS)"
    default_address = os.environ.get("KEYBROKER_ADDRESS", "127.0.0.1:50051")

    def leaf(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        p.add_argument("--address", default=default_address, help=address_help)
        _add_tls_flags(p, client=True)
        return p

    res = sub.add_parser("resources", help="manage resources (a gRPC client)")
    res_sub = res.add_subparsers(dest="action", required=True)
    p = leaf(res_sub, "create", "create a resource")
    p.add_argument("resource_id")
    p.add_argument(
        "--import-create-time", help="admin import: the original creation time (ISO 8601)"
    )
    leaf(res_sub, "get", "show a resource").add_argument("name", help="resources/{resource}")
    leaf(res_sub, "list", "list resources").add_argument("--page-size", type=int, default=0)
    p = leaf(res_sub, "delete", "schedule a resource's destruction")
    p.add_argument("name", help="resources/{resource}")
    p.add_argument("--pending-window", help="e.g. 7d, 0s (default: the broker's)")
    p = leaf(res_sub, "undelete", "cancel a scheduled destruction")
    p.add_argument("name", help="resources/{resource}")

    for action, help_text in (
        ("cmk-enable", "put a resource under a customer-managed key"),
        ("cmk-update", "point a resource at another key version or key"),
    ):
        p = leaf(res_sub, action, help_text)
        p.add_argument("name", help="resources/{resource}")
        p.add_argument("--provider", required=True, help="pkcs11, azure-keyvault or dev-vault")
        p.add_argument("--vault", required=True, help="token label, vault URL, or dev")
        p.add_argument("--key", required=True, help="the key's name")
        p.add_argument("--version", default="", help="the key version (omit with --follow-latest)")
        p.add_argument("--identity", default="", help="managed identity client id (Azure)")
        p.add_argument("--follow-latest", action="store_true", help="follow the latest version")
    p = leaf(res_sub, "cmk-disable", "return a resource to service-managed keys")
    p.add_argument("name", help="resources/{resource}")

    dev = sub.add_parser(
        "dev-vault", help="the file-backed dev vault (offline; not for production)"
    )
    dev_sub = dev.add_subparsers(dest="action", required=True)
    p = dev_sub.add_parser("create-key", help="create a key, or a new version of one")
    p.add_argument("key")
    p.add_argument("--type", choices=("rsa", "aes"), default="rsa")
    p.add_argument("--size", type=int, default=0, help="RSA 2048/3072/4096 (default 3072); AES 256")
    for action, help_text in (
        ("list", "show a key's versions"),
        ("disable", "disable a key (revocation)"),
        ("enable", "enable a key again"),
        ("delete", "delete a key"),
        ("restore", "restore a deleted key"),
    ):
        p = dev_sub.add_parser(action, help=help_text)
        p.add_argument("key")
        if action in ("disable", "enable"):
            p.add_argument("--version", default="", help="one version (default: every version)")
    for p in dev_sub.choices.values():
        p.add_argument("--data-dir", dest="data_dir", help="data directory (default ./.keybroker)")

    keys = sub.add_parser("keys", help="manage resource keys (a gRPC client)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    key_help = "resources/{r}/resourceKeys/{models|results}"
    leaf(keys_sub, "rotate", "start a new resource-key version").add_argument("name", help=key_help)
    leaf(keys_sub, "versions", "list versions").add_argument("parent", help=key_help)
    p = leaf(keys_sub, "destroy", "schedule a version's destruction")
    p.add_argument("name", help=key_help + "/versions/{n}")
    p.add_argument("--pending-window", help="e.g. 7d, 0s (default: the broker's)")
    p = leaf(keys_sub, "restore", "cancel a scheduled version destruction")
    p.add_argument("name", help=key_help + "/versions/{n}")

    p = leaf(sub, "status", "the broker's health and key ids (a gRPC client)")
    p.add_argument("name", nargs="?", default="", help="optional resources/{resource}")
    p = leaf(audit_sub, "list", "a resource's audit records, oldest first (a gRPC client)")
    p.add_argument("parent", help="resources/{resource}")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--start-time", help="only records at or after this time (ISO 8601)")
    p.add_argument("--end-time", help="only records before this time (ISO 8601)")
    return parser


def _duration(text: str | None) -> dict[str, Duration]:
    if text is None:
        return {}
    d = Duration()
    d.FromTimedelta(settings_module.parse_duration(text))
    return {"pending_window": d}


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _client_request(args: argparse.Namespace) -> tuple[str, Message]:
    """The RPC name and request for an admin command."""
    match args.command, getattr(args, "action", None):
        case "resources", "create" if args.import_create_time:
            created = datetime.fromisoformat(args.import_create_time)
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            request = pb.ImportResourceRequest(resource_id=args.resource_id)
            request.create_time.FromDatetime(created)
            return "ImportResource", request
        case "resources", "create":
            return "CreateResource", pb.CreateResourceRequest(resource_id=args.resource_id)
        case "resources", "get":
            return "GetResource", pb.GetResourceRequest(name=args.name)
        case "resources", "delete":
            window = _duration(args.pending_window)
            return "DeleteResource", pb.DeleteResourceRequest(name=args.name, **window)
        case "resources", "undelete":
            return "UndeleteResource", pb.UndeleteResourceRequest(name=args.name)
        case "keys", "rotate":
            return "RotateResourceKey", pb.RotateResourceKeyRequest(name=args.name)
        case "keys", "versions":
            request_v = pb.ListResourceKeyVersionsRequest(parent=args.parent, page_size=1000)
            return "ListResourceKeyVersions", request_v
        case "keys", "destroy":
            window = _duration(args.pending_window)
            request_d = pb.DestroyResourceKeyVersionRequest(name=args.name, **window)
            return "DestroyResourceKeyVersion", request_d
        case "keys", "restore":
            return "RestoreResourceKeyVersion", pb.RestoreResourceKeyVersionRequest(name=args.name)
        case "status", _:
            return "GetStatus", pb.GetStatusRequest(name=args.name)
        case "resources", "cmk-enable" | "cmk-update":
            key = pb.CustomerKeyReference(
                provider=args.provider,
                vault=args.vault,
                key_name=args.key,
                version=args.version,
                identity=args.identity,
            )
            if args.action == "cmk-enable":
                return "EnableCustomerManagedKey", pb.EnableCustomerManagedKeyRequest(
                    name=args.name, key=key, follow_latest=args.follow_latest
                )
            return "UpdateCustomerManagedKey", pb.UpdateCustomerManagedKeyRequest(
                name=args.name, key=key, follow_latest=args.follow_latest
            )
        case "resources", "cmk-disable":
            return "DisableCustomerManagedKey", pb.DisableCustomerManagedKeyRequest(name=args.name)
    raise AssertionError(args)


def _dev_vault(args: argparse.Namespace, settings: Settings) -> int:
    """`keybroker dev-vault ...`: edits the vault file in the data directory."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = DevVaultStore(settings.data_dir / DEV_VAULT_FILE)
    try:
        match args.action:
            case "create-key":
                size = args.size or (3072 if args.type == "rsa" else 256)
                version = store.create_key(args.key, args.type, size)
                print(f"{args.key} version {version.version} ({version.kty}-{version.size})")
                print(
                    f"  use: --provider dev-vault --vault dev --key {args.key} "
                    f"--version {version.version}"
                )
            case "list":
                for v in store.versions(args.key):
                    state = "enabled" if v.enabled else "disabled"
                    print(f"{args.key}\t{v.version}\t{v.kty}-{v.size}\t{state}")
            case "disable" | "enable":
                store.set_enabled(args.key, args.version, args.action == "enable")
            case "delete" | "restore":
                store.set_deleted(args.key, args.action == "delete")
    except KeyError:
        raise ConfigurationError(f"the dev vault has no key {args.key!r}") from None
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return 0


async def _run_client(args: argparse.Namespace) -> int:
    # TLS with --tls (the client certificate named by --identity) or the KEYBROKER_TLS_* settings.
    async with tls.broker_channel(_settings(args), args.address) as channel:
        stub = pb_grpc.KeyBrokerStub(channel)
        if (args.command, getattr(args, "action", None)) == ("resources", "list"):
            return await _list_all(stub, args.page_size)
        if (args.command, getattr(args, "action", None)) == ("audit", "list"):
            return await _list_audit(stub, args)
        method, request = _client_request(args)
        _print(await getattr(stub, method)(request))
        return 0


async def _list_all(stub: pb_grpc.KeyBrokerAsyncStub, page_size: int) -> int:
    token = ""
    while True:
        page = await stub.ListResources(
            pb.ListResourcesRequest(page_size=page_size, page_token=token)
        )
        for r in page.resources:
            print(f"{r.name}\t{pb.Resource.State.Name(r.state)}\t{r.create_time.ToJsonString()}")
        token = page.next_page_token
        if not token:
            return 0


async def _list_audit(stub: pb_grpc.KeyBrokerAsyncStub, args: argparse.Namespace) -> int:
    request = pb.ListAuditRecordsRequest(parent=args.parent, page_size=args.page_size)
    for field, text in (("start_time", args.start_time), ("end_time", args.end_time)):
        if text:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                flag = "--" + field.replace("_", "-")
                raise ConfigurationError(f"{flag} is not ISO 8601: {text!r}") from None
            getattr(request, field).FromDatetime(when if when.tzinfo else when.replace(tzinfo=UTC))
    while True:
        page = await stub.ListAuditRecords(request)
        for r in page.audit_records:
            print(
                f"{r.time.ToJsonString()}\t{r.operation}\t{r.resource}\t{r.outcome}"
                f"\t{r.caller}\t{' '.join(r.key_ids)}"
            )
        if not page.next_page_token:
            return 0
        request.page_token = page.next_page_token


async def _serve_until_signal(settings: Settings, command: str) -> int:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    stop.set()
                    return

        tg.start_soon(watch_signals)
        match command:
            case "up":
                # The embedded default migrates its own SQLite database.
                await serve_up(settings, stop, migrate=settings.database.startswith("sqlite"))
            case "workers":
                await serve_workers(settings, stop, now=utc_now)
            case _:
                await serve(settings, stop)
        tg.cancel_scope.cancel()
    return 0


async def _migrate(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = create_engine(settings.database)
    try:
        before = await schema.current_revision(engine)
        await schema.upgrade(engine)
        print(f"database schema: {before or 'empty'} -> {schema.head_revision()}")
    finally:
        await engine.dispose()
    return 0


async def _rotate_master(settings: Settings) -> int:
    if not settings.data_dir.is_dir():
        raise ConfigurationError(f"data directory {settings.data_dir} does not exist")
    with data_dir_lock.locked(settings.data_dir, exclusive=True):
        return await _rotate_master_locked(settings)


async def _rotate_master_locked(settings: Settings) -> int:
    engine = create_engine(settings.database)
    try:
        await schema.require_current(engine)
        sessions = session_factory(engine)
        audit = AuditLog(engine)
        user = os.environ.get("USER", "unknown")
        old, new, count = await rotate_master_key(
            settings,
            sessions,
            audit,
            lambda: AuditEvent("RotateMasterKey", f"local:{user}", os.urandom(8).hex()),
        )
        print(f"master key rotated: {old} -> {new}; {count} root keys re-sealed")
    finally:
        await engine.dispose()
    return 0


def _disable_core_dumps() -> None:
    # A core dump of a broker would hold plaintext keys.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("resources", "keys", "status") or (
            args.command == "audit" and args.action == "list"
        ):
            return anyio.run(_run_client, args, backend="asyncio")
        settings = _settings(args)
        if args.command == "dev-vault":
            return _dev_vault(args, settings)
        if args.command == "certs":
            for path in dev_certs.init_dev_certs(_certs_dir(args, settings)):
                print(path)  # names only: key material is never printed
            return 0
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        _disable_core_dumps()
        os.umask(0o077)  # the database and key files are for this user alone
        runners: dict[str, Callable[[], Awaitable[int]]] = {
            # The embedded default offers the dev vault for trying customer-managed keys.
            "up": lambda: _serve_until_signal(replace(settings, dev_vault=True), "up"),
            "workers": lambda: _serve_until_signal(
                replace(settings, listen=settings.workers_listen), "workers"
            ),
            "broker": lambda: _serve_until_signal(settings, "broker"),
            "migrate": lambda: _migrate(settings),
            "master-key": lambda: _rotate_master(settings),
            "audit": lambda: verify.run(settings, sys.stdout),
        }
        return anyio.run(runners[args.command], backend="asyncio")
    except ConfigurationError as exc:
        print(f"keybroker: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # A start-up refusal raised inside a task group arrives wrapped; report it plainly.
        refusal = _first_configuration_error(group)
        if refusal is None:
            raise
        print(f"keybroker: {refusal}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        detail = _error_reason(exc)
        print(f"keybroker: {exc.code().name}: {exc.details()}{detail}", file=sys.stderr)
        return 1


def _first_configuration_error(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    for exc in group.exceptions:
        if isinstance(exc, ConfigurationError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_configuration_error(exc)
            if found is not None:
                return found
    return None


def _error_reason(exc: grpc.aio.AioRpcError) -> str:
    status: Any = rpc_status.from_call(cast(grpc.Call, exc))  # AioRpcError has the same methods
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return f" (reason {info.reason})"
    return ""
