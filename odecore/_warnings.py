"""The warnings odecore gives."""

from __future__ import annotations


class PrecisionWarning(UserWarning):
    """A solve runs in a lower precision than its inputs have: JAX without its x64 mode turns
    float64 arrays into float32, and says nothing itself."""
