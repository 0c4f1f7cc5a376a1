"""Every Python block of the documentation runs as written.

A page's blocks run in order in one fresh interpreter (later blocks use earlier names), with
the page's directory of figures and files as a temporary working directory. A fresh process
per page keeps one page's global choices (``set_backend``, JAX's x64 flag, torch's default
dtype) away from the others and from this test session.

A block that cannot run here on purpose (it needs a GPU, a cluster, or is a fragment of a
signature) is preceded by a line ``<!-- not run: why -->``; the reason is required.
A page that imports a library this environment lacks is skipped, naming it, unless the
library is a backend this run requires (``ODECORE_REQUIRED_BACKENDS``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from backend_params import REQUIRED, REQUIRED_EXTRAS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

# A fenced block, and the optional "not run" marker on the line before it.
BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")

# Libraries a page may use that no backend requires; missing, they skip the page.
OPTIONAL = {
    "torch",
    "jax",
    "jaxlib",
    "numba",
    "cupy",
    "dask",
    "distributed",
    "diffrax",
    "torchdiffeq",
    "torchdeq",
    "scipy",
    "sklearn",
    "matplotlib",
    "tqdm",
}

# The pip extra that brings a library which is not a backend: a run that requires the extra
# (ODECORE_REQUIRED_EXTRAS) fails rather than skips a page that needs it.
EXTRA_OF = {
    "matplotlib": "examples",
    "tqdm": "examples",
    "sklearn": "examples",
    "dask": "dask",
    "distributed": "dask",
}

# Generous: a page's blocks are short solves, but a loaded 2-core machine compiles JAX and
# Numba functions slowly.
TIMEOUT_S = 600


def runnable_blocks(page: Path) -> list[str]:
    blocks = []
    for match in BLOCK.finditer(page.read_text()):
        why = match.group("why")
        if why is None:
            blocks.append(match.group("code"))
        elif not why.strip():
            raise AssertionError(f"{page}: a 'not run' marker must say why")
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if runnable_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs(page: Path, tmp_path: Path) -> None:
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(runnable_blocks(page)))
    env = {
        **os.environ,
        # Figures a page saves must not open windows; one thread keeps a 2-core machine
        # usable for the rest of the suite.
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if run.returncode != 0:
        missing = MISSING.search(run.stderr)
        if missing:
            top = missing.group(1).split(".")[0]
            required = top in REQUIRED or EXTRA_OF.get(top) in REQUIRED_EXTRAS
            if top in OPTIONAL and not required:
                pytest.skip(f"{page.relative_to(ROOT)} uses {top}, which is not installed")
        pytest.fail(f"{page.relative_to(ROOT)}'s code failed:\n{run.stderr[-4000:]}")


EXCERPT = re.compile(r"an excerpt of (examples/[\w/]+\.py)")


def test_not_run_blocks_are_rare() -> None:
    """Most examples must run: a page whose every block is marked 'not run' shows code
    nothing checks. Excerpts of the example scripts (which tests/test_example*.py run) are
    checked against their script instead, by test_excerpts_are_in_their_scripts."""
    for page in PAGES:
        reasons = [m.group("why") for m in BLOCK.finditer(page.read_text())]
        marked = [why for why in reasons if why is not None and not EXCERPT.match(why)]
        assert len(marked) <= max(1, len(reasons) // 2), (
            f"{page}: {len(marked)} of {len(reasons)} blocks are not run"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_excerpts_are_in_their_scripts(page: Path) -> None:
    """A block shown as an excerpt of an example script says what the script does: each of
    its lines is in the script (layout aside: a call may be wrapped differently), so the page
    cannot drift from the code that CI runs."""
    for match in BLOCK.finditer(page.read_text()):
        excerpt = EXCERPT.match(match.group("why") or "")
        if not excerpt:
            continue
        script = ROOT / excerpt.group(1)
        assert script.is_file(), f"{page}: {excerpt.group(1)} does not exist"
        code = _without_layout(script.read_text())
        shown = [line.strip() for line in match.group("code").splitlines()]
        missing = [
            line
            for line in shown
            if line and line != "..." and _without_layout(line).rstrip(",") not in code
        ]
        assert not missing, f"{page}: lines not in {excerpt.group(1)}: {missing}"


def _without_layout(code: str) -> str:
    # The formatter's choices: whitespace, and a trailing comma where a call is wrapped.
    return re.sub(r"\s+", "", code).replace(",)", ")")
