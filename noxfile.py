"""Test, lint and benchmark sessions for odecore.

    nox -s ci                          the whole CI run (what .ci/run does)
    nox -s tests                       unit tests, once per backend
    nox -s "tests(backend='torch')"    unit tests of one backend, with its extra installed
    nox -s conformance                 the cross-backend suite and its summary table
    nox -s lint                        ruff check + ruff format --check
    nox -s docs                        the documentation site, mkdocs build --strict (into site/)
    nox -s gpu                         the cupy rows of tests and conformance (needs a GPU)
    nox -s bench                       benchmarks/bench_numpy.py
    nox -s bench -- benchmarks/bench_numpy.py --repeat 3   scripts and their arguments

Every install goes through constraints.txt, which pins torch to the CPU build.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests", "conformance"]

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", "constraints.txt")

# Adding a backend is one line here: its name is also the name of its pip extra
# (pyproject.toml) and of the module that proves it is installed.
BACKENDS = ["numpy", "torch", "jax", "numba"]

# Backends that need a GPU: not among BACKENDS, whose sessions run on any machine, nor in CI
# (which has none). The ``gpu`` session runs their rows.
GPU_BACKENDS = ["cupy"]

# The backends the CI run must test (a 2-core machine, 90 minutes in all). torch comes from
# constraints.txt's CPU wheel; jax and jaxlib are pinned there too (the CPU build is the
# default jaxlib wheel). The conformance suite fails, naming it, when one of them does not
# install or import, rather than skipping its cells.
CI_BACKENDS = ["numpy", "torch", "jax", "numba"]

# The peer libraries a backend's tests and benchmarks compare odecore with (pinned in
# constraints.txt): the tests check values, gradients and step counts against them, and skip
# with the reason where one is missing. scikit-learn carries the digits data of
# examples/deq_classifier.py, whose test trains it for two epochs.
PEERS = {"torch": ["torchdiffeq", "scikit-learn"], "jax": ["diffrax"], "deq": ["torchdeq"]}

# Optional dependencies (pip extras that are not backends) whose tests run in a backend's
# session: odecore.ensemble's (tests/test_ensemble.py, benchmarks/bench_ensemble.py) run on
# the numba backend and need Dask.
# Where a session installs one, its tests must run: ODECORE_REQUIRED_EXTRAS makes them fail,
# rather than skip, when it does not import.
TEST_EXTRAS = {"numba": ["dask"]}

# Benchmarks named for a topic rather than a backend, and the backends they run on.
BENCH_BACKENDS = {"deq": ["torch"], "ensemble": ["numba"]}

LINT_PATHS = [
    "odecore",
    "adapters",
    "tests",
    "conformance",
    "benchmarks",
    "examples",
    "noxfile.py",
]


def extras_for(*backends: str, base: str = "test") -> str:
    """The pip extras string for a set of backends: numpy needs none beyond the base; the
    optional dependencies their tests and benchmarks use come too."""
    extras = [base, *(b for b in backends if b != "numpy"), *extras_tested_with(*backends)]
    return ",".join(dict.fromkeys(extras))


def extras_tested_with(*backends: str) -> list[str]:
    return [extra for b in backends for extra in TEST_EXTRAS.get(b, [])]


def install_project(session: nox.Session, extras: str, peers_of: tuple[str, ...] = ()) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")
    peers = [peer for backend in peers_of for peer in PEERS.get(backend, [])]
    if peers:
        session.install(*CONSTRAINTS, *peers)


def importable_backends(session: nox.Session, candidates: list[str]) -> list[str]:
    """The candidates whose module imports inside this session's virtualenv."""
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        continue\n"
        "    print(name)\n"
    )
    out = session.run("python", "-c", probe, *candidates, silent=True) or ""
    found = [line.strip() for line in out.splitlines() if line.strip() in candidates]
    return found


def require_tests_executed(session: nox.Session, junit_xml: Path) -> None:
    """Fail when pytest ran nothing: every test deselected or skipped is not a pass.

    pytest itself exits 5 when it collects nothing, and nox already treats that as a failure;
    this also catches a run where everything collected was skipped.
    """
    root = ET.parse(junit_xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    if total - skipped <= 0:
        session.error(f"pytest executed no test ({total} collected, {skipped} skipped)")
    session.log(f"pytest executed {total - skipped} tests ({skipped} skipped)")


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Unit and property tests of one backend: ODECORE_TEST_BACKEND selects it, so the tests
    of the others are left out or skipped, and this backend's tests fail where it does not
    install (tests/conftest.py). Slow tests run too."""
    install_project(session, extras_for(backend), peers_of=(backend,))
    session.run(
        "pytest",
        "tests",
        *session.posargs,
        env={
            "ODECORE_TEST_BACKEND": backend,
            "ODECORE_REQUIRED_EXTRAS": ",".join(extras_tested_with(backend)),
        },
    )


@nox.session
def conformance(session: nox.Session) -> None:
    """The conformance suite over every backend that installs and imports here."""
    if not (ROOT / "conformance").is_dir():
        session.error("there is no conformance/ suite yet")
    install_project(session, extras_for(*BACKENDS))
    available = importable_backends(session, BACKENDS)
    if not available:
        session.error(f"none of the backends {BACKENDS} imports")
    session.log(f"conformance backends: {', '.join(available)}")
    session.run(
        "pytest",
        "conformance",
        "-s",
        *session.posargs,
        env={"ODECORE_CONFORMANCE_BACKENDS": ",".join(available)},
    )


@nox.session
@nox.parametrize("backend", GPU_BACKENDS)
def gpu(session: nox.Session, backend: str) -> None:
    """A GPU backend's rows of the tests and of the conformance suite, on a machine with a
    CUDA device. The backend is required: without a device its rows fail, naming the reason,
    rather than skip. (benchmarks/gpu_check.sh does the same without network access.)"""
    install_project(session, extras_for(backend))
    required = {"ODECORE_REQUIRED_BACKENDS": backend}
    session.run(
        "pytest", "tests", *session.posargs, env={**required, "ODECORE_TEST_BACKEND": backend}
    )
    session.run(
        "pytest",
        "conformance",
        *session.posargs,
        env={**required, "ODECORE_CONFORMANCE_BACKENDS": f"numpy,{backend}"},
    )


@nox.session
def cuda_compile(session: nox.Session) -> None:
    """The GPU ensemble kernels compiled to PTX for a Hopper GPU by numba-cuda, without a
    device (tests/cuda_ptx_run.py): what the device compiler refuses, the simulator cannot
    show. NVVM and NVRTC come from NVIDIA's wheels."""
    install_project(session, extras_for("numba"))
    session.install("numba-cuda", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvcc-cu12")
    session.run(
        "pytest",
        "tests/test_cuda_ensemble.py",
        "-k",
        "compiles_for_a_device",
        "-rs",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check; pass --fix etc. through posargs to ruff check."""
    session.install(*CONSTRAINTS, "ruff")
    paths = [p for p in LINT_PATHS if (ROOT / p).exists()]
    session.run("ruff", "check", *session.posargs, *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with ``mkdocs build --strict``: a broken link,
    a page missing from the nav or an API reference that does not resolve fails it. Pass
    ``serve`` to preview it instead (`nox -s docs -- serve`)."""
    install_project(session, "docs")
    build_docs(session, serve="serve" in session.posargs)


def build_docs(session: nox.Session, serve: bool = False, site_dir: str = "site") -> None:
    # mkdocs-material prints an advertisement for its successor on every build.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if serve:
        session.run("mkdocs", "serve", env=env)
    else:
        session.run("mkdocs", "build", "--strict", "--site-dir", site_dir, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Run benchmark scripts: `nox -s bench -- [benchmarks/bench_X.py ...] [script args]`.

    Arguments ending in .py choose the scripts (default benchmarks/bench_numpy.py); the rest are
    passed to every script. A script named bench_<backend>.py gets that backend's extra and
    peers; bench_<topic>.py gets those of BENCH_BACKENDS[topic] and the topic's own peers.
    """
    scripts = [a for a in session.posargs if a.endswith(".py")]
    script_args = [a for a in session.posargs if not a.endswith(".py")]
    if not scripts:
        scripts = ["benchmarks/bench_numpy.py"]
    for script in scripts:
        if not (ROOT / script).is_file():
            session.error(f"no benchmark script {script}; have: {sorted(_bench_scripts())}")
    named = [Path(s).stem.removeprefix("bench_") for s in scripts]
    backends = [b for b in named if b in BACKENDS]
    backends += [b for n in named for b in BENCH_BACKENDS.get(n, []) if b not in backends]
    install_project(
        session,
        extras_for(*backends, base="bench"),
        peers_of=tuple(dict.fromkeys(backends + named)),
    )
    for script in scripts:
        session.run("python", script, *script_args)


def _bench_scripts() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("bench_*.py")]


@nox.session
def ci(session: nox.Session) -> None:
    """The CI entry point: the documentation site, then tests and conformance (not slow) with
    every CI backend installed; the examples run in their --quick form (tests/test_examples.py).

    One virtualenv and one pytest run (its files spread over the cores), so the 2-core CI
    machine installs each dependency once; the conformance suite compares the CI backends with
    each other in that run.
    """
    install_project(
        session, extras_for(*CI_BACKENDS) + ",examples,docs", peers_of=tuple(CI_BACKENDS)
    )
    # The site first: it takes seconds, and a broken reference should not wait for the tests.
    build_docs(session, site_dir=session.create_tmp() + "/site")
    # A fresh clone has no empty directories: pass pytest only the suites that exist.
    suites = [d for d in ("tests", "conformance") if (ROOT / d).is_dir()]
    junit_xml = Path(session.create_tmp()) / "junit.xml"
    session.run(
        "pytest",
        *suites,
        "-m",
        "not slow",
        # One pytest process per core (pytest-xdist). Each takes whole files, so a file's
        # tests run in order and share what its module keeps (the conformance suite's solves
        # of each backend, compiled kernels), as in one process. Most of the run's time is
        # single-threaded (numba's compiles; the JAX, torch and NumPy loops in Python), so
        # the 2-core CI machine runs it in about half the time.
        "--numprocesses=auto",
        "--maxprocesses=4",
        "--dist=loadfile",
        "--durations=15",
        f"--junitxml={junit_xml}",
        *session.posargs,
        env={
            "ODECORE_CONFORMANCE_BACKENDS": ",".join(CI_BACKENDS),
            "ODECORE_REQUIRED_BACKENDS": ",".join(CI_BACKENDS),
            "ODECORE_REQUIRED_EXTRAS": ",".join([*extras_tested_with(*CI_BACKENDS), "examples"]),
            # Hypothesis picks its built-in "ci" profile (derandomized, no deadline) when CI
            # is set, so a loaded 2-core machine gives no flaky failures.
            "CI": os.environ.get("CI", "true"),
        },
    )
    require_tests_executed(session, junit_xml)
