"""The JAX backend: the core's loop under jit, vmap and grad, failures, dtypes, recompilation.

References that do not come from the JAX backend: closed forms, odecore's NumPy backend (the
same algorithm, eager), and central finite differences. Float64 tests run inside
``jax.enable_x64``; the float32 tests run without it, as JAX users get by default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import pytest
from backend_params import framework_module

pytestmark = pytest.mark.backend("jax")
jax = framework_module("jax")
jnp = jax.numpy

import odecore  # noqa: E402
from odecore import Status  # noqa: E402

W = np.array([[-0.5, 1.0], [-1.0, -0.3]])
B = np.array([0.1, -0.2])
Y0 = np.array([0.3, -0.4])
TIMES = np.array([0.0, 0.4, 1.1, 1.5])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def field(t, y, params):
    """``tanh(y W^T) + b sin(2t)``: nonlinear, non-autonomous; works on any array library."""
    W_, b = params
    xp = y.__array_namespace__() if hasattr(y, "__array_namespace__") else np
    s = xp.sin(2 * xp.asarray(t))
    return xp.tanh(y @ W_.T) + b * (s[..., None] if s.ndim else s)


def jax_inputs(dtype=None):
    dtype = dtype or jnp.float64
    return (
        jnp.asarray(Y0, dtype=dtype),
        jnp.asarray(TIMES, dtype=dtype),
        (jnp.asarray(W, dtype=dtype), jnp.asarray(B, dtype=dtype)),
    )


# --------------------------------------------------------------------------------------------
# Forward solves


def test_decay_matches_closed_form_under_jit(x64):
    k = 0.7
    y0 = jnp.asarray([1.0, -2.0])
    t = jnp.linspace(0.0, 2.0, 6)
    run = jax.jit(lambda y0, t, k: odecore.odeint(lambda t, y, k: -k * y, y0, t, params=k))
    ys = run(y0, t, jnp.asarray(k))
    expected = np.exp(-k * np.asarray(t))[:, None] * np.asarray(y0)
    np.testing.assert_allclose(np.asarray(ys), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "rk4"])
def test_jit_agrees_with_numpy_for_the_same_steps(x64, method):
    """float64 under jit takes the steps the NumPy backend takes, to rounding."""
    y0, t, params = jax_inputs()
    kw = {"method": method, "rtol": 1e-8, "atol": 1e-10}
    if method == "rk4":
        kw = {"method": method, "options": {"step_size": 0.05}}
    sol = jax.jit(lambda y0, t, p: odecore.solve(field, y0, t, params=p, **kw))(y0, t, params)
    ref = odecore.solve(field, Y0, TIMES, params=(W, B), **kw)
    assert int(sol.stats["nsteps"]) == ref.stats["nsteps"]
    assert int(sol.stats["naccept"]) == ref.stats["naccept"]
    np.testing.assert_allclose(np.asarray(sol.ys), ref.ys, rtol=1e-12, atol=1e-14)
    assert int(sol.status) == Status.SUCCESS


def test_jit_equals_unjitted(x64):
    y0, t, params = jax_inputs()
    eager = odecore.odeint(field, y0, t, params=params)
    jitted = jax.jit(lambda y0, t, p: odecore.odeint(field, y0, t, params=p))(y0, t, params)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-13, atol=1e-15)


def test_decreasing_traced_times_match_numpy(x64):
    y0, t, params = jax_inputs()
    back = jax.jit(lambda y0, t, p: odecore.odeint(field, y0, t, params=p))(y0, t[::-1], params)
    ref = odecore.odeint(field, Y0, TIMES[::-1], params=(W, B))
    np.testing.assert_allclose(np.asarray(back), ref, rtol=1e-12, atol=1e-14)


def test_batch_axis_under_jit_matches_single_solves(x64):
    y0s = np.stack([Y0, 2 * Y0, -Y0])
    run = jax.jit(lambda y0, t, p: odecore.odeint(field, y0, t, params=p, batch_axis=0))
    ys = run(jnp.asarray(y0s), jnp.asarray(TIMES), (jnp.asarray(W), jnp.asarray(B)))
    for i in range(3):
        ref = odecore.odeint(field, y0s[i], TIMES, params=(W, B))
        np.testing.assert_allclose(np.asarray(ys[:, i]), ref, rtol=1e-12, atol=1e-14)


def test_changing_rtol_does_not_recompile(x64):
    traces = []

    @jax.jit
    def run(y0, t, p, rtol, atol):
        traces.append(1)  # runs once per trace, never when the compiled code runs
        return odecore.solve(field, y0, t, params=p, rtol=rtol, atol=atol)

    y0, t, params = jax_inputs()
    steps = []
    for rtol in (1e-4, 1e-6, 1e-8, 1e-10):
        sol = run(y0, t, params, rtol, rtol * 1e-2)
        ref = odecore.solve(field, Y0, TIMES, params=(W, B), rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(np.asarray(sol.ys), ref.ys, rtol=1e-12, atol=1e-14)
        assert int(sol.stats["nsteps"]) == ref.stats["nsteps"]
        steps.append(int(sol.stats["nsteps"]))
    assert len(traces) == 1
    assert run._cache_size() == 1
    assert steps == sorted(steps) and steps[0] < steps[-1]  # the tolerance took effect


def test_changing_step_size_does_not_recompile(x64):
    traces = []

    @jax.jit
    def run(y0, t, p, h):
        traces.append(1)
        return odecore.odeint(field, y0, t, params=p, method="rk4", options={"step_size": h})

    y0, t, params = jax_inputs()
    for h in (0.1, 0.05, 0.02):
        ref = odecore.odeint(
            field, Y0, TIMES, params=(W, B), method="rk4", options={"step_size": h}
        )
        np.testing.assert_allclose(np.asarray(run(y0, t, params, h)), ref, rtol=1e-12)
    assert len(traces) == 1


def test_a_python_float_parameter_does_not_recompile_the_eager_solve(x64):
    # Outside jit, odecore compiles the solve and reuses it for new values of the arrays; a
    # Python float in params was part of the compiled program's key, and each value of a
    # sweep compiled it again (a second each).
    traces = []

    def decay(t, y, p):
        if isinstance(y, jax.core.Tracer):
            traces.append(1)
        return -p["k"] * y

    t = jnp.linspace(0.0, 1.0, 5)
    y0 = jnp.asarray([1.0, 2.0])
    for i, k in enumerate((0.5, 0.6, 0.7, 0.8)):
        ys = odecore.odeint(decay, y0, t, params={"k": k}, rtol=1e-10, atol=1e-12)
        expected = np.exp(-k * np.asarray(t))[:, None] * np.asarray(y0)
        np.testing.assert_allclose(np.asarray(ys), expected, rtol=1e-8)
        if i == 0:
            traced_once = len(traces)
    assert traced_once > 0 and len(traces) == traced_once
    # A float32 state stays float32: the float promotes as Python's floats do.
    ys = odecore.odeint(decay, jnp.asarray([1.0], jnp.float32), t, params={"k": 0.9})
    assert ys.dtype == jnp.float32


def test_float32_without_x64():
    assert not jax.config.jax_enable_x64
    k = 0.7
    t = jnp.linspace(0.0, 2.0, 5)
    y0 = jnp.asarray([1.0, -2.0], dtype=jnp.float32)
    sol = jax.jit(lambda y0, t: odecore.solve(lambda t, y: -k * y, y0, t, rtol=1e-5, atol=1e-7))(
        y0, t
    )
    assert sol.ys.dtype == jnp.float32
    assert sol.ts.dtype == jnp.float32  # the widest time JAX has without x64
    expected = np.exp(-k * np.linspace(0.0, 2.0, 5))[:, None] * np.array([1.0, -2.0])
    np.testing.assert_allclose(np.asarray(sol.ys), expected, rtol=5e-5, atol=1e-6)


def test_float32_state_keeps_float64_time_with_x64(x64):
    t = jnp.asarray([0.0, 1e4, 1e4 + 1e-3])
    sol = odecore.solve(lambda t, y: jnp.zeros_like(y), jnp.ones(2, dtype=jnp.float32), t)
    assert sol.ys.dtype == jnp.float32
    # 1e4 + 1e-3 is not representable in float32 (spacing ~1e-3): time stayed float64.
    assert float(sol.ts[-1]) == 1e4 + 1e-3
    assert float(sol.t_reached) == 1e4 + 1e-3


# --------------------------------------------------------------------------------------------
# Failures under jit are never silent


def _failing(kind):
    if kind == "max_steps":
        return (lambda t, y: -y), jnp.asarray([0.0, 50.0]), {"max_num_steps": 5}
    if kind == "dt_underflow":  # y' = y^2 from y(0) = 1 blows up at t = 1
        return (lambda t, y: y * y), jnp.asarray([0.0, 2.0]), {"max_num_steps": 100_000}
    return (lambda t, y: jnp.where(t > 0.5, jnp.nan, -y)), jnp.asarray([0.0, 1.0]), None


EXPECTED_STATUS = {
    "max_steps": Status.MAX_STEPS_REACHED,
    "dt_underflow": Status.DT_UNDERFLOW,
    "nonfinite": Status.NONFINITE_STATE,
}


@pytest.mark.parametrize("kind", list(EXPECTED_STATUS))
def test_failure_under_jit_gives_nan_and_status(x64, kind):
    func, t, options = _failing(kind)
    y0 = jnp.asarray([1.0])
    run = jax.jit(lambda y0: odecore.solve(func, y0, t, options=options))
    sol = run(y0)
    assert int(sol.status) == EXPECTED_STATUS[kind]
    assert bool(jnp.all(jnp.isnan(sol.ys[-1])))
    assert float(sol.t_reached) < float(t[-1])
    # Outside jit the same solve raises, naming the reason.
    with pytest.raises(odecore.SolveError, match=EXPECTED_STATUS[kind].describe()[:20]):
        odecore.solve(func, y0, t, options=options)


def test_failure_in_a_batch_is_per_sample(x64):
    y0 = jnp.asarray([[1.0], [-1.0]])  # y' = y^2: blows up from +1, decays from -1
    sol = jax.jit(
        lambda y0: odecore.solve(lambda t, y: y * y, y0, jnp.asarray([0.0, 2.0]), batch_axis=0)
    )(y0)
    assert [int(s) for s in sol.status] == [Status.DT_UNDERFLOW, Status.SUCCESS]
    assert bool(jnp.isnan(sol.ys[-1, 0, 0]))
    np.testing.assert_allclose(float(sol.ys[-1, 1, 0]), -1.0 / 3.0, rtol=1e-6)


def test_failure_gives_nan_gradients_under_jit(x64):
    func, t, options = _failing("max_steps")
    loss = jax.jit(
        jax.grad(
            lambda y0: jnp.sum(odecore.odeint(func, y0, t, options=options, adjoint="backsolve"))
        )
    )
    assert bool(jnp.all(jnp.isnan(loss(jnp.asarray([1.0])))))


# --------------------------------------------------------------------------------------------
# Invalid requests


def test_direct_adjoint_raises_naming_the_modes():
    y0, t, params = jax_inputs(jnp.float32)
    with pytest.raises(ValueError, match="backsolve.*|checkpoint") as info:
        odecore.odeint(field, y0, t, params=params, adjoint="direct")
    assert "checkpoint" in str(info.value) and "backsolve" in str(info.value)


def test_jvp_raises_a_clear_error(x64):
    y0, t, params = jax_inputs()
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda y: odecore.odeint(field, y, t, params=params), (y0,), (y0,))


def test_adjoint_params_outside_params_raises(x64):
    y0, t, params = jax_inputs()
    with pytest.raises(ValueError, match="Put every array to differentiate into params"):
        jax.grad(
            lambda y0: jnp.sum(
                odecore.odeint(field, y0, t, params=params, adjoint_params=[params[0]])
            )
        )(y0)


def test_invalid_concrete_inputs_still_raise(x64):
    y0, t, params = jax_inputs()
    with pytest.raises(ValueError, match="strictly increasing"):
        odecore.odeint(field, y0, jnp.asarray([0.0, 1.0, 1.0]), params=params)
    with pytest.raises(ValueError, match="rtol must be non-negative"):
        odecore.odeint(field, y0, t, params=params, rtol=-1.0)


# --------------------------------------------------------------------------------------------
# Gradients


# tests/gradient_cases.py's settings, with heun3 and fehlberg2 tighter: the check below is
# relative to the largest entry of each gradient, and these two left the O(h^p) gap between
# the flow's time gradients (and the continuous adjoint) and the discrete solve at 1.1e-5 to
# 1.4e-5 of it.
GRAD_SETTINGS = {
    "dopri5": {"rtol": 1e-10, "atol": 1e-12},
    "tsit5": {"rtol": 1e-10, "atol": 1e-12},
    "dopri8": {"rtol": 1e-10, "atol": 1e-12},
    "bosh3": {"rtol": 1e-7, "atol": 1e-9},
    "fehlberg2": {"rtol": 1e-8, "atol": 1e-10},
    "adaptive_heun": {"rtol": 1e-5, "atol": 1e-7},
    "rk4": {"options": {"step_size": 0.05}},
    "heun3": {"options": {"step_size": 0.025}},
    "midpoint": {"options": {"step_size": 0.005}},
    "heun2": {"options": {"step_size": 0.005}},
    "euler": {"options": {"step_size": 0.05}},
}
# Every CI run: an adaptive and a fixed-step method. The conformance suite checks the JAX
# gradients of dopri5, tsit5, dopri8 and bosh3 against independent references too; the full
# set runs under -m slow.
CI_METHODS = ("dopri5", "rk4")
assert set(GRAD_SETTINGS) == set(odecore.METHODS)


def _settings(method, mode):
    kw = {"method": method, "adjoint": mode, **GRAD_SETTINGS[method]}
    options = dict(kw.get("options", {}))
    options["max_num_steps"] = 4000 if method in ("midpoint", "heun2") else 2000
    kw["options"] = options
    return kw


def _loss_fn(method, mode):
    weights = jnp.asarray(np.linspace(0.5, 1.5, TIMES.size * Y0.size).reshape(TIMES.size, -1))
    kw = _settings(method, mode)

    def loss(y0, t, params):
        ys = odecore.odeint(field, y0, t, params=params, **kw)
        return 0.5 * jnp.sum(weights * ys * ys)

    return loss


def _central_differences(f, x, eps=1e-6):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for j in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[j] += eps
        minus[j] -= eps
        out[j] = (float(f(jnp.asarray(plus))) - float(f(jnp.asarray(minus)))) / (2 * eps)
    return out


def _relative(actual, expected):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    return float(np.max(np.abs(np.asarray(actual) - expected))) / scale


def _methods():
    return [
        m if m in CI_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in odecore.METHODS
    ]


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("method", _methods())
def test_gradients_match_finite_differences(x64, method, mode):
    """jit(grad) with respect to y0, both parameters and every output time, against central
    differences of the jitted solve, float64."""
    if method == "euler" and mode == "backsolve":
        pytest.skip("first order: the continuous adjoint is O(h) from the discrete solve")
    loss = _loss_fn(method, mode)
    y0, t, (W_, b) = jax_inputs()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(y0, t, (W_, b))
    fwd = jax.jit(loss)
    fd = {
        "y0": _central_differences(lambda v: fwd(v, t, (W_, b)), y0),
        "W": _central_differences(lambda v: fwd(y0, t, (v, b)), W_),
        "b": _central_differences(lambda v: fwd(y0, t, (W_, v)), b),
    }
    got = {"y0": grads[0], "W": grads[2][0], "b": grads[2][1]}
    if method != "euler":  # time gradients are the flow's: O(h) off the Euler solve
        fd["t"] = _central_differences(lambda v: fwd(y0, v, (W_, b)), t)
        got["t"] = grads[1]
    for name, reference in fd.items():
        assert _relative(got[name], reference) < 1e-5, name


class NumpyField:
    """``field`` with a hand-written VJP, for NumPy's odecore.vjp_odeint."""

    def __call__(self, t, y, params):
        return field(t, y, params)

    def vjp(self, t, y, params, cot):
        W_, b = params
        u = cot * (1.0 - np.tanh(y @ W_.T) ** 2)
        return u @ W_, (np.outer(u, y), cot * np.sin(2 * t))


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_checkpoint_and_backsolve_agree_with_numpy_pullback(x64, mode):
    """The same rule as NumPy's odecore.vjp_odeint (dynamics with a hand-written VJP)."""
    loss = _loss_fn("dopri5", mode)
    y0, t, params = jax_inputs()
    g_y0, g_t, (g_W, g_b) = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(y0, t, params)

    weights = np.linspace(0.5, 1.5, TIMES.size * Y0.size).reshape(TIMES.size, -1)
    kw = _settings("dopri5", mode)
    kw.pop("adjoint")
    ys, pullback = odecore.vjp_odeint(NumpyField(), Y0, TIMES, (W, B), adjoint=mode, **kw)
    r_y0, (r_W, r_b), r_t = pullback(weights * ys)
    for got, ref in ((g_y0, r_y0), (g_t, r_t), (g_W, r_W), (g_b, r_b)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"jump_t": [0.7]}], ids=["smooth", "jump"])
def test_checkpoint_gradient_stays_exact_when_states_are_thinned(x64, options):
    """Past its ``kept`` states the tape keeps every other state, then every fourth, and the
    backward pass recomputes the ones in between: the gradient must still be the exact
    gradient of the discrete solve, which NumPy's tape of every step gives."""
    from odecore.ode.tape import checkpoint_rows

    max_num_steps = 200
    kept, run = checkpoint_rows(max_num_steps)
    assert (kept, run) == (16, 16)
    kw = {"rtol": 1e-10, "atol": 1e-12, "options": {"max_num_steps": max_num_steps, **options}}
    weights = np.linspace(0.5, 1.5, TIMES.size * Y0.size).reshape(TIMES.size, -1)

    def loss(y0, t, params):
        sol = odecore.solve(field, y0, t, params=params, adjoint="checkpoint", **kw)
        return 0.5 * jnp.sum(weights * sol.ys**2), sol.stats["naccept"]

    y0, t, params = jax_inputs()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    (g_y0, g_t, (g_W, g_b)), naccept = grad(y0, t, params)
    # Enough steps that the stride reached 4: two rounds of thinning, recomputed runs.
    assert int(naccept) > 2 * kept
    ys, pullback = odecore.vjp_odeint(NumpyField(), Y0, TIMES, (W, B), **kw)
    r_y0, (r_W, r_b), r_t = pullback(weights * ys)
    for got, ref in ((g_y0, r_y0), (g_t, r_t), (g_W, r_W), (g_b, r_b)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-13)


def test_thinned_tape_of_a_batch_matches_the_full_tape(x64):
    """batch_axis=0: samples accept and reject on their own, and the recomputed states must
    follow each sample's own accept mask. A tape that keeps every state (max_num_steps
    large enough that nothing is thinned; the steps do not depend on it) is the reference."""
    y0s = jnp.asarray(np.stack([Y0, 3 * Y0, -Y0]))
    _, t, params = jax_inputs()

    def loss(y0s, params, max_num_steps):
        sol = odecore.solve(
            field,
            y0s,
            t,
            params=params,
            batch_axis=0,
            adjoint="checkpoint",
            rtol=1e-10,
            atol=1e-12,
            options={"max_num_steps": max_num_steps},
        )
        return jnp.sum(sol.ys**2) + 0.1 * jnp.sum(sol.ys**3), sol.stats["naccept"]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    from odecore.ode.tape import checkpoint_rows

    assert checkpoint_rows(60) == (8, 8)
    thinned, naccept = grad(y0s, params, 60)
    full, _ = grad(y0s, params, 20_000)
    assert int(jnp.min(naccept)) > 16  # past two rounds of thinning (8 states kept)
    assert len(set(np.asarray(naccept).tolist())) > 1  # the samples step differently
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(thinned), leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_dynamics_whose_vjp_cannot_be_batched(mode):
    """The adapter batches the dynamics' pullback over a unit axis (a faster kernel on the
    CPU); one that vmap cannot batch (a host callback with no vmap_method in a custom VJP)
    must still give the same gradients as the plain jnp version. Float32: a host callback
    runs outside the thread-local x64 context."""

    @jax.custom_vjp
    def sin(x):
        return jnp.sin(x)

    def sin_fwd(x):
        return jnp.sin(x), x

    def sin_bwd(x, cot):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

        def host(x, c):
            return np.cos(np.asarray(x)) * np.asarray(c)

        return (jax.pure_callback(host, shape, x, cot),)

    sin.defvjp(sin_fwd, sin_bwd)

    def loss(sin_):
        def f(t, y, w):
            return -w * sin_(y)

        def value(y0, w):
            ys = odecore.odeint(f, y0, jnp.asarray([0.0, 1.5]), params=w, adjoint=mode)
            return jnp.sum(ys[-1] ** 2)

        return jax.jit(jax.grad(value, argnums=(0, 1)))

    y0, w = jnp.asarray([0.3, -1.2, 2.0]), jnp.asarray(0.8)
    for got, ref in zip(loss(sin)(y0, w), loss(jnp.sin)(y0, w), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_checkpoint_rows_cover_every_step():
    from odecore.ode.tape import checkpoint_rows

    for n in (1, 2, 3, 10, 64, 100, 4096, 4097, 100_000):
        kept, run = checkpoint_rows(n)
        assert kept * run >= n and kept <= n
        assert kept + run <= 4 * math.sqrt(n) + 2  # memory grows as the square root


def test_vmap_of_grad_equals_grad_per_sample(x64):
    loss = _loss_fn("dopri5", "checkpoint")
    _, t, params = jax_inputs()
    y0s = jnp.asarray(np.stack([Y0, 2 * Y0, -0.5 * Y0]))
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 2)), in_axes=(0, None, None)))
    g_y0, (g_W, g_b) = batched(y0s, t, params)
    single = jax.jit(jax.grad(loss, argnums=(0, 2)))
    for i in range(3):
        r_y0, (r_W, r_b) = single(y0s[i], t, params)
        np.testing.assert_allclose(np.asarray(g_y0[i]), np.asarray(r_y0), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g_W[i]), np.asarray(r_W), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(g_b[i]), np.asarray(r_b), rtol=1e-12)


@pytest.mark.parametrize("mode", ["checkpoint", pytest.param("backsolve", marks=pytest.mark.slow)])
def test_grad_of_vmap_equals_sum_of_grads(x64, mode):
    loss = _loss_fn("tsit5", mode)
    _, t, params = jax_inputs()
    y0s = jnp.asarray(np.stack([Y0, 2 * Y0, -0.5 * Y0]))

    def total(y0s, params):
        return jnp.sum(jax.vmap(loss, in_axes=(0, None, None))(y0s, t, params))

    g_y0s, (g_W, g_b) = jax.jit(jax.grad(total, argnums=(0, 1)))(y0s, params)
    single = jax.jit(jax.grad(loss, argnums=(0, 2)))
    parts = [single(y0s[i], t, params) for i in range(3)]
    np.testing.assert_allclose(np.asarray(g_y0s), np.stack([p[0] for p in parts]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g_W), sum(np.asarray(p[1][0]) for p in parts), rtol=1e-11)
    np.testing.assert_allclose(np.asarray(g_b), sum(np.asarray(p[1][1]) for p in parts), rtol=1e-11)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("outer", ["grad_of_vmap", "vmap_of_grad"])
def test_a_python_float_parameter_unbatched_by_vmap_gets_its_gradient(x64, mode, outer):
    """A Python float parameter that vmap does not batch reached the backward pass as a
    typed Python scalar, not an array: AttributeError 'TypedFloat' has no 'shape'. y' = -k y:
    dy(T)/dk = -T y0 exp(-k T)."""
    k, T = 0.5, 1.0
    t = jnp.asarray([0.0, T])
    y0s = jnp.asarray([[1.0], [3.0], [2.0]])

    def final(y0, k):
        ys = odecore.odeint(
            lambda t, y, k: -k * y, y0, t, params=k, rtol=1e-11, atol=1e-13, adjoint=mode
        )
        return ys[-1, 0]

    if outer == "grad_of_vmap":
        got = jax.grad(lambda k: jnp.sum(jax.vmap(final, in_axes=(0, None))(y0s, k)))(k)
        expected = -T * math.exp(-k * T) * float(jnp.sum(y0s))
    else:
        got = jax.vmap(jax.grad(final, argnums=1), in_axes=(0, None))(y0s, k)
        expected = -T * math.exp(-k * T) * np.asarray(y0s[:, 0])
    # The solve's own error, rtol = 1e-11, on values of order 1.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-8)


def test_jit_of_backsolve_grad_with_per_element_tolerances(x64):
    # The backsolve takes the strictest of per-element tolerances, an array traced under
    # jit: asking whether it was given raised TracerBoolConversionError. y' = -k y has
    # y(T) = y0 exp(-k T); rtol 1e-10 bounds the gradients' error near 1e-9.
    rtol, atol = jnp.array([1e-10, 1e-11]), jnp.array([1e-12, 1e-13])
    y0 = jnp.array([2.0, 0.5])

    def loss(k, t):
        ys = odecore.odeint(
            lambda t, y, k: -k * y, y0, t, params=k, rtol=rtol, atol=atol, adjoint="backsolve"
        )
        return jnp.sum(ys[-1])

    k_bar, t_bar = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.7, jnp.array([0.0, 1.5]))
    y_end = 2.5 * math.exp(-0.7 * 1.5)
    np.testing.assert_allclose(float(k_bar), -1.5 * y_end, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(t_bar), [0.7 * y_end, -0.7 * y_end], rtol=1e-8)


def test_jit_of_grad_equals_grad(x64):
    # checkpoint: its backward outside jit is one loop; backsolve's is one solve per output.
    loss = _loss_fn("dopri5", "checkpoint")
    y0, t, params = jax_inputs()
    plain = jax.grad(loss, argnums=(0, 1, 2))(y0, t, params)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(y0, t, params)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(jitted), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-15)


@pytest.mark.slow  # grad of a jit runs in CI through the README example and the capture test
def test_grad_of_jit_equals_grad(x64):
    loss = _loss_fn("dopri5", "backsolve")
    y0, t, params = jax_inputs()
    plain = jax.grad(loss, argnums=(0, 2))(y0, t, params)
    outer = jax.grad(jax.jit(loss), argnums=(0, 2))(y0, t, params)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(outer), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-15)


def test_checkpoint_buffer_is_sized_by_max_num_steps(x64):
    """A solve that needs more steps than the buffer holds fails loudly (status and NaN
    gradients) rather than replaying a truncated tape."""
    y0, t, params = jax_inputs()

    def loss(y0, n):
        sol = odecore.solve(
            field,
            y0,
            t,
            params=params,
            adjoint="checkpoint",
            throw=False,
            rtol=1e-10,
            atol=1e-12,
            options={"max_num_steps": n},
        )
        return jnp.sum(sol.ys**2), sol

    (_, sol), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(y0, 10)
    assert int(sol.status) == Status.MAX_STEPS_REACHED
    assert bool(jnp.all(jnp.isnan(g)))
    (_, sol), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(y0, 1000)
    assert int(sol.status) == Status.SUCCESS
    assert int(sol.stats["nsteps"]) < 1000
    fd = _central_differences(jax.jit(lambda v: loss(v, 1000)[0]), y0)
    assert _relative(g, fd) < 1e-5


@pytest.mark.parametrize(
    "t, y0",
    [
        ([0.0, 1.0, 0.5], [1.0]),  # not monotonic
        ([0.0, math.nan], [1.0]),
        ([0.0, 1.0], [math.inf]),
    ],
)
def test_invalid_traced_inputs_give_a_status(x64, t, y0):
    """What eager checks reject becomes status INVALID_INPUT and NaN outputs under jit."""
    run = jax.jit(lambda y0, t: odecore.solve(lambda t, y: -y, y0, t))
    sol = run(jnp.asarray(y0), jnp.asarray(t))
    assert int(sol.status) == Status.INVALID_INPUT
    assert bool(jnp.all(jnp.isnan(sol.ys[1:])))
    with pytest.raises(ValueError):  # and outside jit the checks name the problem
        odecore.solve(lambda t, y: -y, jnp.asarray(y0), jnp.asarray(t))


def test_invalid_traced_rtol_gives_a_status(x64):
    y0, t, params = jax_inputs()
    run = jax.jit(lambda rtol: odecore.solve(field, y0, t, params=params, rtol=rtol))
    assert int(run(jnp.asarray(-1e-6)).status) == Status.INVALID_INPUT
    assert int(run(jnp.asarray(1e-6)).status) == Status.SUCCESS


def test_differentiating_a_captured_array_raises(x64):
    y0, t, (W_, b) = jax_inputs()

    def loss(b):
        return jnp.sum(odecore.odeint(lambda t, y: field(t, y, (W_, b)), y0, t))

    with pytest.raises(ValueError, match=r"pass it in params, as func\(t, y, params\)"):
        jax.grad(loss)(b)
    with pytest.raises(ValueError, match=r"pass it in params, as func\(t, y, params\)"):
        jax.jit(jax.grad(loss))(b)


@pytest.mark.parametrize("jitted", [False, True], ids=["grad", "jit_of_grad"])
@pytest.mark.parametrize(
    "setting",
    [
        lambda v: {"rtol": v},
        lambda v: {"atol": v, "adjoint": "checkpoint"},
        lambda v: {"adjoint_rtol": v},
        lambda v: {"options": {"max_step": v}},
        lambda v: {"options": {"jump_t": jnp.stack([v])}},
        lambda v: {"options": {"step_t": [v]}},
        lambda v: {"options": {"step_size": v}, "method": "rk4"},
    ],
    ids=["rtol", "atol", "adjoint_rtol", "max_step", "jump_t", "step_t", "step_size"],
)
def test_differentiating_a_tolerance_or_option_raises(x64, setting, jitted):
    """The rules have no gradient for tolerances and options. A differentiated jump_t or
    step_t got a NaN gradient without a word, and a tolerance or step size a raw
    ConcretizationTypeError (or "must be a number, got GradTracer")."""

    def final(v):
        kwargs = setting(v)
        ys = odecore.odeint(lambda t, y: -y, jnp.ones(1), jnp.asarray([0.0, 1.0]), **kwargs)
        return ys[-1, 0]

    gradient = jax.jit(jax.grad(final)) if jitted else jax.grad(final)
    with pytest.raises(ValueError, match="is being differentiated.*only y0, t and the arrays"):
        gradient(0.1)
    # Held constant, the same value solves.
    assert abs(float(final(0.1)) - math.exp(-1.0)) < 1e-3


def test_grad_of_jit_through_a_captured_array_is_nan_not_zero(x64):
    """Under grad(jit(f)) the capture cannot be seen while tracing: the gradient is NaN."""
    y0, t, (W_, b) = jax_inputs()

    @jax.jit
    def loss(y0, b):
        return jnp.sum(odecore.odeint(lambda t, y: field(t, y, (W_, b)), y0, t))

    g_y0, g_b = jax.grad(loss, argnums=(0, 1))(y0, b)
    assert bool(jnp.all(jnp.isnan(g_b)))
    # y0 alone is differentiable, and its gradient does not depend on the capture's.
    g_only = jax.grad(loss)(y0, b)
    fd = _central_differences(lambda v: loss(v, b), y0)
    assert _relative(g_only, fd) < 1e-6


def test_float32_gradients_without_x64():
    """float32 state and time (JAX's default): gradients within float32's reach of the same
    gradients in float64."""
    assert not jax.config.jax_enable_x64
    loss = _loss_fn("dopri5", "checkpoint")
    y0, t, params = jax_inputs(jnp.float32)
    g_y0, (g_W, g_b) = jax.jit(jax.grad(loss, argnums=(0, 2)))(y0, t, params)
    assert g_y0.dtype == jnp.float32
    with jax.enable_x64(True):
        loss64 = _loss_fn("dopri5", "checkpoint")
        r_y0, (r_W, r_b) = jax.jit(jax.grad(loss64, argnums=(0, 2)))(*jax_inputs())
    for got, ref in ((g_y0, r_y0), (g_W, r_W), (g_b, r_b)):
        assert _relative(np.asarray(got), np.asarray(ref)) < 1e-4


@pytest.mark.parametrize("mode", ["checkpoint", pytest.param("backsolve", marks=pytest.mark.slow)])
def test_batched_gradients_equal_per_sample_gradients(x64, mode):
    """batch_axis=0 under jit: each sample steps on its own (masked updates, a tape with
    per-sample accept masks), and its gradient equals that of solving it alone."""
    kw = _settings("dopri5", mode)
    y0s = jnp.asarray(np.stack([Y0, 3 * Y0, -Y0]))
    _, t, params = jax_inputs()

    def batched(y0s, params):
        ys = odecore.odeint(field, y0s, t, params=params, batch_axis=0, **kw)
        return jnp.sum(ys[:, 0] ** 2) + 0.5 * jnp.sum(ys[:, 1:] ** 3)

    def single(y0, params, i):
        ys = odecore.odeint(field, y0, t, params=params, **kw)
        return jnp.sum(ys**2) if i == 0 else 0.5 * jnp.sum(ys**3)

    g_y0s, (g_W, g_b) = jax.jit(jax.grad(batched, argnums=(0, 1)))(y0s, params)
    sum_W, sum_b = 0.0, 0.0
    for i in range(3):
        r_y0, (r_W, r_b) = jax.jit(jax.grad(single, argnums=(0, 1)), static_argnums=2)(
            y0s[i], params, i
        )
        np.testing.assert_allclose(np.asarray(g_y0s[i]), np.asarray(r_y0), rtol=1e-7)
        sum_W, sum_b = sum_W + np.asarray(r_W), sum_b + np.asarray(r_b)
    np.testing.assert_allclose(np.asarray(g_W), sum_W, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(g_b), sum_b, rtol=1e-7)


def test_step_and_jump_times_under_jit_match_numpy(x64):
    y0, t, params = jax_inputs()
    options = {"step_t": [0.25, 0.9, 5.0], "jump_t": [0.7]}

    def jumpy(t, y, params):
        return field(t, y, params) + jnp.where(t < 0.7, 0.0, 1.0)

    run = jax.jit(lambda y0, t, p: odecore.solve(jumpy, y0, t, params=p, options=options))
    sol = run(y0, t, params)

    def jumpy_np(t, y, params):
        return field(t, y, params) + (0.0 if t < 0.7 else 1.0)

    ref = odecore.solve(jumpy_np, Y0, TIMES, params=(W, B), options=options)
    np.testing.assert_allclose(np.asarray(sol.ys), ref.ys, rtol=1e-12, atol=1e-14)
    assert int(sol.stats["naccept"]) == ref.stats["naccept"]


@pytest.mark.parametrize("mode", ["checkpoint", pytest.param("backsolve", marks=pytest.mark.slow)])
def test_gradients_with_decreasing_traced_times(x64, mode):
    """A traced decreasing t: the direction is a run-time value (Dynamics.flip)."""
    kw = _settings("dopri5", mode)
    y0, t, params = jax_inputs()
    t = t[::-1]

    def loss(y0, t, b):
        ys = odecore.odeint(field, y0, t, params=(params[0], b), **kw)
        return jnp.sum(ys[1:] ** 2 * jnp.arange(1.0, 4.0)[:, None])

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(y0, t, params[1])
    fwd = jax.jit(loss)
    fd = (
        _central_differences(lambda v: fwd(v, t, params[1]), y0),
        _central_differences(lambda v: fwd(y0, v, params[1]), t),
        _central_differences(lambda v: fwd(y0, t, v), params[1]),
    )
    for got, ref in zip(grads, fd, strict=True):
        assert _relative(got, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# States of registered pytree types.


class Registered:
    """A state class registered with jax.tree_util.register_pytree_node."""

    def __init__(self, x, v):
        self.x, self.v = x, v


jax.tree_util.register_pytree_node(
    Registered, lambda s: ((s.x, s.v), None), lambda _, children: Registered(*children)
)


class Named(NamedTuple):
    x: object
    v: object


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Data:
    x: object
    v: object


@pytest.mark.parametrize("kind", [Registered, Named, Data], ids=["registered", "named", "data"])
@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_pytree_state_keeps_its_type_under_jit_and_grad(x64, kind, adjoint):
    """``x' = v, v' = -x``: ``x(T) = x0 cos T + v0 sin T``, so ``d x(T) / d (x0, v0) =
    (cos T, sin T)``."""

    def rate(t, y):
        assert type(y) is kind
        return kind(y.v, -y.x)

    t = jnp.asarray([0.0, 0.5, 1.5])
    kw = {"rtol": 1e-10, "atol": 1e-12, "adjoint": adjoint}

    def final_x(x0, v0):
        ys = odecore.odeint(rate, kind(x0, v0), t, **kw)
        assert type(ys) is kind
        return ys.x[-1, 0]

    x0, v0 = jnp.asarray([0.8]), jnp.asarray([-0.3])
    ys = odecore.odeint(rate, kind(x0, v0), t, **kw)
    assert type(ys) is kind and ys.x.shape == (3, 1)
    exact = 0.8 * np.cos(np.asarray(t)) - 0.3 * np.sin(np.asarray(t))
    # At rtol 1e-10 the global error over t <= 1.5 stays below 1e-8 for this O(1) state.
    np.testing.assert_allclose(np.asarray(ys.x[:, 0]), exact, atol=1e-8)
    for differentiate in (jax.grad, lambda f, **k: jax.jit(jax.grad(f, **k))):
        g_x0, g_v0 = differentiate(final_x, argnums=(0, 1))(x0, v0)
        np.testing.assert_allclose(float(g_x0[0]), np.cos(1.5), atol=1e-7)
        np.testing.assert_allclose(float(g_v0[0]), np.sin(1.5), atol=1e-7)


def test_pytree_state_of_another_type_returned_is_refused(x64):
    with pytest.raises(TypeError, match="where the state has a Registered"):
        odecore.odeint(
            lambda t, y: (y.v, -y.x),
            Registered(jnp.ones(1), jnp.zeros(1)),
            jnp.asarray([0.0, 1.0]),
        )


# --------------------------------------------------------------------------------------------
# Gradients skip the cotangents nobody asks for


def _differentiated(x):
    # JAX's JVP and linearize tracers carry a tangent; those of jit do not.
    return isinstance(x, jax.core.Tracer) and hasattr(x, "tangent")


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("compiled", ["jit", "eager"])
def test_gradient_of_y0_alone_skips_parameter_and_time_work(x64, mode, compiled):
    """Only y0 differentiated: the backward's VJPs do not differentiate the parameters and
    it evaluates no time gradient (every evaluation it makes is inside a VJP, or in the
    checkpoint's recomputation of the states, which sees the replay's run); the gradient is
    the closed form of a linear ODE."""
    a_matrix = np.array([[-0.5, 1.0], [-1.0, -0.3]])
    seen = []

    def linear(t, y, params):
        (a,) = params
        seen.append((_differentiated(y), _differentiated(a)))
        return y @ a.T

    t = jnp.asarray([0.0, 0.6, 1.3])
    params = (jnp.asarray(a_matrix),)

    def loss(y0):
        ys = odecore.odeint(linear, y0, t, params=params, rtol=1e-10, atol=1e-12, adjoint=mode)
        return jnp.sum(ys**2)

    if compiled == "jit":
        loss = jax.jit(loss)
    y0 = jnp.asarray(Y0)
    _, pullback = jax.vjp(loss, y0)
    if compiled == "jit":
        # Under jit the backward is traced apart from the forward, when the pullback runs;
        # an eager call's compiled solve traces it with the forward.
        seen.clear()
    (grad,) = pullback(1.0)
    assert any(state for state, _ in seen), "no VJP of the dynamics was traced"
    assert not any(param for _, param in seen)
    if mode == "backsolve" and compiled == "jit":
        # The backsolve evaluates only inside VJPs: a time gradient would not.
        assert all(state for state, _ in seen)
    # d/dy0 sum_i |e^{A t_i} y0|^2 = sum_i 2 e^{A t_i}^T e^{A t_i} y0; the solve's error
    # (rtol 1e-10 over a unit time) bounds the difference.
    from scipy.linalg import expm

    expected = sum(2 * expm(a_matrix * s).T @ expm(a_matrix * s) @ Y0 for s in np.asarray(t))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-7, atol=1e-9)


def _central_jacobian(fn, x, h):
    """Central differences of ``fn`` (returning an array) in each element of ``x``, stacked
    along a trailing axis."""
    x = np.asarray(x, dtype=np.float64)
    columns = []
    for i in range(x.size):
        step = np.zeros(x.size)
        step[i] = h
        step = step.reshape(x.shape)
        columns.append((np.asarray(fn(x + step)) - np.asarray(fn(x - step))) / (2 * h))
    return np.stack(columns, axis=-1).reshape(*np.shape(fn(x)), *x.shape)


def _pendulum(t, y, p):
    return jnp.stack([p[0] * y[1], -p[1] * jnp.sin(y[0])]) * (1.0 + 0.1 * t)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("wrt", ["params", "y0", "t"])
def test_hessians_match_finite_differences_of_the_gradient(x64, mode, wrt):
    # jax.hessian differentiates the rule's backward by forward mode: its residuals must
    # carry their tangents (a detached y(t1) gave the backsolve's Hessian a relative error
    # of 70%), and so must f(t1, y1), which the time gradient reads.
    y0, t, p = jnp.asarray([1.0, 0.5]), jnp.asarray([0.0, 0.7, 1.3]), jnp.asarray([1.2, 0.8])
    tol = {"rtol": 1e-11, "atol": 1e-13}

    def loss(x):
        inputs = {"y0": y0, "t": t, "params": p, wrt: x}
        ys = odecore.odeint(
            _pendulum, inputs["y0"], inputs["t"], params=inputs["params"], adjoint=mode, **tol
        )
        return jnp.sum(ys**2)

    x = {"y0": y0, "t": t, "params": p}[wrt]
    hessian = np.asarray(jax.hessian(loss)(x))
    # Differences of the gradient at h = 1e-4: truncation h^2 |g'''| ~ 1e-7, rounding of
    # the gradients (solved to 1e-11) over 2h ~ 1e-7.
    expected = _central_jacobian(jax.grad(loss), x, 1e-4)
    np.testing.assert_allclose(hessian, expected, rtol=0, atol=1e-6)


def test_a_flow_log_density_hessian_matches_finite_differences(x64):
    A = jnp.asarray([[-0.5, 0.3], [0.1, -0.2]])
    x = jnp.asarray([[1.0, -0.5], [0.3, 0.8]])

    def flow(t, z, a):
        return jnp.tanh(z @ a.T)

    def loss(a):
        return jnp.sum(odecore.cnf.log_prob(flow, x, (0.0, 1.0), a, rtol=1e-11, atol=1e-13))

    hessian = np.asarray(jax.hessian(loss)(A))
    expected = _central_jacobian(jax.grad(loss), A, 1e-4)
    np.testing.assert_allclose(hessian, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_second_derivative_of_an_event_time_raises(x64, mode):
    # The event time's gradient is the implicit function theorem's to first order; its
    # Hessian came out a quarter off. The first derivative stays available (tests/test_events.py).
    def decay(t, y, p):
        return -p[0] * y * (1.0 + p[1] * t)

    def event_time(p):
        return odecore.odeint_event(
            decay, jnp.asarray([2.0, 1.0]), 0.0, params=p,
            event_fn=lambda t, y, p: y[0] - 0.5, adjoint=mode,
        )[0]  # fmt: skip

    p = jnp.asarray([0.7, 0.3])
    assert np.all(np.isfinite(np.asarray(jax.grad(event_time)(p))))
    with pytest.raises(NotImplementedError, match="second-order derivatives of an event"):
        jax.hessian(event_time)(p)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"adjoint": "backsolve"},
        {"adjoint": "checkpoint"},
        {"method": "rk4", "adjoint": "backsolve"},
    ],
)
def test_reverse_over_reverse_is_refused_and_forward_over_reverse_is_exact(x64, kwargs):
    # grad of grad failed with JAX's words about lax.while_loop, which name no remedy.
    def y1(p):
        ys = odecore.odeint(
            lambda t, y, p: -p * y, jnp.asarray([1.0]), jnp.asarray([0.0, 1.0]), params=p,
            rtol=1e-11, atol=1e-13, options={"step_size": 1e-3} if "method" in kwargs else None,
            **kwargs,
        )  # fmt: skip
        return ys[-1, 0]

    p = jnp.asarray(0.7)
    refusal = r"^a reverse-mode derivative of an odecore gradient.*jax\.hessian\(loss\) or "
    for second in (jax.grad(jax.grad(y1)), jax.jit(jax.grad(jax.grad(y1)))):
        with pytest.raises(NotImplementedError, match=refusal + r"jax\.jacfwd\(jax\.grad"):
            second(p)
    # y(1) = exp(-p), so d2/dp2 = exp(-p). Adaptive: the gradient is the backsolve's (or
    # the discrete solve's) to about 1e-10 at these tolerances; rk4 at h = 1e-3: a global
    # error of about h^4 = 1e-12 in every derivative.
    for second in (jax.hessian(y1), jax.jacfwd(jax.grad(y1))):
        assert float(second(p)) == pytest.approx(math.exp(-0.7), rel=1e-8)
