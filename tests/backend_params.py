"""Parametrisations shared by the tests that take the ``backend`` fixture (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

SLOW_ON_JAX = pytest.mark.slow_on("jax")


def first_only_on_jax(values: Iterable) -> list:
    """``values`` for ``pytest.mark.parametrize``, all but the first marked ``slow_on("jax")``.

    JAX compiles every solve configuration (seconds each) where NumPy and torch run at once.
    The values vary what the core does the same way on every backend (the tableau, an
    option), which NumPy and torch check in full; what is JAX's own (the adapter, the
    compiled loop) the first value checks. The others run on JAX with the slow tests.
    A tuple is the values of several parameters; a ``pytest.param`` keeps its id and marks.
    """
    params = []
    for index, value in enumerate(values):
        if index == 0:
            params.append(value)
            continue
        if isinstance(value, type(pytest.param(None))):
            marks = [*value.marks, SLOW_ON_JAX]
            params.append(pytest.param(*value.values, id=value.id, marks=marks))
        else:
            args = value if isinstance(value, tuple) else (value,)
            params.append(pytest.param(*args, marks=SLOW_ON_JAX))
    return params
