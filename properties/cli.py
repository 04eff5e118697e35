"""The `swa-canary` command line.

Every option, output path and target is checked before a run starts; what cannot work is one
line on stderr and exit status 2. The commands import torch and the machines only once they
run, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from properties import names
from properties.usage import (
    LazyChoices,
    UsageError,
    check_output_directory,
    check_output_file,
    parse_duration,
    positive_int,
    seed,
    write_json,
)

EXIT_CLEAN, EXIT_FOUND, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_STATUS_HELP = """exit status:
  0    the run finished and found nothing (replay: the finding or snapshot passes now)
  1    the target broke an invariant, or raised during a program (replay: it still fails)
  2    bad usage or configuration: an option out of range, a target that cannot be imported
       or built, an unwritable output path, a malformed finding or snapshot
  130  interrupted (Ctrl-C) before the run finished, having found nothing"""

RESTRICTION_NAMES = LazyChoices("properties.targets:RESTRICTIONS", names.RESTRICTIONS)
MACHINE_NAMES = LazyChoices("properties.machines:MACHINES", names.MACHINES)
MUTANT_NAMES = LazyChoices("properties.targets.mutants:MUTANTS", names.MUTANTS)
INJECTION_NAMES = LazyChoices("canary.simulate:INJECTIONS", names.INJECTIONS)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit status 2) and the exit codes in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def usage_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "this cannot run as asked" (exit 2), from the modules that raise
    them (imported here, once a command runs)."""
    from canary.divergence import DivergenceInputError
    from canary.probes import ProbeInputError
    from canary.simulate import SimulationConfigError
    from canary.snapshot import SnapshotError
    from canary.sweep import SweepInputError
    from properties.campaign import CampaignConfigError
    from properties.campaign.database import CampaignDatabaseError
    from properties.targets import TargetError
    from properties.targets.workers import IsolationError

    return (UsageError, TargetError, IsolationError, CampaignConfigError, CampaignDatabaseError, SimulationConfigError,
            SnapshotError, ProbeInputError, DivergenceInputError, SweepInputError)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default="reference",
        help="reference (default), sglang, mutant:NAME or module:factory; add @PYTHON (an interpreter or a "
        "virtual environment) to run it in a worker process there, e.g. sglang@/envs/sglang-0.5.8",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_isolation_options(parser)


def add_isolation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run the target in a worker process under this Python (as TARGET@): a crash or a hang is a finding",
    )
    parser.add_argument(
        "--call-timeout",
        type=parse_duration,
        default=None,
        metavar="SECONDS",
        help="an isolated target's call that takes longer is a HANG finding (default 60; also SWA_CALL_TIMEOUT)",
    )


def apply_isolation(args: argparse.Namespace) -> None:
    """--isolate and --call-timeout: into the target specs, and into SWA_CALL_TIMEOUT, which
    reaches the campaign's worker processes and exported tests too."""
    if getattr(args, "call_timeout", None) is not None:
        if not args.call_timeout > 0:
            raise UsageError(f"--call-timeout must be positive, got {args.call_timeout:g}")
        os.environ["SWA_CALL_TIMEOUT"] = repr(args.call_timeout)
    if getattr(args, "isolate", False):
        from properties.targets import isolated_spec

        for name in ("target", "against"):
            spec = getattr(args, name, None)
            if spec is not None:
                setattr(args, name, isolated_spec(spec))


def check_usage(args: argparse.Namespace) -> Any:
    """The target to check: --target, or with --against both, call by call, under the contract
    --relax / --restrict make of theirs. Raises TargetError for a target or device that cannot
    work (one that cannot be imported, whose factory raises, or builds no SWA allocator),
    before any run starts."""
    import torch

    from properties.runners.differential import differential_target
    from properties.targets import (
        TargetError,
        check_target_builds,
        resolve_target,
        with_contract_changes,
    )

    if args.device == "cuda" and not torch.cuda.is_available():
        raise TargetError("--device cuda, but torch sees no CUDA device")
    apply_isolation(args)
    target = resolve_target(args.target)
    check_target_builds(target, args.device)
    if args.against is not None:
        other = resolve_target(args.against)
        check_target_builds(other, args.device)
        target = differential_target(target, other)
    return with_contract_changes(target, getattr(args, "relax", ()), getattr(args, "restrict", ()))


def command_check(args: argparse.Namespace) -> int:
    from properties.runners.check import print_progress, run_check, status_record
    from properties.runners.coverage import allocator_source_files, measured
    from properties.settings import prepare_process

    json_path = None if args.json is None else check_output_file(args.json, "--json")
    target = check_usage(args)
    on_terminal = sys.stderr.isatty()
    prepare_process()
    with measured(allocator_source_files(target)) if args.coverage else contextlib.nullcontext() as coverage:
        report = run_check(
            target, args.device, args.budget, args.seed, args.machine, print_progress(interval=args.interval),
            every_finding=not args.first,
        )
    if on_terminal:
        sys.stderr.write("\n")
    else:
        sys.stderr.write(f"{json.dumps(status_record(report, 'summary'))}\n")
    if coverage is not None:
        report.coverage = asdict(coverage)
        print(coverage.explain())
    if json_path is not None:
        write_json(json_path, report.to_json())
    stopped = f"interrupted after {report.seconds:.1f}s" if report.interrupted else f"in {report.seconds:.1f}s"
    if report.findings:
        for number, finding in enumerate(report.findings, 1):
            print(f"Finding {number} of {len(report.findings)}: {finding.explain()}\n")
        print(
            f"{len(report.findings)} distinct finding(s): {report.programs} programs, {report.steps} steps against "
            f"{report.target} on {report.device} {stopped} (seed {report.seed})"
        )
        return EXIT_FOUND
    print(
        f"{'interrupted, ' if report.interrupted else ''}no violation: {report.programs} programs, "
        f"{report.steps} steps against {report.target} on {report.device} {stopped} (seed {report.seed})"
    )
    return EXIT_INTERRUPTED if report.interrupted else EXIT_CLEAN


def command_simulate(args: argparse.Namespace) -> int:
    from canary.simulate import SimulationConfig, simulate

    given = {name: getattr(args, name) for name in ("steps", "page_size", "size", "size_swa", "window", "every")}
    config = SimulationConfig(
        **{name: value for name, value in given.items() if value is not None},
        device=args.device,
        inject=args.inject,
        seed=random.randrange(2**32) if args.seed is None else args.seed,
    )
    report = simulate(config)
    print("\n".join(report.summary()))
    return EXIT_CLEAN if report.passed else EXIT_FOUND


def command_fuzz(args: argparse.Namespace) -> int:
    from properties.campaign import CampaignConfig, run_campaign
    from properties.campaign.database import DatabaseSpec

    out = check_output_directory(args.out, "--out")
    database = DatabaseSpec.parse(args.db, out)
    if database.redis_url is None:
        check_output_directory(database.local, "--db")
    if args.in_process and (args.isolate or "@" in args.target):
        raise UsageError(
            "--in-process runs the target in the workers themselves: give no --isolate and no TARGET@PYTHON"
        )
    args.isolate = not args.in_process
    check_usage(args)
    given = {"examples_per_run": args.examples_per_run, "status_seconds": args.interval}
    config = CampaignConfig(
        target=args.target,
        isolate=args.isolate,
        device=args.device,
        duration=args.duration,
        workers=args.workers,
        out=out,
        database=database,
        seed=args.seed,
        machines=tuple(args.machine or MACHINE_NAMES),
        **{name: value for name, value in given.items() if value is not None},
    )
    summary = run_campaign(config)
    return EXIT_FOUND if summary["new_findings"] or summary["still_failing"] else EXIT_CLEAN


def command_selfcheck(args: argparse.Namespace) -> int:
    from properties.runners.selfcheck import MutantResult, run_selfcheck
    from properties.settings import prepare_process

    json_path = None if args.json is None else check_output_file(args.json, "--json")
    check_usage(args)
    mutants = args.mutant or MUTANT_NAMES.names()
    master = random.randrange(2**32) if args.seed is None else args.seed

    def show(result: MutantResult) -> None:
        verdict = f"caught by {result.invariant}" if result.caught else "ESCAPED"
        sys.stderr.write(f"[{mutants.index(result.name) + 1}/{len(mutants)}] {result.name}: {verdict}\n")

    prepare_process()
    report = run_selfcheck(args.budget, args.device, master, mutants, progress=show, isolate=args.isolate)
    if json_path is not None:
        write_json(json_path, report.to_json())
    print(report.explain())
    return EXIT_CLEAN if report.passed else EXIT_FOUND


def command_replay(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"replay {args.path}: no such file or directory")
    if path.is_dir():
        from properties.campaign.resume import replay_finding

        apply_isolation(args)
        return replay_finding(path, args.target, args.isolate)
    return replay_snapshot(path)


def replay_snapshot(path: Path) -> int:
    """Re-run the canary's check on a snapshot; exit 1 if it finds a violation."""
    from canary.snapshot import Snapshot, replay

    snapshot = Snapshot.load(path)
    result = replay(snapshot)
    view = snapshot.view
    print(
        f"snapshot of monitor {snapshot.monitor!r} at step {snapshot.step}: "
        f"size {view.size_full} / SWA {view.size_swa}, "
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


def add_check_parser(commands: Any) -> None:
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
        choices=LazyChoices("properties.targets:RESTRICTIONS", names.RESTRICTIONS, extra=("all",)),
        metavar="RESTRICTION",
        help="drop one restriction of the target's contract, to look for what it hides; 'all' drives "
        "the whole SPEC (repeatable; one of: %(choices)s)",
    )
    check.add_argument(
        "--restrict",
        action="append",
        default=[],
        choices=RESTRICTION_NAMES,
        metavar="RESTRICTION",
        help="add a restriction to the target's contract, to mask a known finding and look for the next (repeatable)",
    )
    check.add_argument(
        "--budget", type=parse_duration, default=60.0, help="time to spend: 90, 90s, 15m, 8h (default 60s)"
    )
    check.add_argument("--seed", type=seed, default=None, help="master seed, to repeat a check exactly")
    check.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to this path")
    check.add_argument("--interval", type=parse_duration, default=10.0,
                       help="seconds between JSON status lines on stderr when not on a terminal (default 10)")
    check.add_argument(
        "--coverage",
        action="store_true",
        help="measure line and branch coverage of the target's own allocator source and list what never ran",
    )
    check.add_argument("--machine", action="append", choices=MACHINE_NAMES, metavar="MACHINE", default=None,
                       help="run only this state machine (repeatable; default all; one of: %(choices)s)")
    check.add_argument(
        "--first",
        action="store_true",
        help="stop at the first finding (default: mask each finding and go on until the budget is spent, "
        "reporting every distinct one)",
    )
    check.set_defaults(handler=command_check)


def add_simulate_parser(commands: Any) -> None:
    sim = commands.add_parser("simulate", help="a serving-like scheduler loop with the runtime canary attached")
    sim.add_argument("--steps", type=positive_int, default=None, help="scheduler steps")
    sim.add_argument("--page-size", type=positive_int, default=None)
    sim.add_argument("--size", type=positive_int, default=None, help="full-attention token slots")
    sim.add_argument("--size-swa", type=positive_int, default=None, help="sliding-window token slots")
    sim.add_argument("--window", type=positive_int, default=None, help="sliding window in tokens")
    sim.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sim.add_argument("--every", type=positive_int, default=None, help="canary check every N steps")
    sim.add_argument("--inject", default=None, choices=INJECTION_NAMES, metavar="INVARIANT",
                     help="corrupt the allocator once, at a random step (one of: %(choices)s)")
    sim.add_argument("--seed", type=seed, default=None, help="seed, to repeat a run exactly")
    sim.set_defaults(handler=command_simulate)


def add_fuzz_parser(commands: Any) -> None:
    fuzz = commands.add_parser(
        "fuzz", help="an overnight campaign: worker processes, a shared example database, exported findings"
    )
    add_target_options(fuzz)
    fuzz.add_argument(
        "--in-process",
        action="store_true",
        help="run the target inside the campaign's workers instead of a process of its own (the default, as "
        "--isolate): faster, but a crashing target kills a worker and its finding has no minimal program",
    )
    fuzz.add_argument("--duration", type=parse_duration, default=8 * 3600.0, help="how long to run (default 8h)")
    fuzz.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1, help="worker processes (default: one per core)"
    )
    fuzz.add_argument(
        "--db", default=None, metavar="PATH|redis://HOST:PORT/N",
        help="example database shared by the workers (default OUT/examples); "
        "Redis keeps OUT/examples as its local copy",
    )
    fuzz.add_argument("--out", default="fuzz-out", help="campaign directory: findings/, examples/ (default fuzz-out)")
    fuzz.add_argument("--seed", type=seed, default=None, help="master seed of the workers' seeds")
    fuzz.add_argument("--examples-per-run", type=positive_int, default=None,
                      help="examples per Hypothesis run; smaller runs report more often")
    fuzz.add_argument("--machine", action="append", choices=MACHINE_NAMES, metavar="MACHINE", default=None,
                      help="run only this state machine (repeatable; default all; one of: %(choices)s)")
    fuzz.add_argument("--interval", type=parse_duration, default=None,
                      help="seconds between JSON status lines when not on a terminal (default 10)")
    fuzz.set_defaults(handler=command_fuzz, against=None)


def add_selfcheck_parser(commands: Any) -> None:
    selfcheck = commands.add_parser(
        "selfcheck", help="check every mutant of the reference allocator (each must be caught) and the reference"
    )
    selfcheck.add_argument("--budget", type=parse_duration, default=60.0, help="time per mutant and pass (default 60s)")
    selfcheck.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    selfcheck.add_argument("--seed", type=seed, default=None, help="master seed, to repeat a self-check exactly")
    selfcheck.add_argument("--mutant", action="append", choices=MUTANT_NAMES, metavar="MUTANT", default=None,
                           help="check only this mutant (repeatable; default all; one of: %(choices)s)")
    selfcheck.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to this path")
    add_isolation_options(selfcheck)
    selfcheck.set_defaults(handler=command_selfcheck, target="reference", against=None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="swa-canary", description="Property-based checks and a runtime canary for SWA KV-cache allocators."
    )
    commands = parser.add_subparsers(dest="command")
    add_check_parser(commands)
    add_simulate_parser(commands)
    add_fuzz_parser(commands)
    add_selfcheck_parser(commands)
    replay_command = commands.add_parser(
        "replay", help="re-run the canary's check on a snapshot it wrote, or a campaign finding (OUT/findings/ID)"
    )
    replay_command.add_argument("path", help="a snapshot file (swa-canary-*.pt) or a finding directory")
    replay_command.add_argument(
        "--target", default=None, help="replay a finding on this target (default: SWA_TARGET, else the finding's own)"
    )
    add_isolation_options(replay_command)
    replay_command.set_defaults(handler=command_replay, against=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (EXIT_STATUS_HELP)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["check", *(argv or [])])
    try:
        return args.handler(args)
    except usage_errors() as error:
        print(f"swa-canary: {error}".replace("\n", " | "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before a run started, or after it ended: nothing to report
        print("swa-canary: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
