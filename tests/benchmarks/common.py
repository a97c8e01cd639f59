"""What the benchmark modules share: the environment block, closed-loop load, and the report.

Every report is a dict with at least `benchmark`, `date`, `environment`, `figures`, `ratios`,
`target` and `met`; `write_report` prints nothing and writes it as JSON where asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy


def environment() -> dict[str, Any]:
    """Versions and machine facts to keep beside every figure."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "grpcio": grpc.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark module takes: --smoke and --json PATH."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: proves the code path only")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p


def write_report(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {path}")


async def closed_loop(
    call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float
) -> tuple[int, float]:
    """Runs `concurrency` callers back to back for `seconds`; returns (calls, elapsed)."""
    calls = 0
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()

    async def caller() -> None:
        nonlocal calls
        while time.perf_counter() < stop_at:
            await call()
            calls += 1  # after the await: the increment itself never spans a suspension

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls, time.perf_counter() - started


# -- mutual TLS (issue 6: the targets must hold with mTLS and authorization on) -------------------

TLS_ENV = "KEYBROKER_BENCH_TLS_DIR"
"""When set, a directory made by `keybroker certs init`: the brokers start with `--tls` (mutual
TLS and its development policy), the baselines serve TLS with the same server certificate, and
clients present the `workers` certificate (admin and data-plane roles)."""
TLS_CLIENT = "workers"


def tls_dir() -> Path | None:
    value = os.environ.get(TLS_ENV)
    return Path(value) if value else None


def server_tls_argv() -> list[str]:
    """Flags that put `keybroker up` on mutual TLS with the benchmark's certificates."""
    d = tls_dir()
    return [] if d is None else ["--tls", "--certs-dir", str(d)]


def channel(address: str) -> grpc.aio.Channel:
    """A client channel to a benchmark server: mutual TLS when the run uses it."""
    d = tls_dir()
    if d is None:
        return grpc.aio.insecure_channel(address)
    from broker.rpc.tls import channel_credentials

    credentials = channel_credentials(
        d / "ca.pem", d / f"{TLS_CLIENT}.pem", d / f"{TLS_CLIENT}.key"
    )
    return grpc.aio.secure_channel(address, credentials)


def add_baseline_port(server: grpc.aio.Server, address: str) -> None:
    """The baselines' listening port: the broker's own transport (mutual TLS or plain TCP)."""
    d = tls_dir()
    if d is None:
        server.add_insecure_port(address)
        return
    from broker.rpc.tls import server_credentials

    server.add_secure_port(
        address, server_credentials(d / "ca.pem", d / "server.pem", d / "server.key")
    )
