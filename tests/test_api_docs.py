"""The API reference is complete: every public callable and class of odecore has a numpy-style
docstring with the sections the reference renders, and the examples in those docstrings run.

The public objects are those of ``odecore.__all__`` (less the modules ``cnf`` and ``ensemble``),
of ``odecore.cnf.__all__``, and the functions and classes that ``odecore.ensemble`` defines
without a leading underscore. Constants (``METHODS``, ``TABLEAUS``, ...) carry attribute
docstrings that only the source shows; the strict documentation build checks those.
"""

from __future__ import annotations

import doctest
import enum
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import odecore
import odecore.cnf
import odecore.ensemble


def _public_objects() -> dict[str, object]:
    found = {}
    for name in odecore.__all__:
        obj = getattr(odecore, name)
        if callable(obj) and not inspect.ismodule(obj):
            found[f"odecore.{name}"] = obj
    for name in odecore.cnf.__all__:
        obj = getattr(odecore.cnf, name)
        if callable(obj):
            found[f"odecore.cnf.{name}"] = obj
    for name, obj in vars(odecore.ensemble).items():
        defined_here = getattr(obj, "__module__", None) == "odecore.ensemble"
        if not name.startswith("_") and defined_here and callable(obj):
            found[f"odecore.ensemble.{name}"] = obj
    return found


PUBLIC = _public_objects()

# What raises nothing of its own for bad input: plain records of a result, enums, exceptions
# and warnings, gradient modes without settings, the augmented dynamics (built and checked by
# odecore.cnf.augmented_dynamics), and the standard normal's log-density (arithmetic only).
RAISES_NOTHING = {
    "odecore.Checkpoint",
    "odecore.Direct",
    "odecore.EventRecord",
    "odecore.FixedPointError",
    "odecore.FixedPointSolution",
    "odecore.FixedPointStatus",
    "odecore.Perturb",
    "odecore.PrecisionWarning",
    "odecore.Solution",
    "odecore.SolveError",
    "odecore.Status",
    "odecore.Tableau",
    "odecore.BackendNotAvailableError",
    "odecore.DeviceNotAvailableError",
    "odecore.cnf.AugmentedDynamics",
    "odecore.cnf.FlowSolution",
    "odecore.cnf.standard_normal_log_prob",
    "odecore.ensemble.EnsembleSolution",
}

# Libraries an example may import that an environment can lack; its examples then skip.
OPTIONAL_LIBRARIES = ("torch", "jax", "numba", "dask", "distributed", "scipy")

SECTION = re.compile(r"^(?P<title>[A-Z][A-Za-z ]+)\n-{3,}$", re.M)
SPHINX_ROLE = re.compile(r":(class|func|data|mod|attr|meth|exc):`")


def sections(docstring: str) -> dict[str, str]:
    """The numpy-style sections of a docstring, title to body; the summary under ``""``."""
    text = inspect.cleandoc(docstring)
    found = {}
    matches = list(SECTION.finditer(text))
    found[""] = text[: matches[0].start()] if matches else text
    ends = [following.start() for following in matches[1:]] + [len(text)] if matches else []
    for match, end in zip(matches, ends, strict=True):
        found[match.group("title")] = text[match.end() : end]
    return found


def documented_names(body: str) -> set[str]:
    """The names a Parameters (or Attributes) section documents: the unindented lines,
    ``name : type`` or ``a, b``, with the stars of ``*args`` and ``**kwargs`` kept."""
    names = set()
    for line in body.splitlines():
        if line and not line[0].isspace():
            for name in line.split(" : ")[0].split(","):
                names.add(name.strip())
    return names


def signature_names(obj) -> list[str]:
    """The parameters a caller passes: ``*args`` and ``**kwargs`` with their stars."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    names = []
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "cls"):
            continue
        stars = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}
        names.append(stars.get(parameter.kind, "") + parameter.name)
    return names


def constructor_names(cls) -> list[str]:
    """What a class's instances are made from: an enum's members, or its constructor's
    parameters (a dataclass's or NamedTuple's fields)."""
    if issubclass(cls, BaseException):
        return signature_names(cls.__init__) if "__init__" in vars(cls) else []
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return list(cls.__members__)
    return signature_names(cls)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_has_the_sections_of_the_reference(name: str) -> None:
    obj = PUBLIC[name]
    docstring = inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__doc__
    assert docstring, f"{name} has no docstring"
    found = sections(docstring)
    assert found[""].strip(), f"{name}: the docstring must start with a summary"
    assert "Examples" in found, f"{name}: the docstring needs an Examples section"
    assert ">>>" in found["Examples"], f"{name}: its Examples section has no doctest"
    if inspect.isclass(obj):
        documented = documented_names(found.get("Parameters", ""))
        documented |= documented_names(found.get("Attributes", ""))
        missing = [n for n in constructor_names(obj) if n not in documented]
        assert not missing, f"{name}: Parameters or Attributes must document {missing}"
    else:
        assert "Returns" in found or "Yields" in found, f"{name}: no Returns section"
        wanted = signature_names(obj)
        if wanted:
            assert "Parameters" in found, f"{name} takes {wanted}: it needs a Parameters section"
        documented = documented_names(found.get("Parameters", ""))
        documented |= documented_names(found.get("Other Parameters", ""))
        missing = [n for n in wanted if n not in documented]
        assert not missing, f"{name}: the Parameters section must document {missing}"
    if name not in RAISES_NOTHING:
        assert "Raises" in found, f"{name}: the docstring needs a Raises section"
        raised = documented_names(found["Raises"])
        assert raised, f"{name}: the Raises section names no exception"
        for exception in raised:
            assert exception.split(".")[-1].endswith(("Error", "Exception")), (
                f"{name}: {exception!r} in Raises is not an exception's name"
            )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_uses_mkdocstrings_cross_references(name: str) -> None:
    docstring = PUBLIC[name].__doc__ or ""
    role = SPHINX_ROLE.search(docstring)
    assert role is None, (
        f"{name}: {role.group(0)!r} is a Sphinx role; write [`X`][odecore.X] (an autoref)"
    )


def _doctests(name: str) -> list[doctest.DocTest]:
    obj = PUBLIC[name]
    finder = doctest.DocTestFinder(exclude_empty=True)
    module = inspect.getmodule(obj)
    return [test for test in finder.find(obj, name, module=module) if test.examples]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_examples_run(name: str) -> None:
    tests = _doctests(name)
    assert tests, f"{name} has no doctest"
    for test in tests:
        source = "".join(example.source for example in test.examples)
        for library in OPTIONAL_LIBRARIES:
            if re.search(rf"^\s*(import|from) {library}\b", source, re.M):
                if importlib.util.find_spec(library) is None:
                    pytest.skip(f"{test.name}'s example needs {library}")
        runner = doctest.DocTestRunner(
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
        )
        test.globs = {"__name__": "__doctest__"}
        messages: list[str] = []
        runner.run(test, out=messages.append)
        assert runner.failures == 0, f"{test.name}'s example failed:\n" + "".join(messages)


def test_the_public_objects_are_found() -> None:
    """The lists above must not come out empty or miss a module's functions."""
    assert {"odecore.solve", "odecore.cnf.log_prob", "odecore.ensemble.solve"} <= set(PUBLIC)
    assert RAISES_NOTHING <= set(PUBLIC), sorted(RAISES_NOTHING - set(PUBLIC))


def test_a_lost_section_or_a_wrong_printed_value_fails() -> None:
    """The checks themselves can fail: a docstring without Returns is caught by ``sections``,
    and a doctest whose printed value is wrong counts as a failure."""
    without_returns = "Summary.\n\nParameters\n----------\nx : int\n    A number.\n"
    assert "Returns" not in sections(without_returns)
    wrong = doctest.DocTestParser().get_doctest(">>> print(1 + 1)\n3\n", {}, "wrong", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(wrong, out=lambda _: None)
    assert runner.failures == 1


API_PAGES = sorted((Path(__file__).resolve().parents[1] / "docs" / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^::: (?P<name>[\w.]+)\n(?P<options>(?:[ \t]+\S.*\n)*)", re.M)


def _directives() -> list[tuple[str, str, str]]:
    """``(page, name, heading)`` of every ``::: name`` of the API pages; the heading is the
    ``heading:`` option where the directive sets one, else the name."""
    found = []
    for page in API_PAGES:
        for match in DIRECTIVE.finditer(page.read_text()):
            heading = re.search(r"^\s+heading: ([\w.]+)$", match.group("options"), re.M)
            name = match.group("name")
            found.append((page.name, name, heading.group(1) if heading else name))
    return found


def _is_a_module_name(name: str) -> bool:
    parent = importlib.import_module(name.rpartition(".")[0])
    return hasattr(parent, "__path__") and importlib.util.find_spec(name) is not None


def test_the_api_pages_render_each_public_object_itself() -> None:
    """The reference resolves ``::: a.b.c`` from the source, a submodule first: a public
    function named like the module that defines it (``odecore.cnf.divergence``) would render
    as that module, its private helpers and no parameters of the function. Each directive
    must name the object itself, and every public object must have one."""
    shadowed = []
    for page, name, _ in _directives():
        module, _, attribute = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attribute)
        if not inspect.ismodule(obj) and _is_a_module_name(name):
            shadowed.append(f"{page}: {name} is also a module's name")
    assert not shadowed, shadowed
    headings = {heading for _, _, heading in _directives()}
    assert not set(PUBLIC) - headings, sorted(set(PUBLIC) - headings)


def test_odeint_documents_every_option() -> None:
    """``solve`` and the API page send readers to ``odeint``'s docstring for the options:
    every key ``options`` accepts must be named there."""
    from odecore import _validate

    valid = _validate._ADAPTIVE_OPTIONS | _validate._FIXED_OPTIONS
    documented = sections(inspect.getdoc(odecore.odeint))["Parameters"]
    missing = sorted(key for key in valid if f"``{key}``" not in documented)
    assert not missing, f"odeint's docstring does not name the options {missing}"
