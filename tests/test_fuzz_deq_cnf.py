"""Bad inputs to the fixed points and the flows: each argument of a valid call made wrong must
raise ``TypeError`` or ``ValueError`` naming that argument, within seconds.

As ``test_fuzz.py`` does for the ODE solve, and with its helpers: a valid call is made
wrong in one argument, and the entry point must refuse it with the error and the key words
``_bad`` names. Examples are derandomized and few.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import BACKENDS, FUZZ, OTHER_FRAMEWORK, _arr, _bad, _set, no_hang, to_backend

import odecore

# ---------------------------------------------------------------------------------------------
# Fixed points
# ---------------------------------------------------------------------------------------------

# z = A z + b, a contraction (spectral radius 0.5).
A = np.array([[0.5, 0.1], [0.0, 0.3]])
B = np.array([1.0, 2.0])


class Affine:
    """``A z + b``, with the VJP that NumPy's pullback needs."""

    def __call__(self, z, params):
        a, b = params
        return z @ a.T + b

    def vjp(self, z, params, u):
        a, _ = params
        return u @ a, (u[:, None] * z[None, :], u)


class Returning(Affine):
    """A map whose value is ``value(z, params)``, with Affine's VJP: the pullback on NumPy
    needs one, and these maps are refused for their value before it is called."""

    def __init__(self, value):
        self.value = value

    def __call__(self, z, params):
        return self.value(z, params)


def _f(make):
    """Replace ``f`` by a map returning ``make(xp)(z, params)``."""

    def change(call):
        call["f"] = Returning(make(odecore.get_backend(call["backend"]).xp))

    return change


def _options(**options):
    def change(call):
        call["options"] = options

    return change


def _other_framework(key, value):
    def change(call):
        other = OTHER_FRAMEWORK[call["backend"]]
        with odecore.get_backend(other).float64():
            call[key] = to_backend(other, value)

    return change


BAD_FIXED_POINT_INPUTS = [
    _bad(_set(f=3), TypeError, r"^f must be callable as f\(z, params\)"),
    _bad(_set(z0=lambda name, call: None), TypeError, r"^z0 must be an array of real floating"),
    _bad(_set(z0=lambda name, call: "01"), TypeError, r"^z0 must be an array of real floating"),
    _bad(_set(z0=_arr([0, 0], "int64")), TypeError, r"^z0 must have a real floating dtype"),
    _bad(_set(z0=_arr([0j, 0j], "complex128")), TypeError, r"^z0 must have a real floating dtype"),
    _bad(_set(z0=_arr([np.nan, 0.0])), ValueError, r"^z0 contains NaN or infinite values"),
    _bad(_set(z0=_arr([0.0, np.inf])), ValueError, r"^z0 contains NaN or infinite values"),
    _bad(_set(z0=_arr(np.zeros(0))), ValueError, r"^z0 is empty"),
    _bad(
        _other_framework("z0", np.zeros(2)),
        TypeError,
        r"^arrays from two libraries in one call: z0 .* params",
    ),
    _bad(_set(params=lambda name, call: "A"), TypeError, r"^params must be an array or a tuple"),
    _bad(_options(tol=0.0), ValueError, r"^tol must lie in \(0\.0, inf\)"),
    _bad(_options(tol=np.nan), ValueError, r"^tol must lie in \(0\.0, inf\)"),
    _bad(_options(tol="1e-6"), TypeError, r"^tol must be a real number"),
    _bad(_options(max_iter=0), ValueError, r"^max_iter must be an integer >= 1"),
    _bad(_options(max_iter=2.5), TypeError, r"^max_iter must be an integer >= 1"),
    _bad(_options(solver="newton"), ValueError, r"^unknown solver 'newton'"),
    _bad(_options(solver=None), TypeError, r"^solver must be a string"),
    _bad(_options(m=0), ValueError, r"^m must be an integer >= 1"),
    _bad(_options(beta=2.0), ValueError, r"^beta must lie in \(0\.0, 1\.0\]"),
    _bad(_options(backward="adjoint"), ValueError, r"^unknown backward 'adjoint'"),
    _bad(_options(toll=1e-6), TypeError, r"got unexpected keyword arguments \['toll'\]"),
    _bad(_options(throw="yes"), TypeError, r"^throw must be True or False"),
    _bad(_options(batch_axis=1), ValueError, r"^batch_axis must be None \(one sample\) or 0"),
    _bad(_options(batch_axis="0"), TypeError, r"^batch_axis must be None or the integer 0"),
    _bad(_f(lambda xp: lambda z, p: None), TypeError, r"^f must return a \w+ array shaped like z"),
    _bad(
        _f(lambda xp: lambda z, p: (z, z)), TypeError, r"^f must return a \w+ array shaped like z"
    ),
    _bad(_f(lambda xp: lambda z, p: xp.concat([z, z])), ValueError, r"^f returned shape \(4,\)"),
    _bad(
        _f(lambda xp: lambda z, p: xp.astype(z, xp.float32)),
        TypeError,
        r"^f returned dtype \S*float32 for z of dtype",
    ),
]


def check_bad_fixed_point(backend: str, bad, entry: str) -> None:
    """A valid fixed point of ``Affine`` from zeros, made wrong by ``bad``, raises the error
    ``bad`` names, with its message, within seconds."""
    change, error, match, _ = bad
    bk = odecore.get_backend(backend)
    with bk.float64(), no_hang(20):
        call = {
            "backend": backend,
            "f": Affine(),
            "z0": to_backend(backend, np.zeros(2)),
            "params": (to_backend(backend, A), to_backend(backend, B)),
            "options": {},
        }
        change(call)
        with pytest.raises(error, match=match):
            getattr(odecore, entry)(call["f"], call["z0"], call["params"], **call["options"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, **FUZZ)
@given(
    bad=st.sampled_from(BAD_FIXED_POINT_INPUTS),
    entry=st.sampled_from(["fixed_point", "solve_fixed_point", "vjp_fixed_point"]),
)
def test_a_bad_fixed_point_argument_raises_an_error_naming_it(backend, bad, entry):
    check_bad_fixed_point(backend, bad, entry)


def _cotangent(values, dtype="float64"):
    return lambda name: to_backend(name, np.asarray(values), dtype)


BAD_COTANGENTS = [
    (lambda name: None, TypeError, r"^z_bar must be a real floating array, got None"),
    (lambda name: "01", TypeError, r"^z_bar must be a real floating array, got '01'"),
    (_cotangent([1.0, 0.0, 0.0]), ValueError, r"^z_bar must be shaped like z \(2,\), got \(3,\)"),
    (_cotangent([1, 0], "int64"), TypeError, r"^z_bar must have a real floating dtype"),
    (_cotangent([1j, 0], "complex128"), TypeError, r"^z_bar must have a real floating dtype"),
    (_cotangent([True, False], "bool"), TypeError, r"^z_bar must have a real floating dtype"),
    (_cotangent([1.0, 0.0], "float32"), TypeError, r"^z_bar must have z's dtype \S*float64"),
    (_cotangent([np.nan, 0.0]), ValueError, r"^z_bar contains NaN or infinite values"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_COTANGENTS)
def test_the_fixed_point_pullback_names_a_bad_cotangent(backend, bad):
    """Before, a complex cotangent lost its imaginary part, an integer one ran the backward in
    integers, and one with NaN failed the backward with advice about its settings."""
    make, error, match = bad
    bk = odecore.get_backend(backend)
    with bk.float64(), no_hang(20):
        params = (to_backend(backend, A), to_backend(backend, B))
        _, pullback = odecore.vjp_fixed_point(Affine(), to_backend(backend, np.zeros(2)), params)
        with pytest.raises(error, match=match):
            pullback(make(backend))
