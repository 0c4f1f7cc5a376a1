"""odecore: differentiable ODE solvers written once against the Python array API."""

from odecore import cnf, ensemble
from odecore._config import backend_name, set_backend, use_backend
from odecore.adjoint.modes import Backsolve, Checkpoint, Direct
from odecore.backend import (
    BACKEND_NAMES,
    Backend,
    BackendNotAvailableError,
    DeviceNotAvailableError,
    get_backend,
)
from odecore.deq import (
    FixedPointError,
    FixedPointSolution,
    FixedPointStatus,
    fixed_point,
    jacobian_frobenius,
    solve_fixed_point,
    spectral_radius,
    vjp_fixed_point,
)
from odecore.ode.api import odeint, odeint_adjoint, odeint_event, solve, vjp_odeint
from odecore.ode.events import Event, EventRecord
from odecore.ode.perturb import Perturb
from odecore.ode.solution import PrecisionWarning, Solution, SolveError, Status
from odecore.solvers.tableaus import ADAPTIVE_METHODS, FIXED_STEP_METHODS, TABLEAUS, Tableau

METHODS: tuple[str, ...] = FIXED_STEP_METHODS + ADAPTIVE_METHODS
"""Every method's name, as ``method=`` takes it: the fixed-step methods, then the adaptive ones."""

__version__ = "0.1.0"

__all__ = [
    "ADAPTIVE_METHODS",
    "BACKEND_NAMES",
    "FIXED_STEP_METHODS",
    "METHODS",
    "TABLEAUS",
    "Backend",
    "Backsolve",
    "Checkpoint",
    "Direct",
    "Event",
    "EventRecord",
    "FixedPointError",
    "FixedPointSolution",
    "FixedPointStatus",
    "BackendNotAvailableError",
    "DeviceNotAvailableError",
    "Perturb",
    "PrecisionWarning",
    "Solution",
    "SolveError",
    "Status",
    "Tableau",
    "backend_name",
    "cnf",
    "ensemble",
    "fixed_point",
    "get_backend",
    "jacobian_frobenius",
    "odeint",
    "odeint_event",
    "odeint_adjoint",
    "set_backend",
    "solve",
    "solve_fixed_point",
    "spectral_radius",
    "use_backend",
    "vjp_fixed_point",
    "vjp_odeint",
]
