"""Ordinary differential equations: the public API on top, then the prepared problem, the
loop, its outputs and tape, and the solution it returns."""
