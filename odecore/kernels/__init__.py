"""Whole solves as plain scalar code over one trajectory, for compilers such as Numba."""
