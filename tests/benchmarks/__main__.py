"""Every benchmark of issue 5, one after another, then one summary table and one JSON report.

    scripts/bench [--smoke] [--json PATH] [--only a,b,...] [--seconds S] [--tls]

Cases (each beside its baseline, measured in the same run; ratios are what to compare on a
shared machine):
  a  unary.py       Decrypt/GenerateDataKey (warm) vs a bare grpc.aio echo, 1 and 64 callers
  b  batch.py       data keys/s through BatchDecryptDataKeys at batch 1, 16, 256
  c  cold_cache.py  root-key provider calls made by 64 callers over N customer-managed resources
  d  streaming.py   256 MiB through Storage vs raw gRPC streaming; stream encryptor vs tink
  e  retention.py   sweeping 100k expired results vs a plain SQL delete plus unlinks
  f  reuseport.py   several broker processes sharing one port (SO_REUSEPORT) vs one

`--smoke` runs each for seconds only (CI runs it so the benchmarks never rot; targets are not
judged then). `--tls` runs a, b and d with mutual TLS and the development authorization policy
on, the baselines serving the same TLS (issue 6: the targets must still hold). `--json PATH`
writes {"cases": {letter: report}, ...}: every module's figures, ratios, target and whether it
was met, plus the environment. A full run takes about 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.cli.dev_certs import init_dev_certs
from tests.benchmarks import batch, cold_cache, retention, reuseport, streaming, unary
from tests.benchmarks.common import TLS_ENV, environment, now_utc

Main = Callable[[list[str]], dict[str, Any]]
CASES: dict[str, tuple[str, Main]] = {
    "a": ("unary", unary.main),
    "b": ("batch", batch.main),
    "c": ("cold cache", cold_cache.main),
    "d": ("streaming", streaming.main),
    "e": ("retention", retention.main),
    "f": ("SO_REUSEPORT", reuseport.main),
}
# Cases whose module takes --seconds (per measured case).
TIMED = {"a", "b", "f"}


def headline(letter: str, report: dict[str, Any]) -> str:
    """The one figure that answers the case's target."""
    if "headline" in report:
        return str(report["headline"])
    ratios: dict[str, float] = report.get("ratios", {})
    if letter == "b":
        best = max(f["keys_per_s"] for f in report["figures"] if f.get("batch_size") == 256)
        return f"{best:,.0f} keys/s at batch 256"
    return ", ".join(f"{name} {value:.2f}" for name, value in ratios.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds per case; no judging")
    parser.add_argument("--json", type=Path, help="also write the combined report here")
    parser.add_argument("--only", default="abcdef", help="case letters to run (default abcdef)")
    parser.add_argument("--seconds", type=float, help="per measured case of a, b and f")
    parser.add_argument("--tls", action="store_true", help="mutual TLS + authorization (a, b, d)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as certs:
        if args.tls:
            init_dev_certs(Path(certs))
            os.environ[TLS_ENV] = certs  # read by the cases and inherited by their servers
        run_cases(args)


def run_cases(args: argparse.Namespace) -> None:
    letters = [c for c in args.only.replace(",", "") if c in CASES]
    reports: dict[str, dict[str, Any]] = {}
    for letter in letters:
        name, run = CASES[letter]
        print(f"\n=== ({letter}) {name}\n", flush=True)
        argv = ["--smoke"] if args.smoke else []
        if args.seconds is not None and letter in TIMED and not args.smoke:
            argv += ["--seconds", str(args.seconds)]
        reports[letter] = run(argv)
    print("\n=== summary" + (" (smoke: figures prove the code runs, nothing more)" * args.smoke))
    if args.tls:
        print("mutual TLS and the authorization policy on (cases a, b, d; baselines over TLS too)")
    print(f"{'case':<18}{'met':<6}figure")
    for letter, report in reports.items():
        met = "-" if args.smoke else ("yes" if report.get("met") else "NO")
        print(f"({letter}) {CASES[letter][0]:<14}{met:<6}{headline(letter, report)}")
        print(f"{'':<24}target: {report.get('target', '')}")
    if args.json:
        combined = {
            "benchmark": "keybroker",
            "date": now_utc(),
            "smoke": args.smoke,
            "tls": args.tls,
            "environment": environment(),
            "cases": reports,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(combined, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
