"""`swa-canary selfcheck`: does the harness catch real bugs, and only real ones?

Runs the check (`properties.check.run_check`) on every mutant of `properties.targets.mutants`, and on
the reference allocator, each with the same time budget and master seed. Each mutant is
checked twice with that budget: once without shrinking, for the time to detect, and once
with it, for the minimal program (shrinking usually costs far more than finding). A mutant
is caught when the check reports a finding; the table says which invariant the minimal
program breaks first, every invariant of its failing step, the two times and the minimal
program's length. The self-check passes when every mutant is caught and the reference is
clean.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

from canary.invariants import Name
from properties.runners.check import CheckReport, run_check
from properties.targets import resolve_target
from properties.targets.mutants import MUTANTS, mutant_factory


@dataclass
class MutantResult:
    name: str
    breaks: tuple[Name, ...]
    """The invariants the mutant's bug breaks (its docstring says why)."""
    caught: bool
    invariant: Name | None = None
    """The first (most severe) invariant reported (CRASH when the target raised instead); None
    for a mutant that escaped."""
    invariants: list[Name] = field(default_factory=list)
    detect_seconds: float = 0.0
    """Time to the first failing program (no shrinking), or the whole budget if escaped."""
    minimal_seconds: float = 0.0
    """Time to the shrunk, minimal program."""
    detect_cpu_seconds: float = 0.0
    minimal_cpu_seconds: float = 0.0
    """The same two times in CPU time (what a machine shared with other work does not inflate)."""
    program_steps: int = 0
    """Rules in the minimal program."""
    machine: str = ""

    @classmethod
    def of(cls, name: str, detected: CheckReport, minimised: CheckReport) -> "MutantResult":
        finding = minimised.finding
        result = cls(
            name,
            MUTANTS[name].breaks,
            caught=detected.finding is not None or finding is not None,
            detect_seconds=detected.finding.seconds if detected.finding else detected.seconds,
            minimal_seconds=minimised.seconds,
            detect_cpu_seconds=detected.cpu_seconds,
            minimal_cpu_seconds=minimised.cpu_seconds,
        )
        if finding is not None:
            result.invariant, result.invariants, result.machine = finding.invariant, finding.invariants, finding.machine
            result.minimal_seconds, result.program_steps = finding.seconds, finding.program_steps
        elif detected.finding is not None:  # caught, but the shrinking run ran out of budget first
            result.invariant, result.invariants = detected.finding.invariant, detected.finding.invariants
            result.machine = detected.finding.machine
        return result


@dataclass
class SelfCheckReport:
    device: str
    seed: int
    budget: float
    reference: CheckReport
    mutants: list[MutantResult]

    @property
    def caught(self) -> list[MutantResult]:
        return [result for result in self.mutants if result.caught]

    @property
    def escaped(self) -> list[str]:
        return [result.name for result in self.mutants if not result.caught]

    @property
    def passed(self) -> bool:
        return not self.escaped and self.reference.finding is None

    def summary(self) -> dict:
        """Kill rate, and over the caught mutants: median / worst time to detect, median /
        worst time to the minimal program, and the median minimal-program length (rules)."""
        caught = self.caught
        detect = [result.detect_seconds for result in caught]
        minimal = [result.minimal_seconds for result in caught]
        minimal_cpu = [result.minimal_cpu_seconds for result in caught]
        steps = [result.program_steps for result in caught]
        return {
            "mutants": len(self.mutants),
            "caught": len(caught),
            "kill_rate": len(caught) / len(self.mutants) if self.mutants else 0.0,
            "caught_by_crash": [result.name for result in caught if result.invariant == Name.CRASH],
            "escaped": self.escaped,
            "median_seconds_to_detect": statistics.median(detect) if caught else None,
            "worst_seconds_to_detect": max(detect) if caught else None,
            "median_seconds_to_minimal_program": statistics.median(minimal) if caught else None,
            "worst_seconds_to_minimal_program": max(minimal) if caught else None,
            "median_cpu_seconds_to_minimal_program": statistics.median(minimal_cpu) if caught else None,
            "worst_cpu_seconds_to_minimal_program": max(minimal_cpu) if caught else None,
            "median_program_steps": statistics.median(steps) if caught else None,
            "reference_clean": self.reference.finding is None,
        }

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "seed": self.seed,
            "budget": self.budget,
            "summary": self.summary(),
            "reference": self.reference.to_json(),
            "mutants": [asdict(result) for result in self.mutants],
        }

    def table(self) -> str:
        rows = [("mutant", "caught", "invariant", "all invariants", "breaks", "detect s", "minimal s", "minimal cpu s",
                 "steps")]
        for result in self.mutants:
            rows.append(
                (
                    result.name,
                    "yes" if result.caught else "ESCAPED",
                    result.invariant or "-",
                    ",".join(result.invariants) or "-",
                    "|".join(result.breaks),
                    f"{result.detect_seconds:.1f}",
                    f"{result.minimal_seconds:.1f}" if result.caught else "-",
                    f"{result.minimal_cpu_seconds:.1f}" if result.caught else "-",
                    str(result.program_steps) if result.caught else "-",
                )
            )
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def explain(self) -> str:
        summary = self.summary()
        reference = self.reference
        lines = [
            self.table(),
            "",
            f"killed {summary['caught']}/{summary['mutants']} mutants ({summary['kill_rate']:.0%}) "
            f"with {self.budget:.0f}s each on {self.device} (seed {self.seed})",
        ]
        if summary["caught"]:
            lines.append(
                f"time to detect: median {summary['median_seconds_to_detect']:.1f}s, "
                f"worst {summary['worst_seconds_to_detect']:.1f}s; to the minimal program: median "
                f"{summary['median_seconds_to_minimal_program']:.1f}s, worst "
                f"{summary['worst_seconds_to_minimal_program']:.1f}s (CPU: median "
                f"{summary['median_cpu_seconds_to_minimal_program']:.1f}s, worst "
                f"{summary['worst_cpu_seconds_to_minimal_program']:.1f}s); "
                f"minimal programs: median {summary['median_program_steps']:g} steps"
            )
        if summary["caught_by_crash"]:
            lines.append(f"caught only by a crash: {', '.join(summary['caught_by_crash'])}")
        if summary["escaped"]:
            lines.append(f"ESCAPED: {', '.join(summary['escaped'])}")
        if reference.finding is None:
            lines.append(
                f"reference: clean, {reference.programs} programs, {reference.steps} steps in {reference.seconds:.1f}s"
            )
        else:
            lines.append("reference FAILED:\n" + reference.finding.explain())
        return "\n".join(lines)


def run_selfcheck(
    budget: float = 60.0,
    device: str = "cpu",
    seed: int = 0,
    names: list[str] | None = None,
    progress: Callable[[MutantResult], None] | None = None,
    isolate: bool = False,
) -> SelfCheckReport:
    """Check every mutant (or those named), without and with shrinking, and the reference,
    each run for `budget` seconds with the same master seed; isolate: each in a worker process."""
    unknown = sorted(set(names or ()) - set(MUTANTS))
    if unknown:
        raise KeyError(f"no mutant {', '.join(unknown)}; known: {', '.join(sorted(MUTANTS))}")
    results = []
    for name in names or list(MUTANTS):
        factory = resolve_target(f"mutant:{name}@") if isolate else mutant_factory(name)
        result = MutantResult.of(
            name,
            detected=run_check(factory, device, budget, seed, shrink=False),
            minimised=run_check(factory, device, budget, seed),
        )
        results.append(result)
        if progress is not None:
            progress(result)
    reference = run_check("reference@" if isolate else "reference", device, budget, seed)
    return SelfCheckReport(device, seed, budget, reference, results)
