"""Compare sglang releases pairwise: `check --target sglang@A --against sglang@B` per pair.

    python -m bench.release_pairs --pairs 0.5.12:0.5.13,0.5.13:0.5.14 --budget 75 --out pairs.md

Each release runs in a worker under its own environment (`--envs`, built as
`bench.sweep_releases` builds them, or found ready there); the harness drives both with every
program, under the stricter of their contracts and what both can be called with. Two runs per
pair: under the releases' scheduler contracts, and under the whole SPEC (`--relax all`). One
Markdown row per run: whether a difference was found, and each finding with its minimal
program as allocator calls. A finding other than DIFFERENTIAL is shared by both releases (they
agreed on every call up to it). Exit 0 when every run completed, 2 when one could not run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.sweep_releases import DEFAULT_ENVS, REPO, SweepError, environment, findings_of

RUNS = (("its contract", []), ("whole SPEC", ["--relax", "all"]))


@dataclass
class PairRun:
    older: str
    newer: str
    name: str
    findings: list[dict] = field(default_factory=list)
    programs: int = 0
    steps: int = 0
    seconds: float = 0.0
    error: str = ""


def check_pair(pythons: tuple[Path, Path], versions: tuple[str, str], run: tuple[str, list[str]],
               budget: float, seed: int, out: Path) -> PairRun:
    name, extra = run
    result = PairRun(*versions, name)
    report_path = out / f"{versions[0]}-{versions[1]}-{name.replace(' ', '-')}.json"
    command = [sys.executable, "-W", "ignore", "-m", "properties.cli", "check",
               "--target", f"sglang@{pythons[0]}", "--against", f"sglang@{pythons[1]}",
               "--budget", str(budget), "--seed", str(seed), "--json", str(report_path), *extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    result.seconds = time.monotonic() - started
    if done.returncode not in (0, 1) or not report_path.exists():
        result.error = f"exit {done.returncode}: {' / '.join(done.stderr.strip().splitlines()[-3:])}"
        return result
    report = json.loads(report_path.read_text())
    result.findings, result.programs, result.steps = findings_of(report), report["programs"], report["steps"]
    return result


def program_text(finding: dict) -> str:
    """The minimal program as one line of allocator calls."""
    calls = finding.get("calls") or {}
    config = calls.get("config", {})
    shown = ", ".join(f"{key}={config[key]}" for key in ("size", "size_swa", "page_size", "need_sort") if key in config)
    steps = [f"{e['call']}({', '.join(map(json.dumps, e.get('args', [])))})" for e in calls.get("calls", [])]
    return f"`({shown})` " + "; ".join(f"`{step}`" for step in steps)


def table(runs: list[PairRun], budget: float, seed: int) -> str:
    lines = [
        f"Budget {budget:g} s per run, seed {seed}, CPU; the first release is --target, the second --against.",
        "",
        "| pair | run | identical? | findings (minimal program as allocator calls) | programs | steps | wall s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for run in runs:
        differences = [finding for finding in run.findings if finding["invariant"] == "DIFFERENTIAL"]
        verdict = "not run" if run.error else ("**no**" if differences else "yes, within the budget")
        cells = [run.error] if run.error else [
            f"{finding['invariant']}: {finding['detail'].replace('|', '/')[:220]}<br>{program_text(finding)}"
            for finding in run.findings
        ]
        lines.append(f"| {run.older} → {run.newer} | {run.name} | {verdict} | {'<br><br>'.join(cells) or 'none'} "
                     f"| {run.programs} | {run.steps} | {run.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.release_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="comma-separated OLD:NEW release pairs, e.g. 0.5.12:0.5.13")
    parser.add_argument("--budget", type=float, default=75.0, help="seconds per check run (default 75)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help=f"environment cache (default {DEFAULT_ENVS})")
    parser.add_argument("--out", type=Path, default=Path("pairs.md"), help="the Markdown table (reports beside it)")
    args = parser.parse_args(argv)
    pairs = [tuple(pair.strip().split(":")) for pair in args.pairs.split(",") if pair.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs) or args.budget <= 0:
        parser.error("give OLD:NEW pairs and a positive budget")
    reports = args.out.with_suffix("")
    reports.mkdir(parents=True, exist_ok=True)
    args.envs.mkdir(parents=True, exist_ok=True)
    runs: list[PairRun] = []
    for versions in pairs:
        try:
            pythons = (environment(versions[0], args.envs), environment(versions[1], args.envs))
        except (SweepError, subprocess.CalledProcessError) as error:
            runs.append(PairRun(*versions, "setup", error=str(error)))
            continue
        for run in RUNS:
            runs.append(check_pair(pythons, versions, run, args.budget, args.seed, reports))
            print(f"{versions[0]} → {versions[1]}, {run[0]}: {runs[-1].error or len(runs[-1].findings)} finding(s)",
                  file=sys.stderr, flush=True)
            args.out.write_text(table(runs, args.budget, args.seed))
    return 2 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
