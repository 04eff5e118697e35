"""Time `swa-canary [COMMAND] --help` for each command, wall and CPU, in fresh processes.

    python -m bench.bench_help [--trees OLD_CHECKOUT .] [--rounds 5]

With several `--trees` (source checkouts), the rounds alternate between them, so a loaded
machine slows each alike and the ratios compare; each tree is put first on PYTHONPATH.
Prints medians over the rounds, in seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("", "check", "fuzz", "simulate", "selfcheck", "replay")


def time_help(tree: Path, command: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one `python -m properties.cli [command] --help` run from `tree`."""
    argv = [sys.executable, "-m", "properties.cli", *([command] if command else []), "--help"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    times: dict[tuple[Path, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for command in COMMANDS:
            for tree in trees:
                times.setdefault((tree, command), []).append(time_help(tree, command))
    print("| command | " + " | ".join(f"{tree.name}: wall / CPU s" for tree in trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for command in COMMANDS:
        cells = []
        for tree in trees:
            runs = times[(tree, command)]
            cells.append(f"{statistics.median(w for w, _ in runs):.2f} / {statistics.median(c for _, c in runs):.2f}")
        print(f"| `swa-canary {command + ' ' if command else ''}--help` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
