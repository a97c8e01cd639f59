"""Batch benchmark (issue 5, case b): data keys/s through BatchDecryptDataKeys at batch sizes 1, 16
and 256 on a warm cache, beside DecryptDataKey (one key per call) measured in the same run.

The broker runs as `keybroker up` in its own process (embedded SQLite, audit on, every
production check on); the callers run here. Each batch holds distinct wrapped keys of distinct
objects, every item is checked OK once before timing. Server CPU per key comes from /proc.
Target: >= 50,000 data keys/s at batch 256.

Run: python -m tests.benchmarks.batch [--smoke] [--seconds S] [--json PATH]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from tests.benchmarks.common import (
    channel,
    closed_loop,
    environment,
    now_utc,
    parser,
    write_report,
)
from tests.benchmarks.unary import cpu_seconds, free_port, start_up, wait_ready

TARGET_KEYS_PER_S = 50_000
BATCH_SIZES = (1, 16, 256)
BATCH_CALLERS = 16
UNARY_CALLERS = 64


@dataclass
class BatchFigures:
    case: str
    batch_size: int
    concurrency: int
    calls: int
    keys_per_s: float
    server_cpu_us_per_key: float
    client_cpu_us_per_key: float


async def _keys(stub: Any, count: int) -> list[pb.DecryptDataKeyRequest]:
    """`count` distinct objects' wrapped keys, as decrypt requests."""
    names = [f"resources/bench/models/m{i}" for i in range(count)]
    reply = await stub.BatchGenerateDataKeys(
        pb.BatchGenerateDataKeysRequest(requests=[pb.GenerateDataKeyRequest(name=n) for n in names])
    )
    return [
        pb.DecryptDataKeyRequest(name=n, wrapped_data_key=r.response.wrapped_data_key)
        for n, r in zip(names, reply.results, strict=True)
    ]


async def _measure(
    case: str, pid: int, call: Any, batch: int, concurrency: int, seconds: float
) -> BatchFigures:
    await closed_loop(call, concurrency, min(0.5, seconds / 4))  # warm-up
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    calls, elapsed = await closed_loop(call, concurrency, seconds)
    cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
    keys = calls * batch
    return BatchFigures(
        case, batch, concurrency, calls, keys / elapsed, cpu / keys * 1e6, client / keys * 1e6
    )


async def run(seconds: float) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_up(f"{tmp}/data", port)
        try:
            await wait_ready(f"127.0.0.1:{port}")
            async with channel(f"127.0.0.1:{port}") as ch:
                stub: Any = pb_grpc.KeyBrokerStub(ch)
                await stub.CreateResource(pb.CreateResourceRequest(resource_id="bench"))
                items = await _keys(stub, max(BATCH_SIZES))
                results: list[BatchFigures] = []
                one = items[0]
                results.append(
                    await _measure(
                        "DecryptDataKey (unary)",
                        broker.pid,
                        lambda: stub.DecryptDataKey(one),
                        1,
                        UNARY_CALLERS,
                        seconds,
                    )
                )
                for size in BATCH_SIZES:
                    request = pb.BatchDecryptDataKeysRequest(requests=items[:size])
                    check = await stub.BatchDecryptDataKeys(request)
                    assert len(check.results) == size
                    assert all(r.status.code == 0 and r.response.key_id for r in check.results)
                    results.append(
                        await _measure(
                            "BatchDecryptDataKeys",
                            broker.pid,
                            lambda request=request: stub.BatchDecryptDataKeys(request),
                            size,
                            BATCH_CALLERS,
                            seconds,
                        )
                    )
        finally:
            broker.terminate()
            broker.wait(timeout=30)
    unary = results[0]
    at_256 = next(r for r in results if r.batch_size == 256)
    ratios = {
        f"batch {r.batch_size} keys/s vs DecryptDataKey keys/s": r.keys_per_s / unary.keys_per_s
        for r in results[1:]
    }
    ratios["batch 256 keys/s vs target"] = at_256.keys_per_s / TARGET_KEYS_PER_S
    return {
        "benchmark": "batch",
        "date": now_utc(),
        "seconds_per_case": seconds,
        "environment": environment(),
        "figures": [asdict(r) for r in results],
        "ratios": ratios,
        "target": f">= {TARGET_KEYS_PER_S} data keys/s at batch 256",
        "met": at_256.keys_per_s >= TARGET_KEYS_PER_S,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'case':<24}{'batch':>6}{'conc':>6}{'calls':>8}{'keys/s':>10}{'srv CPU us/key':>16}"
        f"{'client CPU us/key':>19}"
    )
    for r in report["figures"]:
        print(
            f"{r['case']:<24}{r['batch_size']:>6}{r['concurrency']:>6}{r['calls']:>8}"
            f"{r['keys_per_s']:>10.0f}{r['server_cpu_us_per_key']:>16.1f}"
            f"{r['client_cpu_us_per_key']:>19.1f}"
        )
    print()
    for name, value in report["ratios"].items():
        print(f"{name:<56}{value:>8.2f}")
    print(f"target {report['target']}: {'met' if report['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    args = p.parse_args(argv)
    report = asyncio.run(run(0.3 if args.smoke else args.seconds))
    print_table(report)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
