"""The JAX backend where it used to go wrong: failures under grad, integer parameters, invalid
samples and stop times under jit, silent downcasts, and the cost of repeated eager calls.

References: closed forms, odecore's NumPy backend, and central finite differences in float64.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from backend_params import framework_module

pytestmark = pytest.mark.backend("jax")
jax = framework_module("jax")
jnp = jax.numpy

import odecore  # noqa: E402
from odecore import Status  # noqa: E402


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _central_differences(f, x, eps=1e-6):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    for j in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[j] += eps
        minus[j] -= eps
        out[j] = (float(f(jnp.asarray(plus))) - float(f(jnp.asarray(minus)))) / (2 * eps)
    return out


# --------------------------------------------------------------------------------------------
# A failed solve under grad raises SolveError


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_grad_of_a_failing_solve_raises_solve_error(x64, mode, batch_axis):
    """Outside jit the status is known, under grad too: the failure is reported by name,
    with the time reached, not by an error about tracers."""
    y0 = jnp.ones((2, 1)) if batch_axis == 0 else jnp.ones(1)

    def loss(y0):
        ys = odecore.odeint(
            lambda t, y: -y,
            y0,
            jnp.asarray([0.0, 50.0]),
            options={"max_num_steps": 5},
            adjoint=mode,
            batch_axis=batch_axis,
        )
        return jnp.sum(ys)

    with pytest.raises(odecore.SolveError, match=r"max_num_steps reached") as info:
        jax.grad(loss)(y0)
    # Five steps of dopri5 from t = 0 on y' = -y (a first step near 1e-1) end well before 50.
    assert 0.0 < float(np.max(np.asarray(info.value.solution.t_reached))) < 50.0
    # The time reached is a concrete number in the message, not a tracer.
    assert re.search(r"at t=-?\d", str(info.value))


# --------------------------------------------------------------------------------------------
# Integer and boolean parameters are constants


def _indexed(t, y, params):
    """``dy/dt = -rates[order] * y + shift``, the shift only where ``free``: an integer index
    array picks the rates, a boolean mask the shifted components."""
    shift = jnp.where(params["free"], params["shift"], 0.0)
    return -params["rates"][params["order"]] * y + shift


def _integer_params():
    return {
        "rates": jnp.asarray([0.5, 1.5, 0.8]),
        "order": jnp.asarray([2, 0]),
        "shift": jnp.asarray(0.25),
        "free": jnp.asarray([True, False]),
    }


def _indexed_loss(mode):
    t = jnp.asarray([0.0, 0.7, 1.3])
    y0 = jnp.asarray([1.0, -0.5])

    def loss(params):
        ys = odecore.odeint(_indexed, y0, t, params=params, adjoint=mode, rtol=1e-10, atol=1e-12)
        return jnp.sum(ys**2)

    return loss


@pytest.mark.parametrize("wrap", ["grad", "jit(grad)", "grad(jit)"])
@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_integer_parameter_is_a_constant(x64, mode, wrap):
    loss = _indexed_loss(mode)
    params = _integer_params()
    if wrap == "grad":
        grad = jax.grad(loss, allow_int=True)
    elif wrap == "jit(grad)":
        grad = jax.jit(jax.grad(loss, allow_int=True))
    else:
        grad = jax.grad(jax.jit(loss), allow_int=True)
    g = grad(params)
    assert g["order"].dtype == jax.dtypes.float0
    assert g["free"].dtype == jax.dtypes.float0
    for name in ("rates", "shift"):

        def along(value, name=name):
            return loss({**params, name: value})

        fd = _central_differences(along, params[name])
        # A perturbation of 1e-6 leaves the steps as they are, so the quotient is that of the
        # discrete solve, to O(1e-12) truncation and 1e-16 / 1e-6 rounding; the backsolve's
        # continuous adjoint differs from it by about the tolerance, 1e-10. 1e-5 of the
        # largest entry leaves a wide margin over both.
        scale = max(float(np.max(np.abs(fd))), 1.0)
        np.testing.assert_allclose(np.asarray(g[name]), fd, rtol=0, atol=1e-5 * scale)
    # rates[1] is never selected: its gradient is zero, not NaN.
    assert float(g["rates"][1]) == 0.0


# --------------------------------------------------------------------------------------------
# Validity under jit: per sample, except what the samples share


def _decay(t, y):
    return -y


TIMES = np.array([0.0, 0.5, 2.0])
BATCH = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])


def _exact(y0):
    return np.exp(-TIMES)[:, None] * y0


def test_per_element_tolerance_of_one_sample_invalidates_only_it(x64):
    atol = np.full(BATCH.shape, 1e-12)
    atol[2, 1] = -1.0
    run = jax.jit(
        lambda y0, t, atol: odecore.solve(
            _decay, y0, t, rtol=1e-10, atol=atol, batch_axis=0, throw=False
        )
    )
    sol = run(jnp.asarray(BATCH), jnp.asarray(TIMES), jnp.asarray(atol))
    assert [int(s) for s in sol.status] == [Status.SUCCESS, Status.SUCCESS, Status.INVALID_INPUT]
    assert bool(jnp.all(jnp.isnan(sol.ys[:, 2])))
    for i in (0, 1):
        # dopri5 at rtol 1e-10 to t = 2: a global error within a few hundred tolerances.
        np.testing.assert_allclose(np.asarray(sol.ys[:, i]), _exact(BATCH[i]), atol=1e-7)


@pytest.mark.parametrize("bad", ["t", "rtol"])
def test_invalid_shared_input_invalidates_every_sample(x64, bad):
    t = jnp.asarray([0.0, np.nan, 2.0]) if bad == "t" else jnp.asarray(TIMES)
    rtol = jnp.asarray(-1e-8) if bad == "rtol" else jnp.asarray(1e-8)
    run = jax.jit(lambda y0, t, rtol: odecore.solve(_decay, y0, t, rtol=rtol, batch_axis=0))
    sol = run(jnp.asarray(BATCH), t, rtol)
    assert [int(s) for s in sol.status] == [Status.INVALID_INPUT] * 3
    assert bool(jnp.all(jnp.isnan(sol.ys[1:])))


def test_one_non_finite_sample_under_jit_leaves_the_others(x64):
    y0 = BATCH.copy()
    y0[1, 0] = np.inf
    sol = jax.jit(lambda y0, t: odecore.solve(_decay, y0, t, batch_axis=0, rtol=1e-10))(
        jnp.asarray(y0), jnp.asarray(TIMES)
    )
    assert [int(s) for s in sol.status] == [Status.SUCCESS, Status.INVALID_INPUT, Status.SUCCESS]
    for i in (0, 2):
        np.testing.assert_allclose(np.asarray(sol.ys[:, i]), _exact(BATCH[i]), atol=1e-7)


@pytest.mark.parametrize("key", ["step_t", "jump_t"])
def test_nan_stop_time_under_jit_is_invalid_input(x64, key):
    run = jax.jit(
        lambda y0, stops: odecore.solve(
            _decay, y0, jnp.asarray(TIMES), batch_axis=0, options={key: stops}
        )
    )
    sol = run(jnp.asarray(BATCH), jnp.asarray([0.7, np.nan]))
    assert [int(s) for s in sol.status] == [Status.INVALID_INPUT] * 3
    assert bool(jnp.all(jnp.isnan(sol.ys[1:])))
    # The same stops without the NaN are solved.
    sol = run(jnp.asarray(BATCH), jnp.asarray([0.7, 1.2]))
    assert [int(s) for s in sol.status] == [Status.SUCCESS] * 3
    with pytest.raises(ValueError, match=rf"options\['{key}'\] contains NaN"):
        odecore.solve(_decay, jnp.asarray(BATCH), jnp.asarray(TIMES), options={key: [np.nan]})


# --------------------------------------------------------------------------------------------
# Never downcast silently


_DOWNCAST_SCRIPT = """
import json, sys, warnings
import numpy as np
import jax
import odecore

case = sys.argv[1]
if case == "x64":
    jax.config.update("jax_enable_x64", True)
state = np.float64 if case in ("y0", "x64") else np.float32
y0 = np.array([1.0, -0.5], dtype=state)
t = np.array([0.0, 1.0], dtype=state)
rate = np.array(0.7, dtype=np.float64 if case in ("params", "x64") else np.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        odecore.odeint(lambda t, y, k: -k * y, y0, t, params=rate, backend="jax")
print(json.dumps([
    [issubclass(w.category, odecore.PrecisionWarning), issubclass(w.category, UserWarning),
     str(w.message)]
    for w in caught
]))
"""


def _warnings_in_a_fresh_process(case):
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _DOWNCAST_SCRIPT, case],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["y0", "params"])
def test_float64_input_without_x64_warns_once(case):
    """float64 y0 and t (or only params) on the 'jax' backend without x64: one warning per
    process, naming the fix."""
    caught = _warnings_in_a_fresh_process(case)
    assert len(caught) == 1, caught
    is_precision, is_user, message = caught[0]
    assert is_precision and is_user
    assert 'jax.config.update("jax_enable_x64", True)' in message


@pytest.mark.parametrize("case", ["x64", "float32"])
def test_no_precision_warning_without_a_downcast(case):
    assert _warnings_in_a_fresh_process(case) == []


def test_cli_solves_float64_problems_in_float64_on_jax(capsys):
    """The problems are float64: the CLI's JAX solve matches the NumPy backend's to rounding,
    where a float32 solve is off by about 1e-5 (its rounding accumulated over 10 time units)."""
    from odecore.cli import main

    assert not jax.config.jax_enable_x64
    finals, errors = {}, {}
    for backend in ("numpy", "jax"):
        argv = ["solve", "harmonic", "--rtol", "1e-10", "--atol", "1e-12", "--backend", backend]
        assert main(argv) == 0
        out = capsys.readouterr().out
        line = next(s for s in out.splitlines() if s.startswith("final state:"))
        finals[backend] = np.array([float(v) for v in line.split("[")[1].rstrip("]").split(",")])
        line = next(s for s in out.splitlines() if s.startswith("max abs error:"))
        errors[backend] = float(line.split()[-1])
    assert not jax.config.jax_enable_x64  # the CLI switched x64 on for its solve only
    # The same algorithm in float64 on both backends: they differ by rounding in the error
    # control's sums, far below the solve's own error (about 7e-10 against the closed form).
    np.testing.assert_allclose(finals["jax"], finals["numpy"], rtol=1e-11)
    assert errors["jax"] < 1e-8


# --------------------------------------------------------------------------------------------
# Repeated eager calls reuse one compiled solve


W = np.array([[-0.5, 1.0], [-1.0, -0.3]])
B = np.array([0.1, -0.2])
Y0 = np.array([0.3, -0.4])
FIELD_TIMES = np.array([0.0, 0.4, 1.1, 1.5])


def _field(t, y, params):
    """``tanh(y W^T) + b sin(2t)``: nonlinear, non-autonomous; works on any array library."""
    W_, b = params
    xp = y.__array_namespace__() if hasattr(y, "__array_namespace__") else np
    s = xp.sin(2 * xp.asarray(t))
    return xp.tanh(y @ W_.T) + b * (s[..., None] if s.ndim else s)


def _counting_field():
    """``_field`` for the JAX solves, and the list its evaluations append to. Under JAX they
    run only while func is traced, never when compiled code runs: the list counts traces."""
    traces = []

    def field(t, y, params):
        traces.append(1)
        return _field(t, y, params)

    return field, traces


def _jax(*arrays):
    return [jnp.asarray(a) for a in arrays]


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_repeated_eager_calls_do_not_retrace(x64, batch_axis):
    field, traces = _counting_field()
    y0 = Y0 if batch_axis is None else np.stack([Y0, -2 * Y0])
    calls = [  # (y0, t, W, b, rtol, atol): new values of the same shapes and dtypes
        (y0, FIELD_TIMES, W, B, 1e-7, 1e-9),
        (1.5 * y0, FIELD_TIMES, W, B, 1e-7, 1e-9),
        (y0, 2.0 * FIELD_TIMES[::-1], W, B, 1e-7, 1e-9),
        (y0, FIELD_TIMES, 0.5 * W, -B, 1e-7, 1e-9),
        (y0, FIELD_TIMES, W, B, 1e-10, 1e-12),
    ]
    for i, (y0_, t, W_, b, rtol, atol) in enumerate(calls):
        y0_j, t_j, W_j, b_j = _jax(y0_, t, W_, b)
        kw = {"rtol": rtol, "atol": atol, "batch_axis": batch_axis}
        ys = odecore.odeint(field, y0_j, t_j, params=(W_j, b_j), **kw)
        if i == 0:
            assert traces, "the first call traces func"
            traces.clear()
        # The NumPy backend takes the same steps; the two differ by rounding.
        ref = odecore.odeint(_field, y0_, t, params=(W_, b), backend="numpy", **kw)
        np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-12, atol=1e-14)
    assert traces == [], f"func was traced again, {len(traces)} evaluations"


@pytest.mark.parametrize("option, values", [("step_size", [0.1, 0.05]), ("step_t", [[0.3], [0.6]])])
def test_new_step_sizes_and_stop_times_do_not_retrace(x64, option, values):
    field, traces = _counting_field()
    method = "rk4" if option == "step_size" else "dopri5"
    for i, value in enumerate(values):
        kw = {"method": method, "options": {option: value}}
        ys = odecore.odeint(field, *_jax(Y0, FIELD_TIMES), params=tuple(_jax(W, B)), **kw)
        if i == 0:
            traces.clear()
        ref = odecore.odeint(_field, Y0, FIELD_TIMES, params=(W, B), backend="numpy", **kw)
        np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-12, atol=1e-14)
    assert traces == []


def test_repeated_eager_call_is_fast(x64):
    """A call that traced and compiled its loops took about half a second on two cores; a
    compiled call with its dispatch and checks takes a few milliseconds at most, so 0.1 s
    leaves room for a loaded machine and still fails for any recompilation."""
    import statistics
    import time

    field, _ = _counting_field()
    y0, t, W_, b = _jax(Y0, FIELD_TIMES, W, B)
    odecore.odeint(field, y0, t, params=(W_, b)).block_until_ready()
    times = []
    for i in range(10):
        start = time.perf_counter()
        odecore.odeint(field, y0 + 0.01 * i, t, params=(W_, b)).block_until_ready()
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.1, times


def _resident_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_repeated_eager_calls_do_not_grow_memory(x64):
    """A call that kept what it traced held about 6 MB that nothing freed (1.2 GB over these
    200 calls); a compiled call keeps nothing. 50 MB is far below the first and far above
    the allocator's noise."""
    import gc
    import os

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("reads the resident set size from /proc")
    field, _ = _counting_field()
    y0, t, W_, b = _jax(Y0, FIELD_TIMES, W, B)
    for i in range(5):  # compile, and let the allocator reach its working size
        odecore.odeint(field, y0 + 0.01 * i, t, params=(W_, b)).block_until_ready()
    gc.collect()
    before = _resident_mb()
    for i in range(200):
        odecore.odeint(field, y0 + 1e-3 * i, t, params=(W_, b)).block_until_ready()
    gc.collect()
    assert _resident_mb() - before < 50


@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_grad_of_eager_calls_reuses_the_compiled_solve(x64, mode):
    field, traces = _counting_field()
    t = jnp.asarray(FIELD_TIMES)

    def loss(y0, b):
        ys = odecore.odeint(field, y0, t, params=(jnp.asarray(W), b), adjoint=mode, rtol=1e-10)
        return jnp.sum(ys**2)

    y0, b = _jax(Y0, B)
    jax.grad(loss, argnums=(0, 1))(y0, b)
    traces.clear()
    g_y0, g_b = jax.grad(loss, argnums=(0, 1))(y0 + 0.1, b)
    assert traces == []
    # Central differences of the forward solve: the steps stay put under a 1e-6
    # perturbation, so they differentiate the discrete solve to O(1e-12) plus rounding
    # 1e-16 / 1e-6; the adjoint is within the tolerance (1e-10) of it.
    fd_y0 = _central_differences(lambda v: loss(v, b), y0 + 0.1)
    fd_b = _central_differences(lambda v: loss(y0 + 0.1, v), b)
    np.testing.assert_allclose(np.asarray(g_y0), fd_y0, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_b), fd_b, rtol=1e-6, atol=1e-8)


def test_a_dead_func_frees_its_compiled_solve(x64):
    import gc
    import weakref

    def make():
        scale = jnp.asarray(0.5)
        return lambda t, y: -scale * y

    func = make()
    alive = weakref.ref(func)
    odecore.odeint(func, jnp.ones(3), jnp.asarray([0.0, 1.0]))
    del func
    gc.collect()
    assert alive() is None


def test_eager_call_under_disable_jit(x64):
    """With jit disabled the compiled solve runs its Python as it is; it must not call
    itself again, and solves as a compiled one does."""
    field, _ = _counting_field()
    with jax.disable_jit():
        ys = odecore.odeint(field, *_jax(Y0, FIELD_TIMES), params=tuple(_jax(W, B)), rtol=1e-6)
    ref = odecore.odeint(_field, Y0, FIELD_TIMES, params=(W, B), backend="numpy", rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# An index past an array's end raises, as on NumPy, instead of being clamped


def _lorenz(xp):
    """Lorenz with its three parameters read from ``p``, on the last axis of ``y``."""

    def f(t, y, p):
        x, v, z = y[..., 0], y[..., 1], y[..., 2]
        return xp.stack([p[0] * (v - x), x * (p[1] - z) - v, x * v - p[2] * z], axis=-1)

    return f


_LORENZ_Y0 = [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]]


def _lorenz_solve(how, params, backend="jax"):
    xp = jnp if backend == "jax" else np
    f, t = _lorenz(xp), xp.asarray([0.0, 0.1, 0.2])
    y0 = xp.asarray(_LORENZ_Y0)
    if how == "batch":
        return odecore.odeint(f, y0, t, params=params, batch_axis=0)
    if how == "eager":
        return odecore.odeint(f, y0[0], t, params=params)
    if how == "jit":
        return jax.jit(lambda p: odecore.odeint(f, y0[0], t, params=p))(params)
    loss = lambda p: jnp.sum(odecore.odeint(f, y0[0], t, params=p, adjoint=how))  # noqa: E731
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("how", ["eager", "jit", "backsolve", "checkpoint", "batch"])
def test_an_index_past_the_parameters_end_raises_as_on_numpy(x64, how):
    """JAX reads ``p[2]`` of two parameters as ``p[1]``: the solve would run with beta = rho.
    NumPy raises IndexError from func's own line; the JAX backend raises before it solves."""
    with pytest.raises(IndexError, match="index 2 is out of bounds for axis 0 with size 2"):
        _lorenz_solve("eager", np.asarray([10.0, 28.0]), backend="numpy")
    with pytest.raises(IndexError, match=r"func indexes past the end of an array.*size 2"):
        _lorenz_solve(how, jnp.asarray([10.0, 28.0]))
    # With its third parameter the same func solves, and as NumPy does.
    p = [10.0, 28.0, 8.0 / 3.0]
    if how in ("eager", "batch"):
        ref = _lorenz_solve(how, np.asarray(p), backend="numpy")
        got = _lorenz_solve(how, jnp.asarray(p))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-12)
    else:
        assert np.all(np.isfinite(np.asarray(_lorenz_solve(how, jnp.asarray(p)))))


@pytest.mark.parametrize("jitted", [False, True])
def test_an_event_indexing_past_its_parameters_raises(x64, jitted):
    """An event reading ``p[3]`` of two parameters watched ``p[1]`` instead (JAX clamps the
    index) and fired where that one is crossed; NumPy raises, and so does the JAX backend.
    With the index in range, the crossing of y = e^{-k t} through c = p[1]: log(1/c) / k."""

    def solve(p, index):
        return odecore.solve(
            lambda t, y, p: -p[0] * y, jnp.asarray([1.0]), jnp.asarray([0.0, 2.0]), params=p,
            event=[lambda t, y, p: y[0] - p[index]], rtol=1e-10, atol=1e-12,
        ).events.t  # fmt: skip

    run = jax.jit(solve, static_argnums=1) if jitted else solve
    p = jnp.asarray([0.5, 0.7])
    with pytest.raises(IndexError, match=r"event indexes past the end of an array.*size 2"):
        run(p, 3)
    np.testing.assert_allclose(float(run(p, 1)), np.log(1 / 0.7) / 0.5, rtol=1e-8)


def test_an_index_computed_from_traced_values_is_not_refused(x64):
    """``p[argmax(p)]`` is in range for every ``p``, but the check cannot know which element
    it reads before the values exist: it is left to run, and gives exp(-max(p) t)."""

    def decay(t, y, p):
        return -p[jnp.argmax(p)] * y

    t = jnp.asarray([0.0, 0.5, 1.0])
    exact = np.exp(-1.7 * np.asarray(t))[:, None] * np.ones(2)

    def solve(p):
        return odecore.odeint(decay, jnp.ones(2), t, params=p, rtol=1e-10, atol=1e-12)

    p = jnp.asarray([0.3, 1.7, 0.9])
    np.testing.assert_allclose(np.asarray(solve(p)), exact, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(jax.jit(solve)(p)), exact, rtol=1e-8)
    # Without jit the values are known, and the index is checked at them.
    with jax.disable_jit():
        np.testing.assert_allclose(np.asarray(solve(p)), exact, rtol=1e-8)


@pytest.mark.parametrize("jitted", [False, True])
def test_a_fixed_point_map_indexing_past_its_parameters_raises(x64, jitted):
    """A fixed-point map that reads ``p[3]`` of three parameters: IndexError, as on NumPy;
    with four, the fixed point of z = 0.5 tanh(0.3 z) + 0.1, found by iterating in float64."""

    def fmap(xp):
        return lambda z, p: 0.5 * xp.tanh(z * p[3]) + p[0]

    with pytest.raises(IndexError, match="index 3 is out of bounds"):
        odecore.fixed_point(fmap(np), np.zeros(4), params=np.asarray([0.1, 1.0, 2.0]))
    solve = lambda p: odecore.fixed_point(fmap(jnp), jnp.zeros(4), params=p, tol=1e-12)  # noqa: E731
    if jitted:
        solve = jax.jit(solve)
    with pytest.raises(IndexError, match=r"f indexes past the end of an array.*size 3"):
        solve(jnp.asarray([0.1, 1.0, 2.0]))
    z = 0.0
    for _ in range(200):
        z = 0.5 * np.tanh(0.3 * z) + 0.1
    got = solve(jnp.asarray([0.1, 1.0, 2.0, 0.3]))
    np.testing.assert_allclose(np.asarray(got), np.full(4, z), rtol=1e-8)


# --------------------------------------------------------------------------------------------
# A checkpoint tape larger than the memory left is refused before it is allocated


def _decay_gradient(max_num_steps):
    t = jnp.asarray([0.0, 0.5, 1.0])

    def loss(y0):
        ys = odecore.odeint(
            lambda t, y: -y,
            y0,
            t,
            adjoint="checkpoint",
            rtol=1e-10,
            atol=1e-12,
            options={"max_num_steps": max_num_steps},
        )
        return jnp.sum(ys)

    return jax.jit(jax.grad(loss))(jnp.ones(2))


def test_a_checkpoint_tape_larger_than_the_memory_left_is_refused(x64, monkeypatch):
    """The JAX tape holds the times of max_num_steps steps, allocated before the solve. On
    the CPU a tape larger than memory was not an error: the process was killed when it was
    written (max_num_steps = 1e9 needs 23 GiB). 1e13 steps need 227 TiB, more than any
    machine has."""
    with pytest.raises(ValueError, match=r"max_num_steps'\] = 10000000000000.*GiB of memory left"):
        _decay_gradient(10**13)
    # 1e5 steps need 2.4 MiB: refused under a limit of 1 MiB, solved under 10 MiB, with
    # the gradient of sum(y0 exp(-t)) over t = 0, 0.5, 1.
    backend_type = type(odecore.get_backend("jax"))
    monkeypatch.setattr(backend_type, "allocation_limit", lambda self: 2**20)
    with pytest.raises(ValueError, match="use adjoint='backsolve'"):
        _decay_gradient(10**5)
    monkeypatch.setattr(backend_type, "allocation_limit", lambda self: 10 * 2**20)
    exact = 1.0 + math.exp(-0.5) + math.exp(-1.0)
    np.testing.assert_allclose(np.asarray(_decay_gradient(10**5)), [exact, exact], rtol=1e-8)


@pytest.mark.parametrize("key", ["max_num_steps", "max_events"])
def test_a_traced_buffer_size_is_refused_naming_what_it_must_be(x64, key):
    # It sizes the solve's buffers, so it must be known when the solve is traced; the
    # message said "must be a positive integer, got JitTracer(~int64[])" of a positive int.
    def solve(n):
        return odecore.odeint(
            lambda t, y: -y, jnp.ones(1), jnp.linspace(0.0, 1.0, 3), options={key: n},
            event=(lambda t, y: y[0] - 0.5) if key == "max_events" else None,
        )  # fmt: skip

    with pytest.raises(TypeError, match=rf"options\['{key}'\] is traced here; .* Python int"):
        jax.jit(solve)(10)
    got = jax.jit(solve, static_argnums=0)(10)
    assert np.isfinite(np.asarray(got)[1]).all()
