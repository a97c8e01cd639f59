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
