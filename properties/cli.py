"""The `swa-canary` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from canary.divergence import DivergenceInputError
from canary.probes import ProbeInputError
from canary.simulate import (
    INJECTIONS,
    SimulationConfig,
    SimulationConfigError,
    simulate,
)
from canary.snapshot import Snapshot, SnapshotError, replay
from canary.sweep import SweepInputError
from properties.campaign import CampaignConfig, CampaignConfigError, run_campaign
from properties.campaign.database import CampaignDatabaseError, DatabaseSpec
from properties.campaign.resume import replay_finding
from properties.machines import MACHINES
from properties.runners.check import print_progress, run_check
from properties.runners.coverage import allocator_source_files, measured
from properties.runners.differential import differential_target
from properties.runners.selfcheck import MutantResult, run_selfcheck
from properties.settings import prepare_process
from properties.targets import (
    RESTRICTIONS,
    Target,
    TargetError,
    resolve_target,
    with_contract_changes,
)
from properties.targets.mutants import MUTANTS

EXIT_CLEAN, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m' or '8h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90, 90s, 15m, 8h)") from None


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="reference", help="reference (default), sglang, or module:factory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def check_usage(args: argparse.Namespace) -> Target:
    """The target to check: --target, or with --against both, call by call, under the contract
    --relax / --restrict make of theirs. Raises TargetError for a target or device that cannot
    work, before any run starts."""
    target = resolve_target(args.target)
    if args.against is not None:
        target = differential_target(target, resolve_target(args.against))
    target = with_contract_changes(target, getattr(args, "relax", ()), getattr(args, "restrict", ()))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TargetError("--device cuda, but torch sees no CUDA device")
    return target


def command_check(args: argparse.Namespace) -> int:
    target = check_usage(args)
    prepare_process()
    with measured(allocator_source_files(target)) if args.coverage else contextlib.nullcontext() as coverage:
        report = run_check(target, args.device, args.budget, args.seed, progress=print_progress())
    sys.stderr.write("\n")
    if coverage is not None:
        report.coverage = asdict(coverage)
        print(coverage.explain())
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report.to_json(), out, indent=2)
    if report.finding is not None:
        print(report.finding.explain())
        return EXIT_FOUND
    print(
        f"no violation: {report.programs} programs, {report.steps} steps against {report.target} "
        f"on {report.device} in {report.seconds:.1f}s (seed {report.seed})"
    )
    return EXIT_CLEAN


def command_simulate(args: argparse.Namespace) -> int:
    config = SimulationConfig(
        steps=args.steps,
        page_size=args.page_size,
        size=args.size,
        size_swa=args.size_swa,
        window=args.window,
        device=args.device,
        every=args.every,
        inject=args.inject,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
    )
    try:
        report = simulate(config)
    except SimulationConfigError as error:
        print(f"swa-canary: {error}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report.summary()))
    return EXIT_CLEAN if report.passed else EXIT_FOUND


def command_fuzz(args: argparse.Namespace) -> int:
    check_usage(args)
    out = Path(args.out)
    try:
        config = CampaignConfig(
            target=args.target,
            device=args.device,
            duration=args.duration,
            workers=args.workers,
            out=out,
            database=DatabaseSpec.parse(args.db, out),
            seed=args.seed,
            machines=tuple(args.machine or sorted(MACHINES)),
            examples_per_run=args.examples_per_run,
            status_seconds=args.interval,
        )
        summary = run_campaign(config)
    except (CampaignConfigError, CampaignDatabaseError) as error:
        print(f"swa-canary: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_FOUND if summary["new_findings"] or summary["still_failing"] else EXIT_CLEAN


def command_selfcheck(args: argparse.Namespace) -> int:
    check_usage(args)
    names = args.mutant or list(MUTANTS)
    seed = random.randrange(2**32) if args.seed is None else args.seed

    def show(result: MutantResult) -> None:
        verdict = f"caught by {result.invariant}" if result.caught else "ESCAPED"
        sys.stderr.write(f"[{names.index(result.name) + 1}/{len(names)}] {result.name}: {verdict}\n")

    prepare_process()
    report = run_selfcheck(args.budget, args.device, seed, names, progress=show)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report.to_json(), out, indent=2)
    print(report.explain())
    return EXIT_CLEAN if report.passed else EXIT_FOUND


def command_replay(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        return replay_finding(path)
    return replay_snapshot(path)


def replay_snapshot(path: Path) -> int:
    """Re-run the canary's check on a snapshot; exit 1 if it finds a violation."""
    try:
        snapshot = Snapshot.load(path)
        result = replay(snapshot)
    except (SnapshotError, ProbeInputError, DivergenceInputError, SweepInputError) as error:
        print(f"swa-canary: {error}", file=sys.stderr)
        return EXIT_USAGE
    view = snapshot.view
    print(
        f"snapshot of monitor {snapshot.monitor!r} at step {snapshot.step}: size {view.size_full} / SWA {view.size_swa}, "
        f"page size {view.page_size}, {'no batch' if snapshot.batch is None else f'{snapshot.batch.size} requests'}"
    )
    if result.divergence is not None:
        print("divergence totals: " + ", ".join(f"{kind} {count}" for kind, count in result.divergence.items()))
    for source, violation in result.sourced():
        print(f"[{source}] {violation.explain()}")
    if not result.violations:
        print("no violation")
        return EXIT_CLEAN
    return EXIT_FOUND


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swa-canary", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="run every state machine against a target for a time budget")
    add_target_options(check)
    check.add_argument(
        "--against",
        default=None,
        metavar="TARGET",
        help="differential mode: run every program on both targets and report the first call after "
        "which they disagree (a returned value, a size, the free units or the mapping)",
    )
    check.add_argument(
        "--relax",
        action="append",
        default=[],
        choices=(*RESTRICTIONS, "all"),
        metavar="RESTRICTION",
        help="drop one restriction of the target's contract, to look for what it hides; 'all' drives "
        f"the whole SPEC (repeatable; one of: {', '.join(RESTRICTIONS)})",
    )
    check.add_argument(
        "--restrict",
        action="append",
        default=[],
        choices=RESTRICTIONS,
        metavar="RESTRICTION",
        help="add a restriction to the target's contract, to mask a known finding and look for the next (repeatable)",
    )
    check.add_argument("--budget", type=parse_duration, default=60.0, help="seconds to spend (default 60)")
    check.add_argument("--seed", type=int, default=None, help="master seed, to repeat a check exactly")
    check.add_argument("--json", default=None, help="also write the report as JSON to this path")
    check.add_argument(
        "--coverage",
        action="store_true",
        help="measure line and branch coverage of the target's own allocator source and list what never ran",
    )
    check.set_defaults(handler=command_check)

    defaults = SimulationConfig()
    sim = commands.add_parser("simulate", help="a serving-like scheduler loop with the runtime canary attached")
    sim.add_argument("--steps", type=int, default=1000, help="scheduler steps (default 1000)")
    sim.add_argument("--page-size", type=int, default=defaults.page_size)
    sim.add_argument("--size", type=int, default=defaults.size, help="full-attention token slots")
    sim.add_argument("--size-swa", type=int, default=defaults.size_swa, help="sliding-window token slots")
    sim.add_argument("--window", type=int, default=defaults.window, help="sliding window in tokens")
    sim.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sim.add_argument("--every", type=int, default=defaults.every, help="canary check every N steps")
    sim.add_argument("--inject", default=None, choices=sorted(INJECTIONS), help="corrupt the allocator once, at a random step")
    sim.add_argument("--seed", type=int, default=None, help="seed, to repeat a run exactly")
    sim.set_defaults(handler=command_simulate)

    fuzz = commands.add_parser("fuzz", help="an overnight campaign: worker processes, a shared example database, exported findings")
    add_target_options(fuzz)
    fuzz.add_argument("--duration", type=parse_duration, default=8 * 3600.0, help="how long to run (default 8h)")
    fuzz.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    fuzz.add_argument(
        "--db", default=None, metavar="PATH|redis://HOST:PORT/N",
        help="example database shared by the workers (default OUT/examples); Redis keeps OUT/examples as its local copy",
    )
    fuzz.add_argument("--out", default="fuzz-out", help="campaign directory: findings/, examples/ (default fuzz-out)")
    fuzz.add_argument("--seed", type=int, default=None, help="master seed of the workers' seeds")
    fuzz.add_argument("--examples-per-run", type=int, default=CampaignConfig.examples_per_run,
                      help="examples per Hypothesis run; smaller runs report more often")
    fuzz.add_argument("--machine", action="append", choices=sorted(MACHINES), default=None,
                      help="run only this state machine (repeatable; default all)")
    fuzz.add_argument("--interval", type=parse_duration, default=CampaignConfig.status_seconds,
                      help="seconds between JSON status lines when not on a terminal (default 10)")
    fuzz.set_defaults(handler=command_fuzz, against=None)

    selfcheck = commands.add_parser(
        "selfcheck", help="check every mutant of the reference allocator (each must be caught) and the reference"
    )
    selfcheck.add_argument("--budget", type=parse_duration, default=60.0, help="seconds per mutant and pass (default 60)")
    selfcheck.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    selfcheck.add_argument("--seed", type=int, default=None, help="master seed, to repeat a self-check exactly")
    selfcheck.add_argument("--mutant", action="append", choices=sorted(MUTANTS), default=None,
                           help="check only this mutant (repeatable; default all)")
    selfcheck.add_argument("--json", default=None, help="also write the report as JSON to this path")
    selfcheck.set_defaults(handler=command_selfcheck, target="reference", against=None)

    replay_command = commands.add_parser(
        "replay", help="re-run the canary's check on a snapshot it wrote, or a campaign finding (OUT/findings/ID)"
    )
    replay_command.add_argument("path", help="a snapshot file (swa-canary-*.pt) or a finding directory")
    replay_command.set_defaults(handler=command_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["check", *(argv or [])])
    try:
        return args.handler(args)
    except TargetError as error:
        print(f"swa-canary: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
