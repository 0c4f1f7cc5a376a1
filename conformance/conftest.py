"""Collects the conformance outcomes and prints them as tables at the end of the run.

Each conformance test is tagged at collection with its cell ``(table, row, backend, check)``
in ``item.user_properties``, which travels with the test's reports (also to an xdist
controller); a check also records what it measured (``odecore_measurements``: one entry per
comparison, its worst relative error and the bound there). ``pytest_runtest_logreport``
records both, and ``pytest_terminal_summary`` prints, per test module:

- the grid: a row per variant and backend, a column per check, each cell PASS, FAIL[n],
  SKIP[n] or ERROR[n], with the reasons as numbered notes below. A backend whose every cell
  is skipped for one reason (not installed) gets a single line;
- the agreement: per backend, method family, dtype and mode, the worst measured disagreement with
  the reference and with the other backends, as ``relative error / bound`` at the worst
  element (the element with the largest ratio of the two), and where it was.

The terminal summary is printed with ``-q`` too, and in CI logs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest

# The numba backend keeps compiled kernels on disk (adapters/numba_cache.py); a test run
# keeps its own, apart from the user's cache and from other runs, and removes it at exit. The
# first conftest to load makes it; a run of tests/ and conformance/ together shares it.
if "ODECORE_CACHE_DIR" not in os.environ:
    os.environ["ODECORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="odecore-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ODECORE_CACHE_DIR"], ignore_errors=True)

_CELL_KEY = "odecore_conformance_cell"
_MEASUREMENTS_KEY = "odecore_measurements"
_PARAMS = ("variant", "backend_name", "check")


@dataclass
class _Table:
    rows: list[str] = field(default_factory=list)  # variant ids, in collection order
    backends: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    # (backend, family, dtype, column, kind) -> [error / bound, error, bound, where, count]
    worst: dict[tuple[str, str, str, str], list] = field(default_factory=dict)


_tables: dict[str, _Table] = {}


def _remember(seq: list[str], value: str) -> None:
    if value not in seq:
        seq.append(value)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or not all(p in callspec.params for p in _PARAMS):
            continue
        title = getattr(item.module, "SUMMARY_TITLE", item.module.__name__)
        cell = (title, callspec.params["variant"].id, callspec.params["backend_name"])
        item.user_properties.append((_CELL_KEY, (*cell, callspec.params["check"])))
        _place(*cell, callspec.params["check"])


def _place(title: str, row: str, backend: str, check: str) -> _Table:
    table = _tables.setdefault(title, _Table())
    _remember(table.rows, row)
    _remember(table.backends, backend)
    _remember(table.checks, check)
    return table


def _reason(report) -> str:
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return crash.message.splitlines()[0] if crash.message else ""
    text = str(longrepr).strip().splitlines()
    return text[-1] if text else ""


def pytest_runtest_logreport(report) -> None:
    properties = dict(report.user_properties)
    cell = properties.get(_CELL_KEY)
    if cell is None:
        return
    title, row, backend, check = cell  # xdist serializes tuples as lists
    table = _place(title, row, backend, check)
    key = (row, backend, check)
    if report.when == "call":
        outcome = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
        table.cells[key] = (outcome, "" if report.passed else _reason(report))
        for measurement in properties.get(_MEASUREMENTS_KEY, ()):
            _keep_worst(table, backend, row, *measurement)
    elif report.when == "setup" and not report.passed:
        outcome = "SKIP" if report.skipped else "ERROR"
        table.cells[key] = (outcome, _reason(report))
    elif report.when == "teardown" and report.failed:
        table.cells[key] = ("ERROR", _reason(report))


def _keep_worst(table, backend, row, kind, column, family, dtype, error, bound, where) -> None:
    ratio = error / bound if bound > 0 else (0.0 if error == 0 else float("inf"))
    key = (backend, family, dtype, column, kind)
    entry = table.worst.setdefault(key, [-1.0, 0.0, 0.0, "", 0])
    entry[4] += 1
    if ratio > entry[0]:
        entry[:4] = [ratio, error, bound, f"{row} {where}"]


class _Notes:
    """Numbered notes; an identical skip reason shares one number."""

    def __init__(self):
        self.lines: list[str] = []
        self._by_text: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self._by_text:
            self.lines.append(text)
            self._by_text[text] = len(self.lines)
        return self._by_text[text]


def _format(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)]


def render_grid(table: _Table) -> list[str]:
    if not table.cells:
        return []
    notes = _Notes()
    rows, checks = table.rows, table.checks
    lines: list[list[str]] = []
    collapsed: list[str] = []
    counts: dict[str, int] = {}
    for outcome, _ in table.cells.values():
        counts[outcome] = counts.get(outcome, 0) + 1

    for backend in table.backends:
        cells = {
            (r, c): table.cells[(r, backend, c)]
            for r in rows
            for c in checks
            if (r, backend, c) in table.cells
        }
        if not cells:
            continue
        distinct = set(cells.values())
        if len(distinct) == 1 and next(iter(distinct))[0] in ("SKIP", "FAIL"):
            outcome, reason = next(iter(distinct))
            n = notes.add(reason if outcome == "SKIP" else f"FAIL on {backend}: {reason}")
            collapsed.append(f"{backend}: every variant and check {outcome}[{n}]")
            continue
        for row in rows:
            if not any((row, check) in cells for check in checks):
                continue  # deselected (-k, -m) or not run
            line = [row, backend]
            for check in checks:
                outcome, reason = cells.get((row, check), ("-", ""))
                if outcome in ("PASS", "-"):
                    line.append(outcome)
                elif outcome == "SKIP":
                    line.append(f"SKIP[{notes.add(reason)}]")
                else:
                    n = notes.add(f"{outcome} {row} on {backend}, {check}: {reason}")
                    line.append(f"{outcome}[{n}]")
            lines.append(line)

    out = _format(["variant", "backend", *checks], lines) + collapsed
    out.append("")
    out.append("totals: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)))
    if notes.lines:
        out.append("notes:")
        out += [f"  [{i}] {text}" for i, text in enumerate(notes.lines, start=1)]
    return out


def render_agreement(table: _Table) -> list[str]:
    """Per backend, family and column: the worst measured disagreement, against the
    reference and against the other backends."""
    if not table.worst:
        return []
    keys = sorted(
        {key[:4] for key in table.worst},
        key=lambda k: (table.backends.index(k[0]) if k[0] in table.backends else 99, *k[1:]),
    )
    lines = []
    for key in keys:
        line = list(key)
        for kind in ("reference", "cross"):
            entry = table.worst.get((*key, kind))
            if entry is None:
                line += ["-", "", ""]
                continue
            _, error, bound, where, count = entry
            line += [f"{error:.1e} / {bound:.1e}", str(count), where]
        lines.append(line)
    header = ["backend", "family", "dtype", "mode", "vs reference", "n", "worst at"]
    header += ["vs other backends", "n", "worst at"]
    intro = [
        "worst measured disagreement: relative error / bound at the worst element, over n "
        "comparisons (each of y0, every parameter and t is one comparison per pair)",
    ]
    return intro + _format(header, lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    for title, table in _tables.items():
        grid = render_grid(table)
        if not grid:
            continue
        terminalreporter.section(f"odecore conformance: {title}", sep="=")
        for line in grid:
            terminalreporter.write_line(line)
        agreement = render_agreement(table)
        if agreement:
            terminalreporter.write_line("")
            for line in agreement:
                terminalreporter.write_line(line)
