"""SO_REUSEPORT benchmark (issue 5, case f): k `keybroker broker` processes sharing one port vs one,
DecryptDataKey calls/s at 64 concurrent callers on a warm cache.

All brokers share one data directory (its lock is shared between servers) and one SQLite
database, migrated first by `keybroker migrate`; audit and every production check are on. The
first broker creates the master key, the resource and the data key; the others then bind the same
port, each asking for it with `--reuse-port` (without it a taken address is refused). That they
really share it is checked in /proc/net/tcp: one listening socket per process on the port.

The load comes from separate client processes (this module with --client), each with several
channels on their own TCP connections, since the kernel spreads connections, not calls, over
the listeners. The clients start together on a "go" line, so their windows overlap.

Run: python -m tests.benchmarks.reuseport [--smoke] [--seconds S] [--processes K] [--json PATH]
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from tests.benchmarks.common import closed_loop, environment, now_utc, parser, write_report
from tests.benchmarks.unary import cpu_seconds, free_port, wait_ready

NAME = "resources/bench/models/m1"
CALLERS = 64
CLIENT_PROCESSES = 4
CHANNELS_PER_CLIENT = 4


@dataclass
class Figures:
    processes: int
    listeners_on_port: int
    calls: int
    calls_per_s: float
    server_cpu_s: float
    client_cpu_s: float
    server_cpu_us_per_call: float
    cpu_share_per_process: list[float]


def listeners(port: int) -> int:
    """Sockets in LISTEN state on 127.0.0.1:port, from /proc/net/tcp and tcp6 (grpc listens on
    an IPv6 socket with the v4-mapped address ::ffff:127.0.0.1)."""
    wanted = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] in wanted and fields[3] == "0A":  # 0A: TCP_LISTEN
                count += 1
    return count


def _keybroker(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", *args]


def _start_broker(data_dir: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KEYBROKER_LOG_LEVEL="WARNING")
    return subprocess.Popen(
        _keybroker(
            "broker", "--data-dir", data_dir, "--listen", f"127.0.0.1:{port}", "--reuse-port"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


async def _client(address: str, seconds: float, callers: int, channels: int, hex_req: str) -> None:
    """One load process: warm up, say ready, wait for "go", run, print calls and elapsed."""
    request = pb.DecryptDataKeyRequest.FromString(bytes.fromhex(hex_req))
    # A local subchannel pool per channel: each channel gets a TCP connection of its own.
    opened = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs: list[Any] = [pb_grpc.KeyBrokerStub(ch) for ch in opened]
    turn = 0

    async def call() -> None:
        nonlocal turn
        turn += 1
        await stubs[turn % len(stubs)].DecryptDataKey(request)

    await closed_loop(call, callers, 0.3)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = time.process_time()
    calls, elapsed = await closed_loop(call, callers, seconds)
    cpu = time.process_time() - cpu0
    print(json.dumps({"calls": calls, "elapsed": elapsed, "cpu": cpu}), flush=True)
    for ch in opened:
        await ch.close()


def _load(
    address: str, seconds: float, request: bytes, servers: list[int]
) -> tuple[int, float, float, list[float]]:
    """Runs the client processes together; returns (calls, calls/s, their CPU seconds, each
    server's CPU seconds over the same window)."""
    per_client = CALLERS // CLIENT_PROCESSES
    args = [address, str(seconds), str(per_client), str(CHANNELS_PER_CLIENT), request.hex()]
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.reuseport", "--client", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(CLIENT_PROCESSES)
    ]
    try:
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == b"ready"
        cpu0 = [cpu_seconds(pid) for pid in servers]
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(b"go\n")
            c.stdin.flush()
        outcomes = []
        for c in clients:
            assert c.stdout is not None
            outcomes.append(json.loads(c.stdout.readline()))
        server_cpu = [cpu_seconds(pid) - c for pid, c in zip(servers, cpu0, strict=True)]
    finally:
        _stop(clients)
    calls = sum(o["calls"] for o in outcomes)
    return (
        calls,
        sum(o["calls"] / o["elapsed"] for o in outcomes),
        sum(o["cpu"] for o in outcomes),
        server_cpu,
    )


async def _prepare(address: str) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = pb_grpc.KeyBrokerStub(channel)
        await stub.CreateResource(pb.CreateResourceRequest(resource_id="bench"))
        key = await stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=NAME))
        request = pb.DecryptDataKeyRequest(name=NAME, wrapped_data_key=key.wrapped_data_key)
        return request.SerializeToString()


async def _case(k: int, seconds: float) -> Figures:
    """One fresh data directory and database, k brokers on one port, one measured window."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = f"{tmp}/data"
        migrate = _keybroker("migrate", "--data-dir", data_dir)
        await asyncio.to_thread(subprocess.run, migrate, check=True, capture_output=True)
        brokers = [_start_broker(data_dir, port)]
        try:
            await wait_ready(address)
            request = await _prepare(address)  # the master key exists before the others start
            for _ in range(k - 1):
                brokers.append(_start_broker(data_dir, port))
            deadline = time.monotonic() + 30
            while listeners(port) < k:
                dead = [b.returncode for b in brokers if b.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"only {listeners(port)} of {k} brokers listen ({dead})")
                await asyncio.sleep(0.1)
            bound = listeners(port)
            pids = [b.pid for b in brokers]
            calls, rate, client_cpu, per_server = await asyncio.to_thread(
                _load, address, seconds, request, pids
            )
        finally:
            _stop(brokers)
    server_cpu = sum(per_server)
    return Figures(
        k,
        bound,
        calls,
        rate,
        server_cpu,
        client_cpu,
        server_cpu / calls * 1e6,
        # Each process's share of the server CPU: a process that got no connection shows 0.
        [round(c / server_cpu, 3) for c in per_server],
    )


async def run(ks: list[int], seconds: float) -> dict[str, Any]:
    results = [await _case(k, seconds) for k in ks]
    base = results[0]
    best = max(results[1:], key=lambda r: r.calls_per_s, default=base)
    return {
        "benchmark": "reuseport",
        "date": now_utc(),
        "seconds_per_case": seconds,
        "environment": environment(),
        "callers": CALLERS,
        "client_processes": CLIENT_PROCESSES,
        "figures": [asdict(r) for r in results],
        "ratios": {
            f"{r.processes} processes calls/s vs 1 process": r.calls_per_s / base.calls_per_s
            for r in results[1:]
        },
        "target": "no numeric target in issue 5: report k processes vs one",
        # What can be checked: every process bound the shared port and took part of the load.
        "met": all(r.listeners_on_port == r.processes for r in results)
        and all(min(r.cpu_share_per_process) > 0 for r in results),
        "best_processes": best.processes,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['callers']} callers from {report['client_processes']} client processes, "
        f"{os.cpu_count()} CPUs shared by clients and servers"
    )
    print(
        f"{'procs':>5}{'listen':>7}{'calls/s':>9}{'srv CPU s':>10}{'cli CPU s':>10}"
        f"{'srv us/call':>12}  CPU share per process"
    )
    for r in report["figures"]:
        print(
            f"{r['processes']:>5}{r['listeners_on_port']:>7}{r['calls_per_s']:>9.0f}"
            f"{r['server_cpu_s']:>10.2f}{r['client_cpu_s']:>10.2f}"
            f"{r['server_cpu_us_per_call']:>12.0f}  {r['cpu_share_per_process']}"
        )
    print()
    for name, value in report["ratios"].items():
        print(f"{name:<56}{value:>8.2f}")
    print(f"every process bound the port and served: {'yes' if report['met'] else 'NO'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--client"]:
        address, seconds, callers, channels, hex_req = args_in[1:6]
        asyncio.run(_client(address, float(seconds), int(callers), int(channels), hex_req))
        return {}
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    p.add_argument("--processes", type=int, default=2, help="k (default 2: the CPU count here)")
    args = p.parse_args(args_in)
    ks = [1, 2] if args.smoke else sorted({1, 2, args.processes})
    report = asyncio.run(run(ks, 0.5 if args.smoke else args.seconds))
    print_table(report)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
