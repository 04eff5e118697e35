"""A finding as a directory: report.json and a standalone pytest file that replays it.

The pytest file makes the minimal program's allocator calls one by one, with plain tensors
and no Hypothesis. After each call it compares the allocator with what the reference
allocator did on the same call at export time (returned indices, pool sizes, mapping, free
lists, free-group state, translation), all embedded as literals, and runs the model-free
probes. So it fails on the allocator that made the finding and passes on the reference; the
export checks both and records the outcome in report.json.

A finding directory is written complete or not at all: files are fsynced in a scratch
directory that is then renamed into place. The name is the finding's id, made from its
identity (invariant, call, shape of the detail: properties/machines/masking.py), so the rename
also deduplicates, across programs, workers and campaigns. `program.py` holds the minimal
program as plain allocator calls.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from allocator import SWATokenToKVPoolAllocator
from allocator.free_list import FreeListAllocator
from allocator.interface import CPU_ARGS, TENSOR_ARGS
from canary.invariants import Name
from properties.machines.driver import AllocatorDriver
from properties.machines.masking import FindingKey
from properties.targets import AllocatorConfig, Factory, Target, reference_factory
from properties.usage import current_umask

if TYPE_CHECKING:  # check.py builds snippets from this module's replay
    from properties.runners.check import Finding

REPORT_NAME = "report.json"
SNIPPET_NAME = "program.py"
"""The minimal program as plain allocator calls (properties/runners/snippet.py)."""


def finding_id(key: FindingKey) -> str:
    """A finding's identity (invariant, call, shape of the detail: properties/machines/masking.py)
    as a directory name: the same bug found by another program or worker gets the same one."""
    return f"{key[0].lower()}-{hashlib.sha256(chr(10).join(key).encode()).hexdigest()[:10]}"


def test_file_name(identifier: str) -> str:
    return f"test_{identifier.replace('-', '_')}.py"


# ------------------------------------------------------------ literals
def render_indices(values: list[int]) -> str:
    """A list literal; ascending runs of four or more become `*range(a, b)`."""
    parts, start = [], 0
    while start < len(values):
        end = start + 1
        while end < len(values) and values[end] == values[end - 1] + 1:
            end += 1
        if end - start >= 4:
            parts.append(f"*range({values[start]}, {values[end - 1] + 1})")
        else:
            parts.extend(str(value) for value in values[start:end])
        start = end
    return f"[{', '.join(parts)}]"


def mapping_runs(mapping: torch.Tensor) -> list[tuple[int, int, int]]:
    """The nonzero entries (sentinel aside) as runs (first full slot, first SWA slot, length)."""
    body = mapping[:-1].cpu()
    runs: list[list[int]] = []
    for full in torch.nonzero(body).flatten().tolist():
        swa = int(body[full])
        if runs and runs[-1][0] + runs[-1][2] == full and runs[-1][1] + runs[-1][2] == swa:
            runs[-1][2] += 1
        else:
            runs.append([full, swa, 1])
    return [(full, swa, length) for full, swa, length in runs]


def call_source(entry: dict, receiver: str = "allocator", cpu: str = "cpu") -> str:
    """The Python of one logged call (golden-trace arguments) on `receiver`: index lists as
    `t([...])` on the device, and as `cpu([...])` (named `cpu`) where the call wants them on
    the host."""
    name, args = entry["call"], entry["args"]
    if name == "backup_state":
        return f"backup_{args[0]} = {receiver}.backup_state()"
    if name == "restore_state":
        return f"{receiver}.restore_state(backup_{args[0]})"
    rendered = []
    for position, value in enumerate(args):
        if position in CPU_ARGS.get(name, ()):
            rendered.append(f"{cpu}({render_indices(value)})")
        elif position in TENSOR_ARGS.get(name, ()):
            rendered.append(f"t({render_indices(value)})")
        else:
            rendered.append(repr(value))
    return f"{receiver}.{name}({', '.join(rendered)})"


# ------------------------------------------------------------ the reference's answers
CONSTRUCTION: dict[str, Any] = {"call": "__init__", "args": []}


@dataclass(frozen=True)
class ReferenceStep:
    """One call of the program and the reference allocator's state right after it."""

    entry: dict[str, Any]
    """The logged call; CONSTRUCTION for the state after construction."""
    raised: bool
    expected: dict


def reference_state(allocator: SWATokenToKVPoolAllocator, result: torch.Tensor | None) -> dict[str, Any]:
    def free_list(pool: FreeListAllocator) -> tuple[list[int], list[int]]:
        return pool.free_pages.tolist(), sorted(pool.release_pages.tolist())

    return {
        "result": None if result is None else result.cpu().tolist(),
        "sizes": (allocator.full_available_size(), allocator.swa_available_size(), allocator.available_size()),
        "mapping": mapping_runs(allocator.full_to_swa_index_mapping),
        "full_free": free_list(allocator.full_attn_allocator),
        "swa_free": free_list(allocator.swa_attn_allocator),
        "group": allocator.in_free_group,
    }


def reference_steps(program: dict) -> list[ReferenceStep]:
    """Run the program on the reference allocator (CPU) and record its state after each call."""
    reference = reference_factory(AllocatorConfig(device="cpu", **program["config"]))
    driver = AllocatorDriver(reference, "cpu")
    steps = [ReferenceStep(CONSTRUCTION, False, reference_state(reference, None))]
    for entry in program["calls"]:
        try:
            result = driver.call(entry["call"], *entry["args"])
        except Exception:  # the reference rejects the call: the test expects an error too
            steps.append(ReferenceStep(entry, True, reference_state(reference, None)))
        else:
            steps.append(ReferenceStep(entry, False, reference_state(reference, result)))
    return steps


# ------------------------------------------------------------ the pytest file
_HEADER = '''"""swa-canary finding {id}: {severity} {invariant} in {machine}.

Target {target} on {device}, seed {seed}, found {via} after {seconds:.1f}s.
{detail}

The minimal program, as the state machine printed it:

{program}

This file replays it with plain allocator calls. After every call it compares the allocator
with what the reference allocator did at export time and runs the model-free probes, so it
fails on the allocator that made the finding and passes on the reference. SWA_TARGET
(reference, sglang or module:factory) and SWA_DEVICE (cpu, cuda) run it on another one.
"""

from __future__ import annotations

import os

import pytest
import torch

from canary.probes import AllocatorView, run_probes
from properties.compare import AllocatorState, FreeList, dense_mapping, differences, read_state
from properties.targets import AllocatorConfig, resolve_target

TARGET = {target!r}
DEVICE = {device!r}
CONFIG = {config!r}


def check(allocator, out, step, *, result, sizes, mapping, full_free, swa_free, group):
    """The allocator after `step` against the reference: `mapping` lists runs (first full
    slot, first SWA slot, length) of nonzero entries; a free list is (ready units in order,
    staged units in any order); `sizes` is (full, SWA, available)."""
    problems = [violation.explain() for violation in run_probes(AllocatorView.of(allocator)).read()]
    pairs = [(full + k, swa + k) for full, swa, length in mapping for k in range(length)]
    mapping_len = CONFIG["size"] + CONFIG["page_size"] + 1
    expected = AllocatorState(result, sizes, dense_mapping(mapping_len, pairs), FreeList(*full_free),
                              FreeList(*swa_free), group)
    actual = read_state(allocator, out)
    problems += differences(actual, expected)
    every = torch.arange(-1, len(actual.mapping) - 1, device=allocator.full_to_swa_index_mapping.device)
    if allocator.translate_loc_from_full_to_swa(every).cpu().tolist() != [-1] + actual.mapping[:-1]:
        problems.append("translate_loc_from_full_to_swa(x) != mapping[x]")
    assert not problems, f"after {{step}}:\\n  " + "\\n  ".join(problems)


def replay(make_allocator, device):
    """The minimal program on the allocator `make_allocator(config)` builds."""

    def t(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    def cpu(values):
        return torch.tensor(values, dtype=torch.int64)

    allocator = make_allocator(AllocatorConfig(device=device, **CONFIG))
'''

_TEST = '''

def {test_name}():
    replay(resolve_target(os.environ.get("SWA_TARGET", TARGET)).factory, os.environ.get("SWA_DEVICE", DEVICE))
'''


def _docstring_safe(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"""', "'''")


def _check_source(step: ReferenceStep, label: str, out: str) -> str:
    expected = step.expected
    result = "None" if expected["result"] is None else render_indices(expected["result"])
    full_ready, full_staged = expected["full_free"]
    swa_ready, swa_staged = expected["swa_free"]
    return (
        f"    check(allocator, {out}, {label!r}, result={result}, sizes={expected['sizes']!r},\n"
        f"          mapping={expected['mapping']!r},\n"
        f"          full_free=({render_indices(full_ready)}, {render_indices(full_staged)}),\n"
        f"          swa_free=({render_indices(swa_ready)}, {render_indices(swa_staged)}), "
        f"group={expected['group']!r})\n"
    )


def regression_source(identifier: str, report: dict, steps: list[ReferenceStep]) -> str:
    """The standalone pytest file of a finding."""
    program = "\n".join(f"    {line}" for line in report["program"].splitlines())
    header = _HEADER.format(
        id=identifier,
        severity=report["severity"],
        invariant=report["invariant"],
        machine=report["machine"],
        target=report["target"],
        device=report["device"],
        seed=report["seed"],
        via="replaying the example database" if report["found_via"] == "database" else "by search",
        seconds=report["seconds"],
        detail=_docstring_safe(report["detail"]),
        program=_docstring_safe(program),
        config=report["calls"]["config"],
    )
    body = [_check_source(steps[0], "construction", "None")]
    for number, step in enumerate(steps[1:], 1):
        statement = call_source(step.entry)
        label = f"#{number} {step.entry['call']}"
        if step.raised:
            body.append(f"    with pytest.raises(Exception):\n        {statement}\n")
            body.append(_check_source(step, label + " (must raise)", "None"))
        elif step.entry["call"] not in ("backup_state", "restore_state"):
            body.append(f"    out = {statement}\n")
            body.append(_check_source(step, label, "out"))
        else:
            body.append(f"    {statement}\n")
            body.append(_check_source(step, label, "None"))
    return header + "".join(body) + _TEST.format(test_name=f"test_{identifier.replace('-', '_')}")


def run_regression(source: str, filename: str, factory: Factory, device: str) -> str | None:
    """Run an exported file's replay in this process on `factory`; None if it passes, else
    what went wrong."""
    namespace: dict[str, Any] = {"__name__": f"swa_canary_finding_{Path(filename).stem}"}
    exec(compile(source, filename, "exec"), namespace)
    try:
        namespace["replay"](factory, device)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # an assertion, pytest.raises' Failed (a BaseException), the allocator raising
        return f"{type(error).__name__}: {error}"
    return None


# ------------------------------------------------------------ writing
def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_finding_directory(findings_dir: Path, identifier: str, files: dict[str, str]) -> Path | None:
    """Write `files` into findings_dir/identifier, durably and atomically. None if that finding
    is already there (written by anyone, before or concurrently)."""
    findings_dir.mkdir(parents=True, exist_ok=True)
    final = findings_dir / identifier
    if final.exists():
        return None
    scratch = Path(tempfile.mkdtemp(prefix=f".{identifier}-", dir=findings_dir))
    try:
        os.chmod(scratch, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a finding is shared like any directory
        for name, text in files.items():
            _write_synced(scratch / name, text)
        _sync_directory(scratch)
        os.rename(scratch, final)
    except OSError as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return None
        raise
    _sync_directory(findings_dir)
    return final


@dataclass(frozen=True)
class Export:
    identifier: str
    path: Path | None
    """None: the finding was already on disk."""
    report: dict


def finding_kind(finding: Finding) -> str:
    return "error" if finding.invariant in (Name.CRASH, Name.HANG) else "violation"


def export_finding(
    findings_dir: Path, finding: Finding, target: Target, device: str, found_via: str, **context: Any
) -> Export:
    """Write a shrunk finding: report.json and its pytest file, after checking that the file
    fails on the target and passes on the reference. `context` goes into the report."""
    program = finding.calls or {"config": {}, "calls": []}
    identifier = finding_id(finding.key)
    report = {
        "id": identifier,
        "kind": finding_kind(finding),
        "target": target.name,
        "device": device,
        "found_via": found_via,
        **asdict(finding),
        **context,
    }
    if (findings_dir / identifier).exists():
        return Export(identifier, None, report)
    name = test_file_name(identifier)
    source = regression_source(identifier, report, reference_steps(program))
    on_target = run_regression(source, name, target.factory, device)
    on_reference = run_regression(source, name, reference_factory, "cpu")
    report.update(test=name, fails_on_target=on_target is not None, target_failure=on_target,
                  passes_on_reference=on_reference is None, reference_failure=on_reference)
    files = {REPORT_NAME: json.dumps(report, indent=2) + "\n", name: source}
    if finding.snippet:
        files[SNIPPET_NAME] = finding.snippet
    return Export(identifier, write_finding_directory(findings_dir, identifier, files), report)


def write_crash(findings_dir: Path, report: dict) -> Path | None:
    """A worker process died: its report alone (there is no program to export)."""
    return write_finding_directory(findings_dir, report["id"], {REPORT_NAME: json.dumps(report, indent=2) + "\n"})


def load_report(directory: Path) -> dict:
    with open(directory / REPORT_NAME) as report:
        return json.load(report)


def exported_findings(findings_dir: Path) -> list[Path]:
    """Every complete finding directory (scratch directories start with a dot)."""
    if not findings_dir.is_dir():
        return []
    return sorted(
        path for path in findings_dir.iterdir() if not path.name.startswith(".") and (path / REPORT_NAME).is_file()
    )

