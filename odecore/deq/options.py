"""The options of a fixed-point solve: one record, with every default and every check."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from odecore.backend import get_backend, library_of
from odecore.backend.differentiate import differentiated_setting

SOLVERS = ("picard", "anderson", "broyden")
BACKWARD_MODES = ("implicit", "one_step", "unrolled")
BACKWARD_SOLVERS = ("picard", "anderson", "broyden", "gmres")
BACKWARD_LINEARIZATIONS = ("once", "per_iteration")
STOP_MODES = ("abs", "rel")


@dataclass(frozen=True, kw_only=True)
class FixedPointOptions:
    """How :func:`~odecore.solve_fixed_point` solves and differentiates; checked when built.

    The fields are the keyword options of :func:`~odecore.solve_fixed_point`, documented
    there. After construction the defaults that depend on other options are resolved:
    ``backward_tol``, ``backward_max_iter`` and ``unroll_steps`` are never None.
    """

    # The forward solver, one of SOLVERS.
    solver: str = "anderson"
    # A sample has converged once its residual, measured as stop_mode says, is at most tol.
    tol: float = 1e-6
    # "abs": ||f(z) - z||; "rel": ||f(z) - z|| / ||f(z)||; per sample.
    stop_mode: str = "abs"
    # Iterations before a sample still running gets MAX_ITER_REACHED.
    max_iter: int = 50
    # Memory of Anderson (stored pairs) and Broyden (low-rank terms); GMRES restarts from it.
    m: int = 5
    # Anderson's regularisation, relative to the stored residuals' size.
    lam: float = 1e-4
    # Anderson's mixing of the stored residuals into the proposal.
    beta: float = 1.0
    # Picard's step: z <- (1 - damping) z + damping f(z).
    damping: float = 1.0
    # The gradient, one of BACKWARD_MODES.
    backward: str = "implicit"
    # The solver of the implicit backward's linear system, one of BACKWARD_SOLVERS.
    backward_solver: str = "anderson"
    # How the implicit backward gets f's Jacobian products at z*, one of
    # BACKWARD_LINEARIZATIONS: "once" evaluates f once and keeps what the framework recorded
    # for every iteration; "per_iteration" evaluates f again in each and frees its record
    # after the product (less memory held between iterations, one evaluation more each).
    backward_linearization: str = "once"
    # The implicit backward's tolerance, relative to the cotangent's norm; None: the forward tol.
    backward_tol: float | None = None
    # The implicit backward's iteration limit; None: the forward max_iter.
    backward_max_iter: int | None = None
    # Steps differentiated by backward="unrolled"; None: 1 for "one_step", else 5.
    unroll_steps: int | None = None
    # The damping of the unrolled steps, as damping is Picard's.
    unroll_damping: float = 1.0
    # Raise FixedPointError for a sample that did not converge, rather than report it.
    throw: bool = True

    @classmethod
    def from_keywords(cls, caller: str, keywords: dict) -> FixedPointOptions:
        """The options given to ``caller`` as keyword arguments, the others at their
        defaults; a name that is no option raises TypeError."""
        unknown = set(keywords) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"{caller} got unexpected keyword arguments {sorted(unknown)}; the options are "
                f"{', '.join(f.name for f in dataclasses.fields(cls))}, batch_axis and backend"
            )
        options = cls(**keywords)
        options._refuse_unused(keywords)
        return options

    def _refuse_unused(self, given):
        """Refuse an option given to a solve that does not read it: ``unroll_steps=10``
        without ``backward="unrolled"`` would otherwise leave the implicit gradient in
        place without a word, and ``damping`` passed to Anderson would not damp."""
        implicit = self.backward == "implicit"
        backward = (
            f"backward={self.backward!r}"
            if not implicit
            else f"the implicit backward's backward_solver={self.backward_solver!r}"
        )
        anderson = self.solver == "anderson" or (implicit and self.backward_solver == "anderson")
        memory = self.solver != "picard" or (implicit and self.backward_solver != "picard")
        unused = {
            "damping": (
                self.solver != "picard",
                f"it is the forward Picard iteration's step, and solver={self.solver!r}: pass "
                f"solver='picard'",
            ),
            "beta": (
                not anderson,
                f"it is Anderson's mixing, and neither solver={self.solver!r} nor {backward} "
                f"is Anderson: pass solver='anderson'",
            ),
            "lam": (
                not anderson,
                f"it is Anderson's regularisation, and neither solver={self.solver!r} nor "
                f"{backward} is Anderson: pass solver='anderson'",
            ),
            "m": (
                not memory,
                f"it is the memory of Anderson, Broyden and GMRES, and neither "
                f"solver={self.solver!r} nor {backward} keeps one: pass solver='anderson'",
            ),
            **{
                name: (
                    not implicit,
                    f"it sets the implicit backward's linear solve, and backward="
                    f"{self.backward!r} solves none: pass backward='implicit'",
                )
                for name in (
                    "backward_solver",
                    "backward_tol",
                    "backward_max_iter",
                    "backward_linearization",
                )
            },
            **{
                name: (
                    implicit,
                    "it sets the steps of backward='unrolled', and backward='implicit' "
                    "differentiates none: pass backward='unrolled'",
                )
                for name in ("unroll_steps", "unroll_damping")
            },
        }
        for name in given:
            ignored, why = unused.get(name, (False, ""))
            if ignored:
                raise ValueError(
                    f"{name}={given[name]!r} would have no effect: {why}, or leave {name} out"
                )

    def __post_init__(self):
        # Each value is normalised (a NumPy integer to int, ...) before a later check or a
        # derived default reads it.
        choice("solver", self.solver, SOLVERS)
        choice("stop_mode", self.stop_mode, STOP_MODES)
        choice("backward", self.backward, BACKWARD_MODES)
        choice("backward_solver", self.backward_solver, BACKWARD_SOLVERS)
        choice("backward_linearization", self.backward_linearization, BACKWARD_LINEARIZATIONS)
        resolve = self._resolve
        resolve("tol", number("tol", self.tol, 0.0, math.inf, low_open=True))
        resolve("max_iter", integer("max_iter", self.max_iter))
        resolve("m", integer("m", self.m))
        resolve("lam", number("lam", self.lam, 0.0, math.inf))
        resolve("beta", number("beta", self.beta, 0.0, 1.0, low_open=True))
        resolve("damping", number("damping", self.damping, 0.0, 1.0, low_open=True))
        backward_tol, backward_max_iter = self.backward_tol, self.backward_max_iter
        backward_tol = self.tol if backward_tol is None else backward_tol
        backward_max_iter = self.max_iter if backward_max_iter is None else backward_max_iter
        resolve("backward_tol", number("backward_tol", backward_tol, 0.0, math.inf, low_open=True))
        resolve("backward_max_iter", integer("backward_max_iter", backward_max_iter))
        one_step = self.backward == "one_step"
        unroll_steps = self.unroll_steps
        if unroll_steps is None:
            unroll_steps = 1 if one_step else 5
        resolve("unroll_steps", integer("unroll_steps", unroll_steps))
        if one_step and self.unroll_steps != 1:
            raise ValueError(
                f"backward='one_step' differentiates exactly one step of f; got unroll_steps="
                f"{self.unroll_steps}: use backward='unrolled' for more"
            )
        unroll_damping = number("unroll_damping", self.unroll_damping, 0.0, 1.0, low_open=True)
        resolve("unroll_damping", unroll_damping)
        if one_step and self.unroll_damping != 1.0:
            raise ValueError("backward='one_step' has no damping; use backward='unrolled'")
        if not isinstance(self.throw, bool):
            raise TypeError(f"throw must be True or False, got {describe(self.throw)}")

    def _resolve(self, name, value):
        # The record is frozen for its users; only its own check may normalise a field.
        object.__setattr__(self, name, value)


def choice(name, value, valid):
    names = ", ".join(repr(v) for v in valid)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {names}; got {describe(value)}")
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {names}")


def integer(name, value, least=1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {least}, got {describe(value)}")
    if value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def number(name, value, low, high, low_open=False) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if _differentiated(value):
            raise differentiated_setting(
                name, "a fixed-point solve", "the arrays in params", "a Python float"
            )
        raise TypeError(f"{name} must be a real number (a Python float), got {describe(value)}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high) or (low_open and value == low):
        bracket = "(" if low_open else "["
        closing = ")" if high == math.inf else "]"
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}{closing}, got {value!r}")
    return value


def _differentiated(value) -> bool:
    """Whether ``value`` is an array its framework differentiates (``Autodiff.differentiates``:
    a JAX value under ``grad``), so that its refusal says so rather than name its type."""
    library = library_of(value)
    if library is None:
        return False
    autodiff = get_backend(library).autodiff
    return autodiff is not None and autodiff.differentiates(value)


def describe(value) -> str:
    """What a wrong value is, for an error message: its type, and its value when short."""
    if value is None:
        return "None"
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    shown = repr(value)
    return f"{name} {shown}" if len(shown) <= 40 else f"a {name}"
