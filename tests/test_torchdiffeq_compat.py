"""torchdiffeq's calling conventions: structured states (tuples, and pytrees of arrays).

References: closed forms (the harmonic oscillator ``x'' = -k x`` as ``(x, v)``, whose
solution and gradients are known), torchdiffeq itself on the same problem, and central
finite differences of the closed form.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import odecore

T_END = 1.7
TIMES = np.array([0.0, 0.6, T_END])
X0 = np.array([0.8, -0.3])
V0 = np.array([0.2, 0.5])
K = 1.7
# Solved at rtol 1e-10 / atol 1e-12 (dopri5): the global error over these times stays well
# under 1e-8 for these O(1) states.
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
CLOSE = 1e-8


def oscillator_exact(x0, v0, k, t):
    """``(x(t), v(t))`` of ``x'' = -k x``: ``x = x0 cos(wt) + v0/w sin(wt)``, ``w = sqrt k``."""
    w = math.sqrt(k)
    t = np.asarray(t)[:, None]
    x = x0 * np.cos(w * t) + v0 / w * np.sin(w * t)
    v = -x0 * w * np.sin(w * t) + v0 * np.cos(w * t)
    return x, v


def oscillator(t, y, params=None):
    x, v = y
    k = 1.0 if params is None else params[0]
    return (v, -k * x)


def test_tuple_state_matches_closed_form(backend):
    y0 = (backend.asarray(X0), backend.asarray(V0))
    ys = odecore.odeint(oscillator, y0, backend.asarray(TIMES), **TIGHT)
    assert isinstance(ys, tuple) and len(ys) == 2
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    assert tuple(ys[0].shape) == (3, 2)
    np.testing.assert_allclose(backend.to_numpy(ys[0]), x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(ys[1]), v, rtol=0, atol=CLOSE)


def test_nested_dict_and_list_state_keeps_its_structure(backend):
    def field(t, y):
        return {"pos": [y["vel"][0]], "vel": (-y["pos"][0],)}

    y0 = {"pos": [backend.asarray(X0)], "vel": (backend.asarray(V0),)}
    ys = odecore.odeint(field, y0, backend.asarray(TIMES), **TIGHT)
    assert set(ys) == {"pos", "vel"}
    assert isinstance(ys["pos"], list) and isinstance(ys["vel"], tuple)
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    np.testing.assert_allclose(backend.to_numpy(ys["pos"][0]), x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(ys["vel"][0]), v, rtol=0, atol=CLOSE)


def test_batched_structured_state_per_sample(backend):
    # Samples along axis 1 of each part: each column is its own oscillator with its own x0.
    x0 = np.array([[0.8, -0.3, 0.1]])
    v0 = np.array([[0.2, 0.5, -0.7]])
    y0 = (backend.asarray(x0), backend.asarray(v0))
    sol = odecore.solve(oscillator, y0, backend.asarray(TIMES), batch_axis=1, **TIGHT)
    x, v = oscillator_exact(x0[0], v0[0], 1.0, TIMES)
    assert tuple(sol.ys[0].shape) == (3, 1, 3)
    np.testing.assert_allclose(backend.to_numpy(sol.ys[0])[:, 0], x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(sol.ys[1])[:, 0], v, rtol=0, atol=CLOSE)
    assert backend.to_numpy(sol.stats["naccept"]).shape == (3,)


def _closed_form_loss(x0, v0, k, wx, wv):
    x, v = oscillator_exact(x0, v0, k, [T_END])
    return float(np.sum(wx * x[-1]) + np.sum(wv * v[-1]))


def _reference_gradients(wx, wv):
    """d/dx0, d/dv0 and d/dk of ``wx . x(T) + wv . v(T)``, by central differences of the
    closed form (step 1e-6: truncation ~1e-12, roundoff ~1e-10 relative)."""
    eps = 1e-6
    grads = []
    for which in range(2):
        g = np.zeros(2)
        for i in range(2):
            e = np.zeros(2)
            e[i] = eps
            args_p = [X0 + e, V0] if which == 0 else [X0, V0 + e]
            args_m = [X0 - e, V0] if which == 0 else [X0, V0 - e]
            g[i] = (
                _closed_form_loss(*args_p, K, wx, wv) - _closed_form_loss(*args_m, K, wx, wv)
            ) / (2 * eps)
        grads.append(g)
    dk = (
        _closed_form_loss(X0, V0, K + eps, wx, wv) - _closed_form_loss(X0, V0, K - eps, wx, wv)
    ) / (2 * eps)
    return grads[0], grads[1], dk


WX = np.array([1.0, -0.5])
WV = np.array([0.3, 0.7])
# The solve's error (TIGHT) is ~1e-9 and a gradient mode's is of the same order; 1e-6
# leaves room for the backsolve's adjoint error at its default tolerances (the forward's).
GRAD_CLOSE = 1e-6


def _gradients(backend, mode):
    """d/dx0, d/dv0, d/dk of ``WX . x(T) + WV . v(T)`` through odecore on ``backend``."""
    name = backend.name
    t = backend.asarray([0.0, T_END])
    if name == "torch":
        import torch

        x0, v0, k = (
            torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (X0, V0, [K])
        )
        ys = odecore.odeint(oscillator, (x0, v0), t, params=(k,), adjoint=mode, **TIGHT)
        loss = (ys[0][-1] * torch.tensor(WX)).sum() + (ys[1][-1] * torch.tensor(WV)).sum()
        loss.backward()
        return x0.grad.numpy(), v0.grad.numpy(), float(k.grad[0])
    if name == "jax":
        import jax
        import jax.numpy as jnp

        def loss(x0, v0, k):
            ys = odecore.odeint(oscillator, (x0, v0), t, params=(k,), adjoint=mode, **TIGHT)
            return jnp.sum(ys[0][-1] * WX) + jnp.sum(ys[1][-1] * WV)

        g = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(X0), jnp.asarray(V0), jnp.asarray([K]))
        return np.asarray(g[0]), np.asarray(g[1]), float(g[2][0])
    ys, pullback = odecore.vjp_odeint(
        OscillatorWithVjp(),
        (X0, V0),
        np.array([0.0, T_END]),
        (np.array([K]),),
        adjoint=mode,
        **TIGHT,
    )
    zeros = np.zeros((2, 2))
    y0_bar, params_bar, _ = pullback((np.stack([zeros[0], WX]), np.stack([zeros[0], WV])))
    return y0_bar[0], y0_bar[1], float(params_bar[0][0])


class OscillatorWithVjp:
    """NumPy dynamics with their own VJP, on the structured state ``(x, v)``."""

    def __call__(self, t, y, params):
        return oscillator(t, y, params)

    def vjp(self, t, y, params, cot):
        x, _ = y
        cx, cv = cot
        k = params[0]
        return (-k * cv, cx), (np.array([-np.sum(cv * x)]),)


MODES = {"numpy": ["checkpoint", "backsolve"], "torch": ["direct", "backsolve", "checkpoint"]}
MODES["jax"] = ["backsolve", "checkpoint"]


# JAX compiles each gradient mode's forward and backward: seconds per case.
@pytest.mark.parametrize(
    "mode", ["direct", "backsolve", pytest.param("checkpoint", marks=pytest.mark.slow_on("jax"))]
)
def test_structured_gradients_match_finite_differences(backend, mode):
    if mode not in MODES.get(backend.name, []):
        pytest.skip(f"{backend.name} has no {mode!r} mode")
    gx, gv, gk = _gradients(backend, mode)
    rx, rv, rk = _reference_gradients(WX, WV)
    np.testing.assert_allclose(gx, rx, rtol=0, atol=GRAD_CLOSE)
    np.testing.assert_allclose(gv, rv, rtol=0, atol=GRAD_CLOSE)
    assert abs(gk - rk) < GRAD_CLOSE


@pytest.mark.backend("torch")
def test_mixed_dtypes_keep_their_own_dtype_and_solve_in_the_wider():
    import torch

    x0 = torch.tensor(X0, dtype=torch.float32, requires_grad=True)
    v0 = torch.tensor(V0, dtype=torch.float64, requires_grad=True)
    seen = set()

    def field(t, y):
        x, v = y
        seen.add((x.dtype, v.dtype))
        return (v.to(x.dtype), -x.to(v.dtype))

    # rtol 1e-10 is below float32's roundoff: the float32 part cannot hold it (see below),
    # and is named, although the parts are solved in float64.
    with pytest.warns(odecore.PrecisionWarning, match=r"roundoff of y0\[0\]'s dtype float32"):
        ys = odecore.odeint(field, (x0, v0), torch.tensor(TIMES), **TIGHT)
    assert seen == {(torch.float32, torch.float64)}
    assert ys[0].dtype == torch.float32 and ys[1].dtype == torch.float64
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    # The loop integrates in float64; func rounds x (and returns x') to float32 each call, so
    # the solution carries float32 roundoff (~6e-8 relative) per evaluation, not the solver's.
    np.testing.assert_allclose(ys[0].detach().numpy(), x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ys[1].detach().numpy(), v, rtol=0, atol=1e-6)
    (ys[0][-1].sum() + ys[1][-1].sum()).backward()
    assert x0.grad.dtype == torch.float32 and v0.grad.dtype == torch.float64
    # A tolerance float32 resolves gets no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", odecore.PrecisionWarning)
        odecore.odeint(field, (x0, v0), torch.tensor(TIMES), rtol=1e-6, atol=1e-8)


@pytest.mark.backend("torch")
def test_tuple_state_matches_torchdiffeq_values_and_work():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    import torch

    # Parts of very different size and error: a single RMS over all 41 elements would dilute
    # the small, fast part's error and take fewer steps; torchdiffeq's norm of a tuple (and
    # odecore's) is the largest RMS of any part.
    def field(t, y):
        fast, slow = y
        return (torch.cos(5 * t) * fast, -0.01 * slow)

    calls = {"n": 0}

    def counted(t, y):
        calls["n"] += 1
        return field(t, y)

    y0 = (torch.tensor([1.0], dtype=torch.float64), torch.ones(40, dtype=torch.float64))
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    kwargs = {"rtol": 1e-6, "atol": (1e-8, 1e-6)}
    ours = odecore.odeint(counted, y0, t, **kwargs)
    our_calls, calls["n"] = calls["n"], 0
    theirs = torchdiffeq.odeint(counted, y0, t, **kwargs)
    their_calls = calls["n"]
    exact_fast = torch.exp(torch.sin(5 * t) / 5)
    # Both accurate to the tolerance's order, and the same work: same method, controller and
    # norm (torchdiffeq counts the same evaluations; odecore's dopri5 error weights differ,
    # which moves a step or two).
    # The global error is a few times rtol; the two libraries end the solve differently, so
    # they agree to the sum of their errors, not bit for bit.
    assert float((ours[0][:, 0] - exact_fast).abs().max()) < 2e-5
    assert float((theirs[0][:, 0] - exact_fast).abs().max()) < 2e-5
    assert float((ours[1] - theirs[1]).abs().max()) < 2e-5
    assert abs(our_calls - their_calls) <= 0.05 * their_calls


@pytest.mark.backend("jax")
def test_structured_state_under_jit_and_eager_compiled_once():
    import jax
    import jax.numpy as jnp

    traces = []

    def field(t, y):
        traces.append(t)  # runs only while JAX traces
        return {"x": y["v"], "v": -y["x"]}

    with jax.enable_x64(True):
        t = jnp.asarray(TIMES)
        ys = jax.jit(lambda y0: odecore.odeint(field, y0, t, **TIGHT))(
            {"x": jnp.asarray(X0), "v": jnp.asarray(V0)}
        )
        # An eager call runs through a compiled solve kept for the user's func: the second
        # call traces nothing.
        odecore.odeint(field, {"x": jnp.asarray(X0), "v": jnp.asarray(V0)}, t, **TIGHT)
        traced = len(traces)
        odecore.odeint(field, {"x": jnp.asarray(X0 + 1), "v": jnp.asarray(V0)}, t, **TIGHT)
        assert len(traces) == traced
    ys = (ys["x"], ys["v"])
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    np.testing.assert_allclose(np.asarray(ys[0]), x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(np.asarray(ys[1]), v, rtol=0, atol=CLOSE)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _solve_tuple(backend, func, **kwargs):
    y0 = (backend.asarray(X0), backend.asarray(V0))
    return odecore.odeint(func, y0, backend.asarray(TIMES), **kwargs)


def test_func_returning_another_structure_is_refused(backend):
    with pytest.raises(
        ValueError, match=r"func returned a tuple of 3 parts at dy/dt.*same structure"
    ):
        _solve_tuple(backend, lambda t, y: (y[1], -y[0], y[0]))
    with pytest.raises(
        TypeError, match=r"func returned a \w+ at dy/dt, where the state has a tuple"
    ):
        _solve_tuple(backend, lambda t, y: y[0])


def test_func_returning_a_wrong_part_is_refused(backend):
    with pytest.raises(ValueError, match=r"shape \(1,\) at dy/dt\[1\].*shape \(2,\)"):
        _solve_tuple(backend, lambda t, y: (y[1], y[0][:1]))
    with pytest.raises(TypeError, match=r"dtype .* at dy/dt\[0\]"):
        _solve_tuple(backend, lambda t, y: (backend.xp.astype(y[1], backend.xp.float32), -y[0]))
    with pytest.raises(TypeError, match=r"returned a float at dy/dt\[0\]; return a"):
        _solve_tuple(backend, lambda t, y: (1.0, -y[0]))
    with pytest.raises(TypeError, match=r"returned a list of 2 parts at dy/dt\[0\], where"):
        _solve_tuple(backend, lambda t, y: ([1.0, 2.0], -y[0]))


def test_dict_keys_must_match(backend):
    y0 = {"x": backend.asarray(X0), "v": backend.asarray(V0)}
    with pytest.raises(
        ValueError, match=r"keys \['v', 'y'\] at dy/dt, where the state has keys \['v', 'x'\]"
    ):
        odecore.odeint(lambda t, y: {"y": y["v"], "v": -y["x"]}, y0, backend.asarray(TIMES))


def test_bad_parts_of_y0_are_named(backend):
    t = backend.asarray(TIMES)
    with pytest.raises(TypeError, match=r"y0\[1\] must have a real floating dtype"):
        odecore.odeint(oscillator, (backend.asarray(X0), backend.asarray([1, 2], "int64")), t)
    with pytest.raises(ValueError, match=r"y0\[0\] contains NaN"):
        odecore.odeint(oscillator, (backend.asarray([math.nan, 0.0]), backend.asarray(V0)), t)
    with pytest.raises(ValueError, match="same number of samples"):
        y0 = (backend.asarray(np.ones((2, 3))), backend.asarray(np.ones((2, 4))))
        odecore.odeint(oscillator, y0, t, batch_axis=1)


def test_an_ordered_dict_state_stays_one(backend):
    # JAX keeps an OrderedDict as its own pytree type; it had reached func, and come back,
    # as a plain dict.
    from collections import OrderedDict

    seen = []

    def field(t, y):
        seen.append(type(y))
        return OrderedDict(pos=y["vel"], vel=-y["pos"])

    y0 = OrderedDict(pos=backend.asarray(X0), vel=backend.asarray(V0))
    ys = odecore.odeint(field, y0, backend.asarray(TIMES), **TIGHT)
    assert type(ys) is OrderedDict and list(ys) == ["pos", "vel"]
    assert set(seen) == {OrderedDict}
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    np.testing.assert_allclose(backend.to_numpy(ys["pos"]), x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(ys["vel"]), v, rtol=0, atol=CLOSE)


def _with_empty(t, y, params=None):
    x, v, e = y
    return (*oscillator(t, (x, v), params), e * 0.0)


def test_an_empty_part_is_solved_as_nothing_beside_the_others(backend):
    # torchdiffeq solves a tuple state with a part of size 0; it was refused as "nothing to
    # solve" although the other parts were not empty.
    empty = backend.asarray(np.zeros((0,)))
    y0 = (backend.asarray(X0), backend.asarray(V0), empty)
    xs, vs, es = odecore.odeint(_with_empty, y0, backend.asarray(TIMES), **TIGHT)
    x, v = oscillator_exact(X0, V0, 1.0, TIMES)
    np.testing.assert_allclose(backend.to_numpy(xs), x, rtol=0, atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(vs), v, rtol=0, atol=CLOSE)
    assert tuple(es.shape) == (3, 0)
    with pytest.raises(ValueError, match=r"every part of y0 is empty \(y0\[0\]: \(0,\), "):
        odecore.odeint(lambda t, y: y, (empty, empty), backend.asarray(TIMES))


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_gradients_beside_an_empty_part(mode):
    import torch

    x0, v0, k = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (X0, V0, [K]))
    e0 = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    ys = odecore.odeint(_with_empty, (x0, v0, e0), t, params=(k,), adjoint=mode, **TIGHT)
    loss = (ys[0][-1] * torch.tensor(WX)).sum() + (ys[1][-1] * torch.tensor(WV)).sum()
    loss.backward()
    rx, rv, rk = _reference_gradients(WX, WV)
    np.testing.assert_allclose(x0.grad.numpy(), rx, rtol=0, atol=GRAD_CLOSE)
    np.testing.assert_allclose(v0.grad.numpy(), rv, rtol=0, atol=GRAD_CLOSE)
    assert abs(float(k.grad[0]) - rk) < GRAD_CLOSE
    assert e0.grad is not None and tuple(e0.grad.shape) == (0,)


def test_structured_tolerance_must_match_y0(backend):
    # The remedy speaks of what the user gives, not of what func returns.
    match = r"atol \(structured like y0\) has a tuple of 3 parts.*; give atol the structure of y0"
    with pytest.raises(ValueError, match=match):
        _solve_tuple(backend, oscillator, atol=(1e-6, 1e-6, 1e-6))
    # One array over all the parts was read in odecore's flattened order, undocumented.
    match = r"rtol of shape \(2,\) for a structured y0; give rtol the structure of y0"
    with pytest.raises(ValueError, match=match):
        _solve_tuple(backend, oscillator, rtol=backend.asarray([1e-6, 1e-8]))


def test_a_bad_part_of_a_structured_tolerance_is_named(backend):
    # It was refused as "every element of atol", without saying which part holds it.
    with pytest.raises(ValueError, match=r"every element of atol\[1\] must be positive"):
        _solve_tuple(backend, oscillator, atol=(1e-6, -1.0))
    with pytest.raises(ValueError, match=r"every element of rtol\[0\] must be non-negative"):
        _solve_tuple(backend, oscillator, rtol=(math.nan, 1e-6))


def test_vjp_returning_another_structure_is_refused():
    class Bad(OscillatorWithVjp):
        def vjp(self, t, y, params, cot):
            return cot[0], (np.zeros(1),)

    with pytest.raises(TypeError, match=r"Bad.vjp returned a ndarray at cot_y, where the state"):
        ys, pullback = odecore.vjp_odeint(Bad(), (X0, V0), TIMES, (np.array([K]),))
        pullback((np.ones((3, 2)), np.ones((3, 2))))


def test_a_pullbacks_cotangent_is_asked_for_in_the_structure_of_ys():
    # ys_bar is what the caller passes, shaped like ys (a time axis on every part); the
    # messages spoke of what func returns, and of the state's shape without that axis.
    ys, pullback = odecore.vjp_odeint(OscillatorWithVjp(), (X0, V0), TIMES, (np.array([K]),))
    with pytest.raises(TypeError, match=r"at ys_bar, .*; give ys_bar the structure of ys$"):
        pullback(np.zeros((3, 4)))
    shape = r"shape \(2,\) at ys_bar\[1\] but that part of ys has shape \(3, 2\); give each"
    with pytest.raises(ValueError, match=shape):
        pullback((np.zeros((3, 2)), np.zeros(2)))
    # Built like ys, the cotangent is taken: the gradient of sum(x(t)) at t = 0 is ones.
    y0_bar, _, _ = pullback((np.stack([np.ones(2), np.zeros(2), np.zeros(2)]), np.zeros((3, 2))))
    np.testing.assert_allclose(y0_bar[0], np.ones(2), rtol=0, atol=1e-12)


@pytest.mark.backend("numba")
def test_numba_refuses_structured_states():
    with pytest.raises(TypeError, match="needs y0 as one array.*concatenate"):
        odecore.odeint(oscillator, (X0, V0), TIMES, backend="numba")


# ---------------------------------------------------------------------------------------------
# perturb
# ---------------------------------------------------------------------------------------------

JUMP = 0.5


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_perturb_names_the_side_of_each_jump_evaluation(backend, direction, dtype):
    if not backend.backend.eager:
        pytest.skip("perturb is read off concrete times: eager backends only")
    seen = []

    def rate(t, y, *, perturb=odecore.Perturb.NONE):
        seen.append((float(t), perturb))
        # y' = 1 before the jump and 2 after it (in the user's time), whichever way time runs.
        after = perturb is odecore.Perturb.NEXT or (
            perturb is odecore.Perturb.NONE and float(t) > JUMP
        )
        return backend.xp.ones_like(y) * (2.0 if after else 1.0)

    t = backend.asarray([0.0, 1.0] if direction > 0 else [1.0, 0.0])
    y0 = backend.asarray([0.0], dtype=dtype)
    # float32 resolves relative errors down to its unit roundoff, 6e-8.
    tolerances = TIGHT if dtype == "float64" else {"rtol": 1e-6, "atol": 1e-6}
    ys = odecore.odeint(rate, y0, t, options={"jump_t": [JUMP]}, **tolerances)
    # The jump's neighbours in the precision func reads time in: float64's round back onto
    # the jump in float32.
    jump = np.asarray(JUMP, dtype=dtype)
    below = float(np.nextafter(jump, np.asarray(-np.inf, dtype=dtype)))
    above = float(np.nextafter(jump, np.asarray(np.inf, dtype=dtype)))
    sides = {p for time, p in seen if time in (below, above)}
    assert sides == {odecore.Perturb.PREV, odecore.Perturb.NEXT}
    assert all(p is odecore.Perturb.PREV for time, p in seen if time == below)
    assert all(p is odecore.Perturb.NEXT for time, p in seen if time == above)
    assert all(p is odecore.Perturb.NONE for time, p in seen if time not in (below, above))
    # Exact integral of the piecewise-constant rate: 0.5 * 1 + 0.5 * 2, forward; backward
    # from t = 1, y(0) = -(1.5). The solver integrates constants exactly up to roundoff.
    expected = 1.5 * direction
    assert abs(float(backend.to_numpy(ys[-1])[0]) - expected) < 4500 * float(np.finfo(dtype).eps)


@pytest.mark.backend("torch")
def test_perturb_reaches_a_module_forward_and_a_structured_state():
    import torch

    class Rate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
            self.sides = set()

        def forward(self, t, y, perturb=odecore.Perturb.NONE):
            self.sides.add(perturb)
            return (self.scale * torch.ones_like(y[0]),)

    rate = Rate()
    ys = odecore.odeint(
        rate,
        (torch.zeros(1, dtype=torch.float64),),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        options={"jump_t": [JUMP]},
        adjoint="checkpoint",
    )
    ys[0][-1].sum().backward()
    assert rate.sides == {odecore.Perturb.NONE, odecore.Perturb.PREV, odecore.Perturb.NEXT}
    # y(1) = scale * 1, so dy(1)/dscale = 1 (exact for a constant rate).
    assert abs(float(rate.scale.grad) - 1.0) < 1e-12


# ---------------------------------------------------------------------------------------------
# Fixed grids: grid_constructor and interp
# ---------------------------------------------------------------------------------------------

GRID_TIMES = np.array([0.0, 0.33, 0.7, 1.0, 1.55])


def _euler_on_grid(grid, y0, rate, interp_times):
    """Explicit Euler for ``y' = rate(t, y)`` on ``grid``, linear between grid points: the
    reference, written out step by step."""
    ys = [np.asarray(y0, dtype=float)]
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        ys.append(ys[-1] + (t1 - t0) * rate(t0, ys[-1]))
    return np.stack(
        [
            np.array([np.interp(t, grid, np.asarray(ys)[:, i]) for i in range(len(y0))])
            for t in interp_times
        ]
    )


def test_grid_constructor_and_linear_interp_match_a_hand_written_euler(backend):
    xp = backend.xp
    grid = np.array([0.0, 0.2, 0.45, 0.9, 1.2, 1.55])
    seen = []

    def constructor(func, y0, t):
        seen.append((func, tuple(t.shape)))  # t is traced on JAX
        return backend.asarray(grid)

    def rate(t, y):
        return xp.stack([y[1], -y[0] + 0.1 * xp.sin(3 * t)])

    y0 = np.array([1.0, 0.0])
    ys = odecore.odeint(
        rate,
        backend.asarray(y0),
        backend.asarray(GRID_TIMES),
        method="euler",
        options={"grid_constructor": constructor, "interp": "linear"},
    )
    expected = _euler_on_grid(
        grid, y0, lambda t, y: np.array([y[1], -y[0] + 0.1 * np.sin(3 * t)]), GRID_TIMES
    )
    assert seen[0][0] is rate
    assert seen[0][1] == GRID_TIMES.shape
    # The same arithmetic in another order: a few roundoffs of O(1) values.
    np.testing.assert_allclose(backend.to_numpy(ys), expected, rtol=0, atol=1e-14)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
@pytest.mark.parametrize("grid", ["step_size", "grid_constructor", "reversed"])
def test_fixed_grid_outputs_match_torchdiffeq(method, interp, grid):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    import torch

    def rate(t, y):
        return torch.stack([y[1], -y[0] + 0.1 * torch.sin(3 * t)])

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor(GRID_TIMES, dtype=torch.float64)
    if grid == "step_size":
        options = {"step_size": 0.12}
    else:
        options = {
            "grid_constructor": lambda f, y0, t: torch.linspace(t[0], t[-1], 9, dtype=torch.float64)
        }
        t = t.flip(0) if grid == "reversed" else t
    options["interp"] = interp
    ours = odecore.odeint(rate, y0, t, method=method, options=options)
    theirs = torchdiffeq.odeint(rate, y0, t, method=method, options=options)
    # The same steps and the same interpolation formula: they agree to roundoff (the step
    # size grid is built by repeated addition here, by multiplication there).
    assert float((ours - theirs).abs().max()) < 1e-14


def test_grid_constructor_sees_a_structured_state(backend):
    y0 = (backend.asarray(X0), backend.asarray(V0))

    def constructor(func, state, t):
        assert func is oscillator and isinstance(state, tuple) and len(state) == 2
        return backend.asarray(np.linspace(0.0, T_END, 2001))

    ys = odecore.odeint(
        oscillator,
        y0,
        backend.asarray(TIMES),
        method="rk4",
        options={"grid_constructor": constructor},
    )
    x, _ = oscillator_exact(X0, V0, 1.0, TIMES)
    # rk4 at h = 8.5e-4: global error ~ h^4 = 5e-13; the cubic interpolant's ~h^4 too.
    np.testing.assert_allclose(backend.to_numpy(ys[0]), x, rtol=0, atol=1e-10)


@pytest.mark.slow_on("jax")  # each refused grid compiles a solve before it is refused
def test_bad_fixed_grid_options_are_refused(backend):
    t, y0 = backend.asarray(GRID_TIMES), backend.asarray([1.0])

    def decay(t, y):
        return -y

    def solve(method="euler", **options):
        return odecore.odeint(decay, y0, t, method=method, options=options)

    with pytest.raises(ValueError, match=r"options\['interp'\] must be 'linear' or 'cubic'"):
        solve(interp="quadratic")
    with pytest.raises(TypeError, match=r"grid_constructor'\] must be a function"):
        solve(grid_constructor=[0.0, 1.55])
    with pytest.raises(ValueError, match="step_size.*grid_constructor.*one of them"):
        solve(step_size=0.1, grid_constructor=lambda f, y0, t: t)
    with pytest.raises(ValueError, match=r"start at t\[0\] and end at t\[-1\]"):
        solve(grid_constructor=lambda f, y0, t: backend.asarray([0.0, 1.0]))
    with pytest.raises(ValueError, match="strictly monotone"):
        solve(grid_constructor=lambda f, y0, t: backend.asarray([0.0, 1.0, 0.5, 1.55]))
    with pytest.raises(ValueError, match="'interp' only applies to fixed-step methods"):
        solve(method="dopri5", interp="linear")


# ---------------------------------------------------------------------------------------------
# Step callbacks
# ---------------------------------------------------------------------------------------------


class Logged:
    """``x'' = -(1 + 10 t) x`` as ``(x, v)``, logging its step callbacks."""

    def __init__(self, xp):
        self.xp = xp
        self.log = []

    def __call__(self, t, y):
        x, v = y
        return (v, -(1 + 10 * t) * x)

    def callback_step(self, t0, y0, dt):
        self.log.append(("step", float(t0), float(dt), tuple(float(p[0]) for p in y0)))

    def callback_accept_step(self, t0, y0, dt):
        self.log.append(("accept", float(t0), float(dt), tuple(float(p[0]) for p in y0)))

    def callback_reject_step(self, t0, y0, dt):
        self.log.append(("reject", float(t0), float(dt), tuple(float(p[0]) for p in y0)))


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_step_callbacks_follow_every_step(backend, direction):
    if not backend.backend.eager:
        pytest.skip("callbacks run in eager solves; see the JAX test below")
    func = Logged(backend.xp)
    t = backend.asarray([0.0, 2.0 * direction])
    y0 = (backend.asarray([1.0]), backend.asarray([0.0]))
    sol = odecore.solve(func, y0, t, rtol=1e-6, atol=1e-8)
    kinds = [entry[0] for entry in func.log]
    assert kinds.count("step") == sol.stats["nsteps"]
    assert kinds.count("accept") == sol.stats["naccept"] and sol.stats["naccept"] > 10
    assert kinds.count("reject") == sol.stats["nreject"] and sol.stats["nreject"] > 0
    # Each attempt is announced, then decided, with the same (t0, y0, dt). An accepted step
    # moves t0 by dt in the direction of time; a rejected one leaves t0 and y0 as they were.
    now, state = 0.0, (1.0, 0.0)
    for announced, decided in zip(func.log[::2], func.log[1::2], strict=True):
        assert announced[0] == "step" and decided[0] in ("accept", "reject")
        assert announced[1:] == decided[1:]
        assert announced[1] == now and announced[2] > 0
        assert state is None or announced[3] == state
        if decided[0] == "accept":
            now, state = now + direction * decided[2], None
        else:
            state = decided[3]
    assert abs(now - 2.0 * direction) < 1e-12


@pytest.mark.backend("torch")
def test_step_callbacks_match_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    import torch

    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    y0 = (torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    ours, theirs = Logged(torch), Logged(torch)
    odecore.odeint(ours, y0, t, rtol=1e-6, atol=1e-8)
    torchdiffeq.odeint(theirs, y0, t, rtol=1e-6, atol=1e-8)
    # The same first step (the same rule) and the same work within 5% (the dopri5 error
    # weights differ slightly, see test_gradients_torch).
    assert ours.log[0][0] == theirs.log[0][0]
    assert ours.log[0][1:3] == pytest.approx(theirs.log[0][1:3], rel=1e-12)
    for kind in ("step", "accept", "reject"):
        n_ours = sum(entry[0] == kind for entry in ours.log)
        n_theirs = sum(entry[0] == kind for entry in theirs.log)
        assert abs(n_ours - n_theirs) <= max(1, 0.05 * n_theirs), kind


@pytest.mark.backend("torch")
def test_adjoint_callbacks_see_the_backward_state():
    import torch

    class WithAdjoint(Logged):
        def callback_step_adjoint(self, t0, state, dt):
            self.log.append(("adjoint", float(t0), float(dt), state))

    func = WithAdjoint(torch)
    x0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    v0 = torch.tensor([0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = odecore.odeint(func, (x0, v0), t, adjoint="backsolve", rtol=1e-8, atol=1e-10)
    forward_steps = sum(entry[0] == "step" for entry in func.log)
    ys[0][-1].sum().backward()
    backward = [entry for entry in func.log if entry[0] == "adjoint"]
    # Only the adjoint callbacks run in the backward solve; it starts at t = 1 from the
    # forward's final state with a = the cotangent (1 on x, 0 on v) and goes back to 0.
    assert sum(entry[0] == "step" for entry in func.log) == forward_steps
    assert backward and backward[0][1] == 1.0
    y, a, a_params = backward[0][3]
    end = [float(part[-1, 0].detach()) for part in ys]
    assert [float(y[0][0]), float(y[1][0])] == end
    assert float(a[0][0]) == 1.0 and float(a[1][0]) == 0.0 and a_params.shape == (0,)
    assert all(entry[1] > 0 for entry in backward[1:])


def test_a_callback_that_cannot_take_the_call_is_refused_before_the_solve(backend):
    # torchdiffeq calls callback_step(t0, y0, dt); a callback without dt failed at the first
    # step with Python's message, and an _adjoint one only in the backward pass.
    class Decay:
        def __call__(self, t, y):
            return -y

    class NoStepSize(Decay):
        def callback_step(self, t0, y0):
            pass

    class AdjointNoStepSize(Decay):
        def callback_accept_step_adjoint(self, t0, state):
            pass

    y0, t = backend.asarray([1.0]), backend.asarray([0.0, 1.0])
    with pytest.raises(TypeError, match=r"calls NoStepSize\.callback_step\(t0, y0, dt\)"):
        odecore.odeint(NoStepSize(), y0, t)
    if backend.name != "torch":
        return
    # The backward solve's callbacks are read when it starts, before its first step.
    ys = odecore.odeint(AdjointNoStepSize(), y0.requires_grad_(True), t, adjoint="backsolve")
    match = r"callback_accept_step_adjoint\(t0, \(y, a, a_params\), dt\)"
    with pytest.raises(TypeError, match=match):
        ys.sum().backward()


@pytest.mark.backend("jax")
def test_callbacks_are_not_called_under_jax_and_say_so():
    import jax
    import jax.numpy as jnp

    func = Logged(jnp)
    with pytest.warns(UserWarning, match="not called.*traced"):
        odecore.odeint(func, (jnp.ones(1), jnp.zeros(1)), jnp.asarray([0.0, 1.0]))
    assert func.log == []

    class AdjointOnly:
        calls = 0

        def __call__(self, t, y):
            return -y

        def callback_step_adjoint(self, t0, state, dt):
            AdjointOnly.calls += 1

    def loss(y0):
        return odecore.odeint(AdjointOnly(), y0, jnp.asarray([0.0, 1.0]))[-1].sum()

    with pytest.warns(UserWarning, match=r"callback_step_adjoint\), which are not called"):
        jax.grad(loss)(jnp.ones(1))
    assert AdjointOnly.calls == 0


def test_callbacks_are_not_called_in_a_batched_solve_and_say_so():
    class Autonomous(Logged):
        def __call__(self, t, y):
            return (y[1], -y[0])

    func = Autonomous(np)
    y0 = (np.ones((3, 1)), np.zeros((3, 1)))
    with pytest.warns(UserWarning, match="not called.*batched"):
        odecore.odeint(func, y0, np.array([0.0, 1.0]), batch_axis=0)
    assert func.log == []


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_structured_time_gradient_matches_closed_form(mode):
    import torch

    t = torch.tensor([0.0, T_END], dtype=torch.float64, requires_grad=True)
    y0 = tuple(torch.tensor(a, dtype=torch.float64) for a in (X0, V0))
    ys = odecore.odeint(oscillator, y0, t, adjoint=mode, **TIGHT)
    ys[0][-1].sum().backward()
    # d x(T) / dT = v(T), and d x(T) / dt0 = -v(T) for this autonomous system.
    _, v = oscillator_exact(X0, V0, 1.0, [T_END])
    np.testing.assert_allclose(t.grad.numpy(), [-v[-1].sum(), v[-1].sum()], rtol=0, atol=1e-8)


@pytest.mark.backend("torch")
def test_user_norm_receives_the_structure_as_in_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    import torch

    seen = []

    def norm(error):
        seen.append(type(error))
        # Only the first part counts: the second is left out of the error control.
        return error[0].abs().max()

    y0 = (torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    calls = {"n": 0}

    def counted(t, y):
        calls["n"] += 1
        return (y[1], -(1 + t) * y[0])

    ours = odecore.odeint(counted, y0, t, rtol=1e-7, atol=1e-9, options={"norm": norm})
    our_calls, calls["n"] = calls["n"], 0
    theirs = torchdiffeq.odeint(counted, y0, t, rtol=1e-7, atol=1e-9, options={"norm": norm})
    assert set(seen) == {tuple}
    # The same norm, method and controller: the same work within 5%, values to tolerance.
    assert abs(our_calls - calls["n"]) <= 0.05 * calls["n"]
    assert float((ours[0] - theirs[0]).abs().max()) < 1e-5


@pytest.mark.backend("numba")
def test_numba_refuses_linear_interp_and_warns_of_callbacks():
    import numba

    @numba.njit
    def decay(t, y):
        return -y

    y0, t = np.ones(1), np.array([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="interp'\\]='linear' is not available on the 'numba'"):
        odecore.odeint(
            decay,
            y0,
            t,
            method="rk4",
            backend="numba",
            options={"interp": "linear", "step_size": 0.3},
        )

    def rate(t, y):
        return -y

    def never(t0, y0, dt):
        raise AssertionError("not called")

    rate.callback_step = never
    with pytest.warns(UserWarning, match="callbacks of rate are not called on the 'numba'"):
        ys = odecore.odeint(rate, y0, t, backend="numba", rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ys[:, 0], np.exp(-t), rtol=1e-8)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("norm", ["seminorm", None])
def test_module_parameters_of_a_structured_backsolve(norm):
    import torch

    class Spring(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(K, dtype=torch.float64))

        def forward(self, t, y):
            return (y[1], -self.k * y[0])

    spring = Spring()
    y0 = tuple(torch.tensor(a, dtype=torch.float64) for a in (X0, V0))
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    options = None if norm is None else {"norm": norm}
    ys = odecore.odeint_adjoint(spring, y0, t, adjoint_options=options, **TIGHT)
    loss = (ys[0][-1] * torch.tensor(WX)).sum() + (ys[1][-1] * torch.tensor(WV)).sum()
    loss.backward()
    _, _, dk = _reference_gradients(WX, WV)
    assert abs(float(spring.k.grad) - dk) < GRAD_CLOSE


def _spring_module():
    import torch

    class Spring(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(K, dtype=torch.float64))

        def forward(self, t, y):
            if isinstance(y, tuple):
                return (y[1], -self.k * y[0])
            return torch.stack([y[1], -self.k * y[0]])

    return Spring()


@pytest.mark.backend("torch")
@pytest.mark.parametrize("structured", [True, False], ids=["tuple", "tensor"])
def test_adjoint_norm_receives_the_adjoint_parts_as_in_torchdiffeq(structured):
    """torchdiffeq calls a user's adjoint norm with ``(t, *y, *adj_y, *adj_params)``, the
    state's parts expanded for a tuple state: the norm written for it must see the same
    tuple here, and the gradient must be right."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    import torch

    seen = {"odecore": [], "torchdiffeq": []}

    def recording_norm(into):
        def norm(parts):
            seen[into].append(tuple((tuple(p.shape), p.dtype) for p in parts))
            # Error control on the state and its adjoint only (parts 1 .. -2): a seminorm
            # written by hand, which unpacks the tuple as a torchdiffeq user would.
            _, *state_and_adjoint, _ = parts
            return max(p.pow(2).mean().sqrt() for p in state_and_adjoint)

        return norm

    x0, v0 = torch.tensor(X0), torch.tensor(V0)
    y0 = (x0, v0) if structured else torch.stack([x0, v0])
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    grads = {}
    for name, odeint_adjoint in (
        ("odecore", odecore.odeint_adjoint),
        ("torchdiffeq", torchdiffeq.odeint_adjoint),
    ):
        spring = _spring_module()
        options = {"norm": recording_norm(name)}
        ys = odeint_adjoint(spring, y0, t, adjoint_options=options, **TIGHT)
        x, v = (ys[0][-1], ys[1][-1]) if structured else (ys[-1][0], ys[-1][1])
        ((x * torch.tensor(WX)).sum() + (v * torch.tensor(WV)).sum()).backward()
        grads[name] = float(spring.k.grad)
    assert seen["odecore"] and set(seen["odecore"]) == set(seen["torchdiffeq"])
    _, _, dk = _reference_gradients(WX, WV)
    assert abs(grads["odecore"] - dk) < GRAD_CLOSE
    assert abs(grads["torchdiffeq"] - dk) < GRAD_CLOSE


@pytest.mark.backend("torch")
def test_the_solver_arithmetic_is_left_out_of_autocast():
    # autocast runs matrix products in bfloat16, and the stage sums of dopri5's error
    # estimate are one: the steps of a float32 solve were chosen from a bfloat16 estimate.
    # A func that autocast does not touch gets the same steps and values under it.
    import torch

    y0 = torch.tensor([1.0, 0.5])
    t = torch.linspace(0.0, 1.0, 3)
    plain = odecore.solve(lambda t, y: -y, y0, t, rtol=1e-6, atol=1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = odecore.solve(lambda t, y: -y, y0, t, rtol=1e-6, atol=1e-8)
    assert cast.stats["nfev"] == plain.stats["nfev"]
    assert torch.equal(cast.ys, plain.ys)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_autocast_dynamics_solve_a_float32_state_as_in_torchdiffeq(mode):
    # Under torch.autocast a Linear layer returns bfloat16 for a float32 state. torchdiffeq
    # adds it to the float32 state; odecore refused it as a func returning the wrong dtype.
    import torch

    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.25]])  # exact in bfloat16
    field = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        field.weight.copy_(a)
    seen = set()

    def rate(t, y):
        out = field(y)
        seen.add(out.dtype)
        return out

    y0 = torch.tensor([1.0, 0.5], requires_grad=True)
    t = torch.linspace(0.0, 1.0, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = odecore.odeint(rate, y0, t, adjoint=mode, adjoint_params=(field.weight,))
        loss = ys[-1].sum()
    loss.backward()
    assert torch.bfloat16 in seen and ys.dtype == torch.float32
    # y(t) = expm(a t) y0, dL/dy0 = expm(a T)^T 1. Each evaluation rounds y (and the rate)
    # to bfloat16, a relative error up to 2**-8 per step, which over t in [0, 1] with
    # |a| ~ 1 stays below 2 %. The gradient is the same flow's transpose.
    exact = torch.stack([torch.linalg.matrix_exp(a * s) @ y0.detach() for s in t])
    assert float((ys.detach() - exact).abs().max()) < 2e-2
    y0_bar = torch.linalg.matrix_exp(a).T @ torch.ones(2)
    assert float((y0.grad - y0_bar).abs().max()) < 2e-2
