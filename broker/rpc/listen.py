"""Binding a server to its listen address: all of it, and never shared by accident.

gRPC turns SO_REUSEPORT on by default, so a second server on a port another one serves would
start and silently share it: the kernel would hand half the connections to the other process,
with its own master key and database. Every keybroker server turns it off
(`grpc.so_reuseport`, broker.rpc.grpc_server) unless the settings ask for sharing explicitly
(`reuse_port`). gRPC also accepts a bind that takes only some of the addresses a host name
resolves to (for `localhost`, ::1 alone when 127.0.0.1 is taken), so before it binds, every one of
them is tried here: one in use is refused with a one-line error that names it.
"""

from __future__ import annotations

import errno
import socket
from typing import cast

import grpc

from broker.core.errors import ConfigurationError


def add_port(
    server: grpc.aio.Server,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    *,
    reuse_port: bool = False,
) -> int:
    """Adds the listening port (mutual TLS with `credentials`, else plain TCP); returns it.
    ConfigurationError when the address, or any address its host resolves to, is in use (unless
    `reuse_port`) or cannot be bound here."""
    if not reuse_port:
        refuse_taken(listen)
    try:
        if credentials is not None:
            return server.add_secure_port(listen, credentials)
        return server.add_insecure_port(listen)
    except RuntimeError:
        # gRPC says only "Failed to bind"; the check above has ruled out the common cause.
        raise ConfigurationError(
            f"cannot listen on {listen}: the address cannot be bound here (taken since, or not "
            "an address of this machine)"
        ) from None


def refuse_taken(listen: str) -> None:
    """ConfigurationError if a listening socket already holds `listen` (HOST:PORT), on any
    address HOST resolves to. Port 0 (any free port) is never taken."""
    host, _, port_text = listen.rpartition(":")
    if not port_text.isdigit() or int(port_text) == 0:
        return  # a malformed address is gRPC's to refuse; port 0 is always free
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None,
            int(port_text),
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {listen}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR (a port in TIME_WAIT is free, one in LISTEN is not).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    ip, port = cast(tuple[str, int], address[:2])  # AF_INET and AF_INET6 only
                    raise ConfigurationError(
                        f"cannot listen on {listen}: {ip} port {port} is already "
                        "in use (another keybroker? give each process its own --listen address)"
                    ) from None
                # Any other failure (no IPv6 here, say) is gRPC's to judge, as it would anyway.
