"""Unary benchmark: warm-cache DecryptDataKey and GenerateDataKey against a bare gRPC baseline.

Both servers run as separate processes on loopback; the client runs here. For each case it reports
calls/s, p50 and p99 latency at 1 and 64 concurrent callers, and the server's CPU time per call
(from /proc). Then it measures the broker's own cost per call without gRPC
(tests.benchmarks.handler: the same handlers called in-process, audit group commit included) and
sets it beside gRPC's own server CPU per call. Figures are noisy on a shared machine: compare the
ratios, which are measured side by side in one run.

Run: scripts/bench [--seconds S] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from tests.benchmarks import handler
from tests.benchmarks.common import channel, server_tls_argv

NAME = "resources/bench/models/m1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Figures:
    case: str
    concurrency: int
    calls: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float


async def wait_ready(address: str) -> None:
    deadline = time.monotonic() + 30
    async with channel(address) as ch:
        while True:
            try:
                await asyncio.wait_for(ch.channel_ready(), 1)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


async def measure(
    case: str, pid: int, call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float
) -> Figures:
    """Runs `concurrency` callers in a closed loop for `seconds` (after a short warm-up)."""
    for _ in range(50):
        await call()
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()

    async def caller() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    latencies.sort()
    n = len(latencies)
    return Figures(
        case,
        concurrency,
        n,
        n / elapsed,
        latencies[n // 2] * 1e3,
        latencies[min(n - 1, int(n * 0.99))] * 1e3,
        cpu / n * 1e6,
    )


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def start_up(data_dir: str, port: int) -> subprocess.Popen[bytes]:
    """`keybroker up` on the embedded default, every production check on, quiet logs."""
    argv = [sys.executable, "-m", "broker.cli", "up", "--data-dir", data_dir]
    env = dict(os.environ, KEYBROKER_LOG_LEVEL="WARNING")
    return start([*argv, "--listen", f"127.0.0.1:{port}", *server_tls_argv()], env)


async def run(seconds: float, concurrencies: list[int], handler_calls: int) -> dict[str, Any]:
    echo_port, broker_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_up(f"{tmp}/data", broker_port)
        echo = start([sys.executable, "-m", "tests.benchmarks.echo_server", str(echo_port)])
        try:
            await wait_ready(f"127.0.0.1:{broker_port}")
            await wait_ready(f"127.0.0.1:{echo_port}")
            async with (
                channel(f"127.0.0.1:{broker_port}") as bch,
                channel(f"127.0.0.1:{echo_port}") as ech,
            ):
                bstub: Any = pb_grpc.KeyBrokerStub(bch)
                estub: Any = pb_grpc.KeyBrokerStub(ech)
                await bstub.CreateResource(pb.CreateResourceRequest(resource_id="bench"))
                key = await bstub.GenerateDataKey(pb.GenerateDataKeyRequest(name=NAME))
                decrypt_req = pb.DecryptDataKeyRequest(
                    name=NAME, wrapped_data_key=key.wrapped_data_key
                )
                generate_req = pb.GenerateDataKeyRequest(name=NAME)
                cases: list[tuple[str, int, Callable[[], Awaitable[Any]]]] = [
                    ("echo (gRPC baseline)", echo.pid, lambda: estub.DecryptDataKey(decrypt_req)),
                    (
                        "echo+wait (1 ms group)",
                        echo.pid,
                        lambda: estub.GenerateDataKey(generate_req),
                    ),
                    (
                        "DecryptDataKey (warm)",
                        broker.pid,
                        lambda: bstub.DecryptDataKey(decrypt_req),
                    ),
                    (
                        "GenerateDataKey (warm)",
                        broker.pid,
                        lambda: bstub.GenerateDataKey(generate_req),
                    ),
                ]
                results: list[Figures] = []
                for concurrency in concurrencies:
                    for case, pid, call in cases:
                        results.append(await measure(case, pid, call, concurrency, seconds))
        finally:
            for proc in (broker, echo):
                proc.terminate()
                proc.wait(timeout=30)
    handler_figures = await handler.run(handler_calls)
    return {
        "benchmark": "unary",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_per_case": seconds,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
        },
        "results": [asdict(r) for r in results],
        "handler": [asdict(h) for h in handler_figures],
        "ratios": ratios(results) | handler_ratios(results, handler_figures),
    }


def ratios(results: list[Figures]) -> dict[str, float]:
    out: dict[str, float] = {}
    by = {(r.case.split(" ")[0], r.concurrency): r for r in results}
    for (case, conc), r in by.items():
        base = by.get(("echo", conc))
        if base is None or case == "echo":
            continue
        out[f"{case}@{conc} calls/s vs echo"] = r.calls_per_s / base.calls_per_s
        out[f"{case}@{conc} p99 vs echo"] = r.p99_ms / base.p99_ms
        out[f"{case}@{conc} extra server CPU us/call"] = (
            r.server_cpu_us_per_call - base.server_cpu_us_per_call
        )
        waiting = by.get(("echo+wait", conc))
        if waiting is not None and case == "DecryptDataKey":
            # What is left once gRPC's price for one suspension per call is set aside.
            out[f"{case}@{conc} calls/s vs echo+wait"] = r.calls_per_s / waiting.calls_per_s
    return out


def handler_ratios(
    results: list[Figures], handler_figures: list[handler.HandlerFigures]
) -> dict[str, float]:
    """The broker's own CPU per call (in-process) over gRPC's server CPU per call (echo)."""
    out: dict[str, float] = {}
    echo = {r.concurrency: r for r in results if r.case.startswith("echo")}
    for h in handler_figures:
        if h.concurrency in echo:
            key = f"{h.case}@{h.concurrency} broker CPU/call vs gRPC server CPU/call"
            out[key] = h.cpu_us_per_call / echo[h.concurrency].server_cpu_us_per_call
    return out


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'case':<26}{'conc':>5}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'srv CPU us/call':>17}"
    )
    for r in report["results"]:
        print(
            f"{r['case']:<26}{r['concurrency']:>5}{r['calls_per_s']:>10.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['server_cpu_us_per_call']:>17.0f}"
        )
    print("\nbroker handlers in-process, no gRPC (audit group commit included):")
    print(f"{'case':<26}{'conc':>5}{'calls':>10}{'CPU us/call':>13}{'wall us/call':>14}")
    for h in report["handler"]:
        print(
            f"{h['case']:<26}{h['concurrency']:>5}{h['calls']:>10}{h['cpu_us_per_call']:>13.1f}"
            f"{h['wall_us_per_call']:>14.1f}"
        )
    print()
    for name, value in report["ratios"].items():
        print(f"{name:<66}{value:>8.2f}")


TARGET_CALLS_RATIO = 0.85
TARGET_P99_RATIO = 1.2


def judge(report: dict[str, Any]) -> None:
    """Adds issue 5's target (a) and whether it was met."""
    ratios = report["ratios"]
    calls = ratios.get("DecryptDataKey@64 calls/s vs echo", 0.0)
    p99 = ratios.get("DecryptDataKey@64 p99 vs echo", float("inf"))
    report["target"] = (
        f"DecryptDataKey at 64 callers >= {TARGET_CALLS_RATIO}x echo calls/s,"
        f" p99 <= {TARGET_P99_RATIO}x echo p99"
    )
    report["met"] = calls >= TARGET_CALLS_RATIO and p99 <= TARGET_P99_RATIO
    report["headline"] = f"DecryptDataKey@64 {calls:.2f}x echo calls/s, p99 {p99:.2f}x"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    parser.add_argument("--smoke", action="store_true", help="a few tenths of a second per case")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    seconds = 0.3 if args.smoke else args.seconds
    report = asyncio.run(run(seconds, [1, 64], 500 if args.smoke else 4000))
    judge(report)
    print_table(report)
    print(f"target {report['target']}: {'met' if report['met'] else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
