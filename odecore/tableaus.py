"""The Butcher tableaus of every method, as exact rationals: ``odecore.solvers.tableaus``
under its public name."""

from odecore.solvers.tableaus import ADAPTIVE_METHODS, FIXED_STEP_METHODS, TABLEAUS, Tableau

__all__ = ["ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "TABLEAUS", "Tableau"]
