"""A finding as the plain allocator calls of its minimal program: a standalone Python snippet.

The snippet builds the target's allocator and makes the calls one by one, each with what the
target returned as a comment (and what the reference allocator returned, where that differs),
then says in a comment what the last step broke. It runs as it is: a call that raised on the
target and is not the last one is wrapped in `suppress(Exception)`; the last one is left to
raise, since that error is the finding.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from properties.machines.driver import AllocatorDriver
from properties.runners.export import call_source, reference_steps
from properties.targets import AllocatorConfig, Target, TargetError, resolve_target

if TYPE_CHECKING:  # check.py builds its findings' snippets here
    from properties.runners.check import Finding

ALLOCATIONS = ("alloc", "alloc_extend", "alloc_decode", "alloc_extend_swa_tail")
COMMENT_COLUMN = 64


@dataclass(frozen=True)
class Outcome:
    """What one call did on the target: its result (index list or None), or its error."""

    result: list[int] | None
    error: str | None


def target_outcomes(target: Target, device: str, program: dict) -> list[Outcome]:
    """The program's calls made again on a fresh allocator of `target`, each one whether or
    not an earlier one raised, as the machines did (a failed construction gives none)."""
    try:
        driver = AllocatorDriver(target.factory(AllocatorConfig(device=device, **program["config"])), device)
    except Exception:  # no allocator, no outcomes: the snippet says so at each call
        return []
    outcomes: list[Outcome] = []
    for entry in program["calls"]:
        try:
            result = driver.call(entry["call"], *entry["args"])
        except Exception as error:  # the target's failure is part of what the snippet shows
            outcomes.append(Outcome(None, f"{type(error).__name__}: {error}"))
        else:
            outcomes.append(Outcome(None if result is None else result.cpu().tolist(), None))
    return outcomes


def factory_source(target: Target) -> tuple[list[str], str]:
    """(import lines, expression) that rebuild `target`'s factory in a fresh interpreter; a
    factory that cannot be named (a closure) is stood in for by the reference, and says so."""
    name = target.name.split(" [")[0]
    if name.startswith("mutant:"):
        imports = ["from properties.targets import AllocatorConfig"]
        imports.append("from properties.targets.mutants import mutant_factory")
        return imports, f"mutant_factory({name[len('mutant:'):]!r})"
    expression = ""
    try:
        resolve_target(name)
    except TargetError:
        module = getattr(target.factory, "__module__", "")
        qualname = getattr(target.factory, "__qualname__", "")
        name = f"{module}:{qualname}" if module and qualname and "<" not in qualname else "reference"
        if name == "reference":
            expression = f"  # stands in for {target.name}, which cannot be rebuilt from its name"
    imports = ["from properties.targets import AllocatorConfig, resolve_target"]
    return imports, f"resolve_target({name!r}).factory{expression}"


def _describe(entry: dict, outcome: Outcome | None, reference: Any) -> str:
    """The comment after a call: the target's result, and the reference's where it differs."""
    if outcome is None:
        return "not reached: the target could not be built"
    allocation = entry["call"] in ALLOCATIONS
    said = f"raises {outcome.error}" if outcome.error else repr(outcome.result) if allocation else "no error"
    if reference.raised:
        expected = "raises"
    else:
        expected = repr(reference.expected["result"]) if allocation else "no error"
    if said == expected or (outcome.error and reference.raised):
        return said if allocation or outcome.error else ""
    return f"{said}; the reference: {expected}"


def _with_comment(statement: str, comment: str) -> str:
    if not comment:
        return statement
    return f"{statement.ljust(COMMENT_COLUMN - 2)}  # {comment}"


def finding_snippet(target: Target, device: str, program: dict, headline: str, detail: str) -> str:
    """The standalone snippet of a finding's minimal `program` ({"config", "calls"})."""
    outcomes = target_outcomes(target, device, program)
    references = reference_steps(program)[1:]
    calls = program["calls"]
    body = []
    suppressed = False
    for index, (entry, reference) in enumerate(zip(calls, references)):
        outcome = outcomes[index] if index < len(outcomes) else None
        statement = call_source(entry, receiver="a", cpu="t" if device == "cpu" else "cpu")
        comment = _describe(entry, outcome, reference)
        if outcome is not None and outcome.error and index < len(calls) - 1:
            suppressed = True
            body.append(_with_comment("with suppress(Exception):", comment))
            body.append(f"    {statement}")
        else:
            body.append(_with_comment(statement, comment))
    imports, factory = factory_source(target)
    config = ", ".join(f"{key}={value!r}" for key, value in program["config"].items())
    lines = [f"# {headline}", *(["from contextlib import suppress", ""] if suppressed else []), "import torch", ""]
    lines += [*imports, ""]
    lines += [f"make_allocator = {factory}", "", ""]
    lines += ["def t(values):", f"    return torch.tensor(values, dtype=torch.int64, device={device!r})", "", ""]
    if device != "cpu":
        lines += ["def cpu(values):", "    return torch.tensor(values, dtype=torch.int64)", "", ""]
    lines += [f"a = make_allocator(AllocatorConfig({config}, device={device!r}))", *body]
    lines += [f"# {line}" for line in textwrap.wrap(f"then: {detail}", 96)]
    return "\n".join(lines) + "\n"


def snippet_of(finding: Finding, target: Target, device: str) -> str:
    """`finding`'s snippet (a comment saying why, if its program cannot be replayed)."""
    if finding.calls is None:
        return ""
    headline = f"swa-canary finding: {finding.severity} {finding.invariant} at {finding.call} ({target.name})"
    try:
        return finding_snippet(target, device, finding.calls, headline, finding.detail)
    except Exception as error:  # the finding stands without its snippet
        return f"# no snippet: {type(error).__name__}: {error}\n"
