"""The `swa-canary` command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from properties.check import print_progress, run_check
from properties.targets import TargetError, resolve_target

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


def check_usage(args: argparse.Namespace) -> None:
    """Raise TargetError for a target or device that cannot work, before any run starts."""
    resolve_target(args.target)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TargetError("--device cuda, but torch sees no CUDA device")


def command_check(args: argparse.Namespace) -> int:
    check_usage(args)
    report = run_check(args.target, args.device, args.budget, args.seed, progress=print_progress())
    sys.stderr.write("\n")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swa-canary", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="run every state machine against a target for a time budget")
    add_target_options(check)
    check.add_argument("--budget", type=parse_duration, default=60.0, help="seconds to spend (default 60)")
    check.add_argument("--seed", type=int, default=None, help="master seed, to repeat a check exactly")
    check.add_argument("--json", default=None, help="also write the report as JSON to this path")
    check.set_defaults(handler=command_check)
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
