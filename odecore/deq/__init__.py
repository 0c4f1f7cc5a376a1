"""Deep-equilibrium fixed points: ``z* = f(z*, params)``, found per sample, differentiated by
the implicit function theorem (or by one step, or by a few unrolled steps).

Everything here is written once against the Backend protocol. The modules, from the bottom:
``options`` (the options record and its checks), ``solution`` (statuses, the result, the
failure), ``residual``, ``anderson`` and ``broyden`` (the solvers' steps), ``iteration`` (the
masked loop they run in), ``gmres``, ``mapping`` (``f`` on the loops' rows, and its VJP),
``arguments`` (checks of the user's arrays), ``rule`` (the gradient: ``Backend.custom_vjp``
attaches it to a framework's autodiff, and NumPy users get its backward as a pullback from
:func:`vjp_fixed_point`, built on ``f``'s own VJP), ``api`` and ``diagnostics``. A module
imports only modules before it.
"""

from odecore.deq.api import fixed_point, solve_fixed_point, vjp_fixed_point
from odecore.deq.diagnostics import jacobian_frobenius, spectral_radius
from odecore.deq.options import FixedPointOptions
from odecore.deq.solution import FixedPointError, FixedPointSolution, FixedPointStatus

__all__ = [
    "FixedPointError",
    "FixedPointOptions",
    "FixedPointSolution",
    "FixedPointStatus",
    "fixed_point",
    "jacobian_frobenius",
    "solve_fixed_point",
    "spectral_radius",
    "vjp_fixed_point",
]
