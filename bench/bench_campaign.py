"""Campaign throughput: steps per second of `swa-canary fuzz` at 1 and 2 workers, side by side.

Each campaign runs for the same duration against the same target, one after the other in
this run, with a fresh directory database. Its rate is measured from the status records: from
the first one at least `--warmup` seconds in (process start-up and imports left out) to the
last one before the stop. The whole-campaign rate (start-up included) is shown too.

    python -m bench.bench_campaign [--duration 30] [--warmup 6] [--workers 1 2] [--target reference] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

from properties.campaign import CampaignConfig, run_campaign
from properties.campaign.progress import ProgressDisplay


def steady_rate(statuses: list[dict], warmup: float) -> tuple[float, float]:
    """(steps/s, examples/s) from the first status past the warm-up to the last one with workers."""
    running = [
        status for status in statuses if status["elapsed"] >= warmup and status["steps"] > 0 and status["workers"] > 0
    ]
    if len(running) < 2:
        return 0.0, 0.0
    first, last = running[0], running[-1]
    seconds = last["elapsed"] - first["elapsed"]
    return (last["steps"] - first["steps"]) / seconds, (last["examples"] - first["examples"]) / seconds


def measure(workers: int, duration: float, warmup: float, target: str, device: str) -> dict:
    stream = io.StringIO()
    with tempfile.TemporaryDirectory() as out:
        config = CampaignConfig(target=target, device=device, duration=duration, workers=workers, out=Path(out))
        summary = run_campaign(config, ProgressDisplay(interval=1.0, stream=stream, tty=False))
    statuses = [record for record in map(json.loads, stream.getvalue().splitlines()) if record["event"] == "status"]
    steps_per_s, examples_per_s = steady_rate(statuses, warmup)
    return {
        "workers": workers,
        "steps_per_s": steps_per_s,
        "examples_per_s": examples_per_s,
        "whole_steps_per_s": summary["steps_per_s"],
        "steps": summary["steps"],
        "findings": len(summary["new_findings"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per campaign (default 30)")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds left out at the start (default 6)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", default="reference")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, target {args.target} on {args.device}, {args.duration:.0f}s per campaign")
    results = [measure(workers, args.duration, args.warmup, args.target, args.device) for workers in args.workers]
    base = results[0]["steps_per_s"] or float("nan")
    print(
        f"{'workers':>7} {'steps/s':>9} {'examples/s':>10} {'x first':>7} {'steps/s incl. start':>19} {'findings':>8}"
    )
    for result in results:
        print(
            f"{result['workers']:>7} {result['steps_per_s']:>9.0f} {result['examples_per_s']:>10.1f} "
            f"{result['steps_per_s'] / base:>7.2f} {result['whole_steps_per_s']:>19.0f} {result['findings']:>8}"
        )


if __name__ == "__main__":
    main()
