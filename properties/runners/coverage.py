"""`check --coverage`: which lines and branches of the target's own allocator source a check ran.

The measured files are those that define the classes of a built allocator and of its two
pools, with their bases (for sglang: the SWA allocator's module, the token and paged allocators',
their base's), read from a small allocator of each page size the target takes. Functions that
those classes call in other modules (e.g. sglang's paging kernels) are not measured.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from properties.targets import AllocatorConfig, Target, TargetError


@dataclass
class FileCoverage:
    path: str
    percent: float
    """Lines and branches together, as coverage.py counts them."""
    missing_lines: str
    """Line ranges never executed, e.g. "12-14, 40"."""
    missing_branches: str
    """Branches never taken, as "line->target" (-1: leaving the function)."""


@dataclass
class CoverageReport:
    percent: float = 0.0
    lines: tuple[int, int] = (0, 0)
    """(executed, total) statements."""
    branches: tuple[int, int] = (0, 0)
    """(taken, total) branches."""
    files: list[FileCoverage] = field(default_factory=list)

    def explain(self) -> str:
        head = (
            f"coverage of the target's allocator source: {self.percent:.1f}% "
            f"(lines {self.lines[0]}/{self.lines[1]}, branches {self.branches[0]}/{self.branches[1]})"
        )
        body = [
            f"  {f.path}: {f.percent:.1f}%\n    lines never run: {f.missing_lines or '-'}\n"
            f"    branches never taken: {f.missing_branches or '-'}"
            for f in self.files
        ]
        return "\n".join([head, *body])


def allocator_source_files(target: Target) -> list[str]:
    """The source files of the classes of the target's allocator and its two pools."""
    page_sizes = (1, 2) if target.capabilities.paged else (1,)
    files: set[str] = set()
    for page_size in page_sizes:
        need_sort = not target.capabilities.unsorted_frees
        allocator = target.factory(AllocatorConfig(size=8, size_swa=8, page_size=page_size, need_sort=need_sort))
        for part in (allocator, allocator.full_attn_allocator, allocator.swa_attn_allocator):
            for cls in type(part).__mro__:
                path = _source_file(cls)
                if path is not None:
                    files.add(path)
    return sorted(files)


def _source_file(cls: type) -> str | None:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None
    # abc, typing and friends are not the target's own source.
    if path is None or os.path.dirname(path) == os.path.dirname(inspect.__file__):
        return None
    return os.path.realpath(path)


@contextlib.contextmanager
def measured(files: list[str]) -> Iterator[CoverageReport]:
    """Measure line and branch coverage of `files` while the block runs; the yielded report is
    filled in when it ends."""
    try:
        import coverage
    except ImportError as error:
        raise TargetError("--coverage needs coverage.py (pip install coverage)") from error
    report = CoverageReport()
    measurer = coverage.Coverage(branch=True, include=files, data_file=None)
    measurer.start()
    try:
        yield report
    finally:
        measurer.stop()
        # The files were imported before measuring began: their import-time statements ran.
        # Recorded as entries into each line (arc -1 -> line), which no branch counts.
        measurer.get_data().add_arcs(
            {path: [(-1, line) for line in sorted(_import_time_lines(path))] for path in files}
        )
        _fill(report, measurer)


def _import_time_lines(path: str) -> set[int]:
    """First lines of the statements a module runs when imported: its top-level statements
    and class bodies (with decorators), not function bodies or unexecuted branches."""
    lines: set[int] = set()
    pending = list(ast.parse(open(path).read()).body)
    while pending:
        node = pending.pop()
        lines.add(node.lineno)
        lines.update(decorator.lineno for decorator in getattr(node, "decorator_list", ()))
        if isinstance(node, ast.ClassDef):
            pending.extend(node.body)
    return lines


def _fill(report: CoverageReport, measurer: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "coverage.json")
        measurer.json_report(outfile=path, show_contexts=False)
        data = json.load(open(path))
    totals = data["totals"]
    report.percent = totals["percent_covered"]
    report.lines = (totals["covered_lines"], totals["num_statements"])
    report.branches = (totals["covered_branches"], totals["num_branches"])
    report.files = [
        FileCoverage(
            path,
            entry["summary"]["percent_covered"],
            _ranges(entry["missing_lines"]),
            ", ".join(f"{a}->{b}" for a, b in entry.get("missing_branches", [])),
        )
        for path, entry in sorted(data["files"].items())
    ]


def _ranges(lines: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans: list[list[int]] = []
    for line in sorted(lines):
        if spans and line == spans[-1][1] + 1:
            spans[-1][1] = line
        else:
            spans.append([line, line])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
