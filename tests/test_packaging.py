"""Packaging checks: the wheel installs and imports on its own, and `import odecore` stays light.

The wheel test builds from a copy of the source tree (so a stale build/ directory or a concurrent
build cannot leak into it), installs the wheel into a fresh virtualenv, and imports it from an
empty directory, so that neither the source tree nor an editable install can answer the import.
The wheel's dependencies (NumPy, array-api-compat, array-api-extra) are borrowed from the running
environment through a .pth file, so the test needs no network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "numba")
RUNTIME_DEPENDENCIES = ("numpy", "array_api_compat", "array_api_extra")

# Everything the wheel build does not need; keeps the copy small and the build hermetic.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".nox",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "tests",
    "conformance",
    "benchmarks",
    "docs",
)


def clean_env() -> dict[str, str]:
    """The environment minus anything that would put other code on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(cmd: list[str | os.PathLike], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        **kwargs,
    )
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc


def has_distribution(name: str, minimum_major: int = 0) -> bool:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return int(version.split(".")[0]) >= minimum_major


def build_wheel(source: Path, outdir: Path) -> Path:
    # Without isolation when the build backend is already here: no network, and seconds faster.
    offline = has_distribution("setuptools", 69) and has_distribution("wheel")
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", outdir]
        if offline:
            cmd.append("--no-isolation")
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", outdir, "."]
        if offline:
            cmd.append("--no-build-isolation")
    run(cmd, cwd=source)
    wheels = list(outdir.glob("odecore-*.whl"))
    assert len(wheels) == 1, f"expected one odecore wheel in {outdir}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel-build")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    return build_wheel(source, work / "dist")


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel, with the runtime dependencies borrowed read-only."""
    venv_dir = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", venv_dir], cwd=venv_dir.parent)
    python = venv_python(venv_dir)
    purelib = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=venv_dir,
        ).stdout.strip()
    )
    # Lines of a .pth file only extend sys.path: the .pth files (editable-install finders) in
    # those directories are not run, so an editable odecore outside cannot answer the import.
    borrowed = sorted({str(dependency_dir(name)) for name in RUNTIME_DEPENDENCIES})
    (purelib / "_odecore_test_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=venv_dir)
    return venv_dir


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def dependency_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} must be installed to run this test"
    return Path(spec.origin).resolve().parent.parent


def test_wheel_contains_the_package_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "odecore/__init__.py" in names
    assert "odecore/adapters/numpy.py" in names, "adapters/ must be installed as odecore.adapters"
    assert "odecore/py.typed" in names, (
        "the PEP 561 marker must ship, or type checkers ignore odecore"
    )
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"odecore"}, f"unexpected top-level entries in the wheel: {top_level}"


def test_wheel_metadata_requires_no_framework(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        metadata_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(metadata_name).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    for framework in FRAMEWORKS:
        assert not any(framework in r for r in unconditional), (
            f"{framework} must be an optional extra, not a dependency: {unconditional}"
        )
    for dependency in ("numpy", "array-api-compat", "array-api-extra"):
        assert any(dependency in r for r in unconditional), f"{dependency} missing: {requires}"


def test_installed_wheel_imports_from_the_venv(venv: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json
        import odecore
        import odecore.adapters.numpy
        print(json.dumps([odecore.__file__, odecore.adapters.numpy.__file__]))
        """
    )
    out = run([venv_python(venv), "-c", code], cwd=tmp_path).stdout
    files = json.loads(out.strip().splitlines()[-1])
    assert None not in files, f"odecore imported as a namespace package (no __init__.py): {files}"
    paths = [Path(p).resolve() for p in files]
    for path in paths:
        assert path.is_relative_to(venv.resolve()), f"imported {path}, not from the fresh venv"
        for source in (ROOT / "odecore", ROOT / "adapters"):
            assert not path.is_relative_to(source), f"imported {path} from the source tree"


@pytest.mark.skipif(not (ROOT / "odecore" / "cli.py").exists(), reason="no odecore/cli.py yet")
def test_installed_wheel_has_a_working_cli(venv: Path, tmp_path: Path) -> None:
    script = venv / ("Scripts/odecore.exe" if os.name == "nt" else "bin/odecore")
    assert script.exists(), "the wheel must install the `odecore` console script"
    out = run([script, "problems"], cwd=tmp_path, timeout=120).stdout
    assert "arenstorf" in out


def imported_frameworks(code: str) -> list[str]:
    """Run `code` in a fresh interpreter; return the framework modules it left in sys.modules."""
    probe = code + textwrap.dedent(
        f"""
        import json, sys
        frameworks = {FRAMEWORKS!r}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in frameworks)))
        """
    )
    env = clean_env()
    env.pop("ODECORE_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_odecore_imports_no_framework() -> None:
    assert imported_frameworks("import odecore\n") == []


def test_numpy_solve_imports_no_framework() -> None:
    """Dispatch on array type must not import a framework to find out an array is not its own."""
    if importlib.util.find_spec("odecore.adapters") is None:
        pytest.skip("odecore is not installed here (odecore.adapters maps to adapters/)")
    code = textwrap.dedent(
        """
        import numpy as np
        import odecore

        def f(t, y):
            return -0.5 * y

        sol = odecore.solve(f, np.array([1.0, 2.0]), np.linspace(0.0, 1.0, 5), method="tsit5")
        ys = odecore.odeint(f, np.array([1.0, 2.0]), np.linspace(0.0, 1.0, 5))
        assert np.allclose(ys[-1], np.exp(-0.5) * np.array([1.0, 2.0]), rtol=1e-5)
        """
    )
    assert imported_frameworks(code) == []
