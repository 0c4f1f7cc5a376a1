"""Solvers: what one step does. The loop around them is ``odecore.ode.loop``."""
