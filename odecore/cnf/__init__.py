"""Continuous normalizing flows: divergences, log-densities, samples and RNODE regularisers.

See :mod:`odecore.cnf.flow` for the direction, the sign convention and the derivation of the
log-density, and :mod:`odecore.cnf.dynamics` for the augmented state.
"""

from odecore.cnf.checks import REGULARIZERS
from odecore.cnf.divergence import divergence
from odecore.cnf.dynamics import AugmentedDynamics, augmented_dynamics
from odecore.cnf.flow import (
    FlowSolution,
    log_prob,
    sample,
    solve_log_prob,
    standard_normal_log_prob,
    vjp_log_prob,
)

__all__ = [
    "REGULARIZERS",
    "AugmentedDynamics",
    "FlowSolution",
    "augmented_dynamics",
    "divergence",
    "log_prob",
    "sample",
    "solve_log_prob",
    "standard_normal_log_prob",
    "vjp_log_prob",
]
