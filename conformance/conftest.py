"""Collects the conformance outcomes and prints them as one table at the end of the run.

Each conformance test is tagged at collection with its cell ``(case/method, backend, check)``
in ``item.user_properties``, which travels with the test's reports (also to an xdist
controller). ``pytest_runtest_logreport`` records the outcome of every report it sees, and
``pytest_terminal_summary`` prints the table: a row per case and backend, a column per check,
each cell PASS, FAIL[n], SKIP[n] or ERROR[n], with the reasons as numbered notes below. A
backend whose every cell is skipped for one reason (not installed) gets a single line.
The terminal summary is printed with ``-q`` too, and in CI logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

_CELL_KEY = "odecore_conformance_cell"
_PARAMS = ("variant", "backend_name", "check")


@dataclass
class _Results:
    rows: list[str] = field(default_factory=list)  # case/method ids, in collection order
    backends: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)


_results = _Results()


def _remember(seq: list[str], value: str) -> None:
    if value not in seq:
        seq.append(value)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or not all(p in callspec.params for p in _PARAMS):
            continue
        row = callspec.params["variant"].id
        backend = callspec.params["backend_name"]
        check = callspec.params["check"]
        item.user_properties.append((_CELL_KEY, (row, backend, check)))
        _remember(_results.rows, row)
        _remember(_results.backends, backend)
        _remember(_results.checks, check)


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
    cell = dict(report.user_properties).get(_CELL_KEY)
    if cell is None:
        return
    row, backend, check = cell
    if isinstance(cell, list):  # xdist serializes tuples as lists
        cell = tuple(cell)
    for seq, value in ((_results.rows, row), (_results.backends, backend)):
        _remember(seq, value)
    _remember(_results.checks, check)
    if report.when == "call":
        outcome = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
        _results.cells[cell] = (outcome, "" if report.passed else _reason(report))
    elif report.when == "setup" and not report.passed:
        outcome = "SKIP" if report.skipped else "ERROR"
        _results.cells[cell] = (outcome, _reason(report))
    elif report.when == "teardown" and report.failed:
        _results.cells[cell] = ("ERROR", _reason(report))


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


def render_table(results: _Results) -> list[str]:
    if not results.cells:
        return []
    notes = _Notes()
    rows, checks = results.rows, results.checks
    lines: list[list[str]] = []
    collapsed: list[str] = []
    counts: dict[str, int] = {}
    for outcome, _ in results.cells.values():
        counts[outcome] = counts.get(outcome, 0) + 1

    for backend in results.backends:
        cells = {
            (r, c): results.cells[(r, backend, c)]
            for r in rows
            for c in checks
            if (r, backend, c) in results.cells
        }
        if not cells:
            continue
        distinct = set(cells.values())
        if len(distinct) == 1 and next(iter(distinct))[0] == "SKIP":
            n = notes.add(next(iter(distinct))[1])
            collapsed.append(f"{backend}: every case and check SKIP[{n}]")
            continue
        for row in rows:
            if not any((row, check) in cells for check in checks):
                continue  # deselected (-k) or not run
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

    header = ["case/method", "backend", *checks]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    out += collapsed
    out.append("")
    out.append("totals: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)))
    if notes.lines:
        out.append("notes:")
        out += [f"  [{i}] {text}" for i, text in enumerate(notes.lines, start=1)]
    return out


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    lines = render_table(_results)
    if not lines:
        return
    terminalreporter.section("odecore conformance", sep="=")
    for line in lines:
        terminalreporter.write_line(line)
