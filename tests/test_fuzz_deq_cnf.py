"""Bad inputs to the fixed points and the flows: each argument of a valid call made wrong must
raise ``TypeError`` or ``ValueError`` naming that argument, within seconds.

As ``test_fuzz.py`` does for the ODE solve, and with its helpers: a valid call is made
wrong in one argument, and the entry point must refuse it with the error and the key words
``_bad`` names. Examples are derandomized and few.
"""

from __future__ import annotations

import numpy as np
import pytest
from cnf_cases import LinearFlow
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import BACKENDS, FUZZ, OTHER_FRAMEWORK, _arr, _bad, _set, no_hang, to_backend

import odecore
from odecore import cnf, ensemble

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


# ---------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------

# f = M z per sample, two samples of two dimensions.
M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
X = np.array([[0.3, -1.0], [1.2, 0.4]])


def _kw(**values):
    """Set keyword arguments; a value ``(name, call) -> value`` is made on the backend."""

    def change(call):
        for key, value in values.items():
            call["kwargs"][key] = value(call["backend"], call) if callable(value) else value

    return change


def _hutchinson(eps):
    return _kw(trace="hutchinson", eps=eps)


class Velocity(LinearFlow):
    """A velocity whose value is ``value(t, z, params)``, with LinearFlow's VJPs (NumPy needs
    them); these velocities are refused for their value before the VJPs are called."""

    def __init__(self, value):
        self.value = value

    def __call__(self, t, z, params):
        return self.value(t, z, params)


def _velocity(make):
    """Replace the velocity by one returning ``make(xp)(t, z, params)``."""

    def change(call):
        call["f"] = Velocity(make(odecore.get_backend(call["backend"]).xp))

    return change


BAD_LOG_PROB_INPUTS = [
    _bad(_set(f=3), TypeError, r"^f must be a callable f\(t, z\)"),
    _bad(_set(x=lambda name, call: None), TypeError, r"^x must be an array of real floating"),
    _bad(_set(x=lambda name, call: "01"), TypeError, r"^x must be an array of real floating"),
    _bad(_set(x=_arr([[1, 2]], "int64")), TypeError, r"^x must have a real floating dtype"),
    _bad(_set(x=_arr([[np.nan, 0.0], [1.0, 1.0]])), ValueError, r"^x contains NaN or infinite"),
    _bad(_set(x=_arr([0.3, -1.0])), ValueError, r"^x must have shape \(batch, \*event_shape\)"),
    _bad(_set(x=_arr(np.zeros((0, 2)))), ValueError, r"^x has no elements"),
    _bad(_other_framework("x", X), TypeError, r"^arrays from two libraries in one call: x "),
    _bad(_set(t=lambda name, call: None), TypeError, r"^t must be a time"),
    _bad(_set(t=("0", "1")), TypeError, r"^t\[0\] must be a time"),
    _bad(_set(t=(0.0,)), ValueError, r"^t must be a pair \(t0, t1\)"),
    _bad(_set(t=(0.0, np.nan)), ValueError, r"^t contains NaN or infinite values"),
    _bad(_set(t=(0.0, 0.0)), ValueError, r"^t must be strictly increasing or strictly decreasing"),
    _bad(_kw(trace="exacts"), ValueError, r"^trace must be 'exact' or 'hutchinson'"),
    _bad(_kw(regularizers="kinetic"), TypeError, r"^regularizers must be a tuple"),
    _bad(_kw(error_control="none"), ValueError, r"^error_control must be"),
    _bad(_kw(base=3), TypeError, r"^base must be a callable"),
    _bad(_kw(batch_axis=1), ValueError, r"^batch_axis must be None"),
    _bad(_kw(rtol=-1.0), ValueError, r"^rtol must be non-negative and finite"),
    _bad(_kw(method="RK45"), ValueError, r"^unknown method 'RK45'"),
    _bad(_kw(trace="hutchinson", seed="0"), TypeError, r"^seed must be an int"),
    _bad(_kw(trace="hutchinson", seed=-1), ValueError, r"^seed must be a non-negative int"),
    _bad(_kw(trace="hutchinson", generator=0), TypeError, r"^generator must be a numpy\.random"),
    _bad(_hutchinson(_arr(np.full((2, 2), np.nan))), ValueError, r"^eps contains NaN or infinite"),
    _bad(_hutchinson(_arr(np.ones((2, 2)), "complex128")), TypeError, r"^eps must hold real"),
    _bad(_hutchinson(lambda name, call: "01"), TypeError, r"^eps must be an array shaped like"),
    _bad(_hutchinson(_arr(np.ones((3, 2)))), ValueError, r"^eps must have the shape of the state"),
    _bad(
        _velocity(lambda xp: lambda t, z, a: xp.concat([z, z], axis=1)),
        ValueError,
        r"^f returned shape \(2, 4\) for x of shape \(2, 2\)",
    ),
    # An integer velocity was a constant to torch's autograd: its divergence came out zero.
    _bad(
        _velocity(lambda xp: lambda t, z, a: xp.astype(z @ a.T, xp.int64)),
        TypeError,
        r"^f returned dtype \S*int64 for z of dtype \S*float64",
    ),
]


def _flow_call(backend: str, **arguments) -> dict:
    return {"backend": backend, "f": LinearFlow(), "kwargs": {}, **arguments}


def check_bad_log_prob(backend: str, bad, entry: str) -> None:
    """A valid log-density of the linear flow, made wrong by ``bad``, raises the error ``bad``
    names, with its message, within seconds."""
    change, error, match, _ = bad
    with odecore.get_backend(backend).float64(), no_hang(20):
        params = to_backend(backend, M)
        call = _flow_call(backend, x=to_backend(backend, X), t=(0.0, 1.0), params=params)
        change(call)
        with pytest.raises(error, match=match):
            getattr(cnf, entry)(call["f"], call["x"], call["t"], call["params"], **call["kwargs"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, **FUZZ)
@given(
    bad=st.sampled_from(BAD_LOG_PROB_INPUTS), entry=st.sampled_from(["log_prob", "solve_log_prob"])
)
def test_a_bad_log_prob_argument_raises_an_error_naming_it(backend, bad, entry):
    check_bad_log_prob(backend, bad, entry)


BAD_SAMPLE_INPUTS = [
    _bad(_set(f=3), TypeError, r"^f must be a callable f\(t, z\)"),
    _bad(_set(n=0), ValueError, r"^n must be a positive int"),
    _bad(_set(n=2.0), ValueError, r"^n must be a positive int"),
    _bad(_set(event_shape=0), ValueError, r"^event_shape must be a positive int"),
    _bad(_set(t=lambda name, call: None), TypeError, r"^t must be a time"),
    _bad(_set(t=(0.0, np.inf)), ValueError, r"^t contains NaN or infinite values"),
    _bad(_other_framework("t", [0.0, 1.0]), TypeError, r"^arrays from two libraries .* t "),
    _bad(_kw(seed=None, z=lambda name, call: "01"), TypeError, r"^z must be an array of real"),
    _bad(_kw(seed=None, z=_arr([[1, 2], [3, 4]], "int64")), TypeError, r"^z must have a real"),
    _bad(_kw(seed=None, z=_arr(np.full((2, 2), np.nan))), ValueError, r"^z contains NaN"),
    _bad(_kw(seed=None, z=_arr(np.ones((3, 2)))), ValueError, r"^z must have shape \(n, \*"),
    _bad(_kw(dtype=3), TypeError, r"^dtype must be a real floating dtype"),
    _bad(
        _kw(dtype=lambda name, call: odecore.get_backend(name).xp.int64),
        TypeError,
        r"^dtype must be a real floating dtype",
    ),
    _bad(_kw(batch_axis=1), ValueError, r"^batch_axis must be None"),
    _bad(_kw(seed="0"), TypeError, r"^seed must be an int"),
    _bad(_kw(seed=-1), ValueError, r"^seed must be a non-negative int"),
    _bad(_kw(seed=None, generator=3), TypeError, r"^generator must be a numpy\.random"),
    _bad(_kw(method="RK45"), ValueError, r"^unknown method 'RK45'"),
]


def check_bad_sample(backend: str, bad) -> None:
    """Valid samples of the linear flow, made wrong by ``bad``, raise the error ``bad``
    names, with its message, within seconds."""
    change, error, match, _ = bad
    with odecore.get_backend(backend).float64(), no_hang(20):
        call = _flow_call(backend, n=2, event_shape=2, t=(0.0, 1.0), params=to_backend(backend, M))
        call["kwargs"]["seed"] = 0
        change(call)
        kwargs = {k: v for k, v in call["kwargs"].items() if v is not None}
        with pytest.raises(error, match=match):
            cnf.sample(
                call["f"], call["n"], call["event_shape"], call["t"], call["params"], **kwargs
            )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, **FUZZ)
@given(bad=st.sampled_from(BAD_SAMPLE_INPUTS))
def test_a_bad_sample_argument_raises_an_error_naming_it(backend, bad):
    check_bad_sample(backend, bad)


def _probes(eps):
    return _kw(method="hutchinson", eps=eps)


BAD_DIVERGENCE_INPUTS = [
    _bad(_set(f=3), TypeError, r"^f must be a callable f\(t, z\)"),
    _bad(_set(z=lambda name, call: None), TypeError, r"^z must be an array of real floating"),
    _bad(_set(z=_arr([[1, 2]], "int64")), TypeError, r"^z must have a real floating dtype"),
    _bad(_set(z=_arr([0.3, -1.0])), ValueError, r"^z must have shape \(batch, \*event_shape\)"),
    _bad(_other_framework("z", X), TypeError, r"^arrays from two libraries in one call: .*z "),
    _bad(_set(t=lambda name, call: None), TypeError, r"^t must be a time"),
    _bad(_set(t=lambda name, call: "01"), TypeError, r"^t must be a time"),
    _bad(_set(t=np.nan), ValueError, r"^t contains NaN or infinite values"),
    _bad(_set(t=_arr(np.inf)), ValueError, r"^t contains NaN or infinite values"),
    _bad(_kw(method="exacts"), ValueError, r"^method must be 'exact' or 'hutchinson'"),
    _bad(_kw(method="hutchinson"), ValueError, r"^method='hutchinson' needs the probes"),
    _bad(_probes(_arr(np.full((2, 2), np.nan))), ValueError, r"^eps contains NaN or infinite"),
    _bad(_probes(_arr(np.ones((2, 2)), "complex128")), TypeError, r"^eps must hold real"),
    _bad(_probes(lambda name, call: "01"), TypeError, r"^eps must be an array shaped like"),
    _bad(_probes(_arr(np.ones((3, 2)))), ValueError, r"^eps must have the shape of the state"),
    _bad(_kw(backend="tf"), ValueError, r"^unknown backend 'tf'"),
    _bad(_velocity(lambda xp: lambda t, z, a: None), TypeError, r"^f must return a \w+ array"),
    _bad(
        _velocity(lambda xp: lambda t, z, a: xp.concat([z, z], axis=1)),
        ValueError,
        r"^f returned shape \(2, 4\) for z of shape \(2, 2\)",
    ),
    _bad(
        _velocity(lambda xp: lambda t, z, a: xp.astype(z, xp.complex128)),
        TypeError,
        r"^f returned dtype \S*complex128 for z",
    ),
]


def check_bad_divergence(backend: str, bad) -> None:
    """A valid divergence of the linear flow, made wrong by ``bad``, raises the error ``bad``
    names, with its message, within seconds."""
    change, error, match, _ = bad
    with odecore.get_backend(backend).float64(), no_hang(20):
        call = _flow_call(backend, t=0.0, z=to_backend(backend, X), params=to_backend(backend, M))
        change(call)
        with pytest.raises(error, match=match):
            cnf.divergence(call["f"], call["t"], call["z"], call["params"], **call["kwargs"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, **FUZZ)
@given(bad=st.sampled_from(BAD_DIVERGENCE_INPUTS))
def test_a_bad_divergence_argument_raises_an_error_naming_it(backend, bad):
    check_bad_divergence(backend, bad)


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


def _rates_decay(t, y, rate):
    return -rate * y


BAD_ENSEMBLE_INPUTS = [
    _bad(_set(func=3), TypeError, r"^func must be a callable"),
    _bad(_set(y0=lambda name, call: None), TypeError, r"^y0 must be an array of shape \(N, D\)"),
    _bad(_set(y0=lambda name, call: "01"), TypeError, r"^y0 must be an array of shape \(N, D\)"),
    _bad(_set(y0=np.ones(4)), ValueError, r"^y0 must be one row per trajectory"),
    _bad(_set(y0=np.ones((0, 1))), ValueError, r"^y0 must be one row per trajectory"),
    # Refused by each chunk's solve, it named the chunk's shape (2, 0), not y0's.
    _bad(_set(y0=np.ones((4, 0))), ValueError, r"^y0 must be one row .* got shape \(4, 0\)"),
    _bad(_set(y0=np.ones((4, 1), dtype=np.int64)), TypeError, r"^y0 must have a real floating"),
    _bad(_set(t=np.array([0.0, np.nan])), ValueError, r"^t contains NaN or infinite values"),
    _bad(_set(t=np.array([[0.0, 1.0]])), ValueError, r"^t must be a 1-D array"),
    _bad(_set(params=np.ones((3, 1))), ValueError, r"^params must be one row per trajectory"),
    _bad(_set(chunk_size=0), ValueError, r"^chunk_size must be a positive integer"),
    _bad(_set(chunk_size=2.5), TypeError, r"^chunk_size must be a positive integer"),
    _bad(_set(output="csv"), ValueError, r"^output must be one of"),
    _bad(_set(batch_axis=0), TypeError, r"sets batch_axis itself"),
    _bad(_set(rtol=np.ones((3, 1))), ValueError, r"^rtol of shape \(3, 1\) does not fit y0"),
    _bad(_set(method="RK45"), ValueError, r"^unknown method 'RK45'"),
]


@pytest.mark.backend("numpy")
@settings(max_examples=30, **FUZZ)
@given(bad=st.sampled_from(BAD_ENSEMBLE_INPUTS))
def test_a_bad_ensemble_argument_raises_an_error_naming_it(bad):
    """An ensemble of four decays in chunks of two, made wrong by ``bad``, raises the error
    ``bad`` names, with its message, within seconds."""
    change, error, match, _ = bad
    call = {
        "backend": "numpy",
        "func": _rates_decay,
        "y0": np.ones((4, 1)),
        "t": np.array([0.0, 1.0]),
        "params": np.linspace(0.1, 1.0, 4)[:, None],
        "chunk_size": 2,
    }
    change(call)
    func, y0, t = call.pop("func"), call.pop("y0"), call.pop("t")
    with no_hang(20), pytest.raises(error, match=match):
        ensemble.solve(func, y0, t, **call)
