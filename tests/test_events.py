"""Events: zero crossings of g(t, y) located during the solve, and their gradients.

References: closed forms (exponential decay crossing a level, a ball bouncing under gravity,
y = sin t), central finite differences in float64, the same samples solved one at a time, and
torchdiffeq's odeint_event on the same problem.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import odecore

K, Y0, LEVEL = 0.7, 2.0, 0.5
T_STAR = math.log(Y0 / LEVEL) / K
# Closed-form derivatives of t* = log(y0 / c) / k.
DT_DY0 = 1 / (K * Y0)
DT_DK = -math.log(Y0 / LEVEL) / K**2
DT_DC = -1 / (K * LEVEL)
# dopri5 at rtol 1e-10 / atol 1e-12 on O(1) states: a global error well under 1e-9; the event
# time inherits it divided by |dg/dt| = k c = 0.35, and the root is located to a few ulp.
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
CLOSE = 1e-8
# Gradients: the IFT in exact arithmetic, evaluated on a solve with the error above; the
# backsolve's backward solve adds an error of the same order as the forward one.
GRAD_CLOSE = 1e-7


def decay(t, y, params):
    return -params[0] * y


def below_level(t, y, params):
    return y[..., 0] - params[1]


def _decay_solution(backend, y0=Y0, k=K, c=LEVEL, times=(0.0, 1.0, 3.0), **kwargs):
    return odecore.solve(
        decay,
        backend.asarray([y0]),
        backend.asarray(list(times)),
        params=(backend.asarray(k), backend.asarray(c)),
        event=below_level,
        **{**TIGHT, **kwargs},
    )


def test_decay_stops_at_the_closed_form_crossing(backend):
    sol = _decay_solution(backend)
    assert int(sol.status) == int(odecore.Status.EVENT)
    assert sol.success
    events = sol.events
    assert int(events.index) == 0
    assert abs(float(backend.to_numpy(events.t)) - T_STAR) < CLOSE
    np.testing.assert_allclose(backend.to_numpy(events.y), [LEVEL], rtol=0, atol=CLOSE)
    ys = backend.to_numpy(sol.ys)[:, 0]
    # Before the event the outputs are the closed form; the output after it (t = 3 > t*) is
    # NaN, and the time reached is the event's.
    np.testing.assert_allclose(ys[:2], Y0 * np.exp(-K * np.array([0.0, 1.0])), atol=CLOSE)
    assert np.isnan(ys[2])
    assert abs(float(backend.to_numpy(sol.t_reached)) - T_STAR) < CLOSE
    assert int(events.count) == 1
    assert abs(float(backend.to_numpy(events.times)[0]) - T_STAR) < CLOSE


def test_throw_does_not_raise_at_a_terminal_event(backend):
    # throw=True is the default: an event is a success.
    sol = _decay_solution(backend, throw=True)
    assert int(sol.status) == int(odecore.Status.EVENT)
    assert odecore.Status.EVENT.describe().startswith("stopped at a terminal event")


def _event_gradients(backend, mode, y0=Y0, k=K, c=LEVEL):
    """d t*/d(y0, k, c) and d y*/d(y0, k, c) through odecore on ``backend``."""
    times = [0.0, 3.0]
    if backend.name == "torch":
        import torch

        args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (y0, k, c)]
        sol = odecore.solve(
            decay,
            args[0].reshape(1),
            torch.tensor(times, dtype=torch.float64),
            params=(args[1], args[2]),
            event=below_level,
            adjoint=mode,
            **TIGHT,
        )
        dt = torch.autograd.grad(sol.events.t, args, retain_graph=True)
        dy = torch.autograd.grad(sol.events.y.sum(), args)
        return np.array([float(g) for g in dt]), np.array([float(g) for g in dy])
    import jax
    import jax.numpy as jnp

    def event(y0, k, c):
        sol = odecore.solve(
            decay,
            jnp.reshape(y0, (1,)),
            jnp.asarray(times),
            params=(k, c),
            event=below_level,
            adjoint=mode,
            **TIGHT,
        )
        return sol.events.t, jnp.sum(sol.events.y)

    args = (jnp.asarray(y0), jnp.asarray(k), jnp.asarray(c))
    dt = jax.grad(lambda *a: event(*a)[0], argnums=(0, 1, 2))(*args)
    dy = jax.grad(lambda *a: event(*a)[1], argnums=(0, 1, 2))(*args)
    return np.array([float(g) for g in dt]), np.array([float(g) for g in dy])


def _event_time(backend, y0, k, c):
    return float(backend.to_numpy(_decay_solution(backend, y0, k, c).events.t))


MODES = {"torch": ["direct", "backsolve", "checkpoint"], "jax": ["backsolve", "checkpoint"]}


@pytest.mark.parametrize(
    "mode", ["direct", "backsolve", pytest.param("checkpoint", marks=pytest.mark.slow_on("jax"))]
)
def test_event_time_gradients_match_closed_form_and_finite_differences(backend, mode):
    if mode not in MODES.get(backend.name, []):
        pytest.skip(f"{backend.name} has no {mode!r} mode with autodiff")
    dt, dy = _event_gradients(backend, mode)
    np.testing.assert_allclose(dt, [DT_DY0, DT_DK, DT_DC], rtol=0, atol=GRAD_CLOSE)
    # y* = c whatever y0 and k: only c moves it.
    np.testing.assert_allclose(dy, [0.0, 0.0, 1.0], rtol=0, atol=GRAD_CLOSE)
    # Central differences of the solved event time: truncation O(h^2) ~ 1e-8, and the
    # solve's error 1e-10 divided by h.
    h = 1e-4
    base = np.array([Y0, K, LEVEL])
    fd = []
    for i in range(3):
        up, down = base.copy(), base.copy()
        up[i] += h
        down[i] -= h
        fd.append((_event_time(backend, *up) - _event_time(backend, *down)) / (2 * h))
    np.testing.assert_allclose(dt, fd, rtol=0, atol=1e-5)


class DecayWithVjp:
    """NumPy dynamics with their own VJP: ``y' = -k y``, ``params = (k, c)``."""

    def __call__(self, t, y, params):
        return decay(t, y, params)

    def vjp(self, t, y, params, cot):
        return -params[0] * cot, (np.array(-np.sum(cot * y)), np.array(0.0))


class LevelWithVjp:
    """``g = y - c`` with its VJP ``(g_t, g_y, g_params)``."""

    def __call__(self, t, y, params):
        return below_level(t, y, params)

    def vjp(self, t, y, params, g_bar):
        y_bar = np.zeros_like(y)
        y_bar[..., 0] = g_bar
        return np.zeros_like(np.asarray(t, dtype=float)), y_bar, (np.array(0.0), -np.sum(g_bar))


@pytest.mark.parametrize("mode", ["checkpoint", "backsolve"])
def test_vjp_odeint_event_gradients_on_numpy(mode):
    params = (np.array(K), np.array(LEVEL))
    ys, events, pullback = odecore.vjp_odeint(
        DecayWithVjp(),
        np.array([Y0]),
        np.array([0.0, 3.0]),
        params,
        adjoint=mode,
        event=LevelWithVjp(),
        **TIGHT,
    )
    assert abs(float(events.t) - T_STAR) < CLOSE
    y0_bar, params_bar, _ = pullback(np.zeros_like(ys), event_t_bar=1.0)
    np.testing.assert_allclose(
        [y0_bar[0], params_bar[0], params_bar[1]], [DT_DY0, DT_DK, DT_DC], atol=GRAD_CLOSE
    )
    y0_bar, params_bar, _ = pullback(np.zeros_like(ys), event_y_bar=np.ones(1))
    np.testing.assert_allclose(
        [y0_bar[0], params_bar[0], params_bar[1]], [0.0, 0.0, 1.0], atol=GRAD_CLOSE
    )


def test_backsolve_leaves_the_event_options_to_the_forward_solve():
    # The backward solve has no events: it takes the forward options without event_tol and
    # max_events, which a solve without events refuses.
    ys, events, pullback = odecore.vjp_odeint(
        DecayWithVjp(),
        np.array([Y0]),
        np.array([0.0, 3.0]),
        (np.array(K), np.array(LEVEL)),
        adjoint="backsolve",
        event=LevelWithVjp(),
        options={"event_tol": 1e-12, "max_events": 4},
        **TIGHT,
    )
    assert abs(float(events.t) - T_STAR) < CLOSE
    y0_bar, params_bar, _ = pullback(np.zeros_like(ys), event_t_bar=1.0)
    np.testing.assert_allclose(
        [y0_bar[0], params_bar[0], params_bar[1]], [DT_DY0, DT_DK, DT_DC], atol=GRAD_CLOSE
    )


class ScaledCosWithVjp:
    """``y' = a cos t`` with its VJP, ``params = (a,)``."""

    def __call__(self, t, y, params):
        return params[0] * np.cos(t) + 0 * y

    def vjp(self, t, y, params, cot):
        return np.zeros_like(cot), (np.array(np.sum(cot * np.cos(t))),)


class FirstElementWithVjp:
    """``g = y[0]`` with its VJP."""

    def __call__(self, t, y, params):
        return y[..., 0]

    def vjp(self, t, y, params, g_bar):
        y_bar = np.zeros_like(y)
        y_bar[..., 0] = g_bar
        return np.zeros_like(np.asarray(t, dtype=float)), y_bar, (np.array(0.0),)


def test_vjp_odeint_warns_when_crossings_exceed_max_events():
    """sin t crosses zero three times on (0, 10]: a record of two keeps pi and 2 pi, and
    vjp_odeint warns as solve does."""
    with pytest.warns(UserWarning, match=r"crossed 3 events.*keeps the first 2"):
        _, events, _ = odecore.vjp_odeint(
            ScaledCosWithVjp(),
            np.array([0.0]),
            np.array([0.0, 10.0]),
            (np.array(1.0),),
            event=odecore.Event(FirstElementWithVjp(), terminal=False),
            options={"max_events": 2},
            **TIGHT,
        )
    np.testing.assert_allclose(events.times, [math.pi, 2 * math.pi], rtol=0, atol=CLOSE)


def test_vjp_odeint_event_without_a_vjp_is_refused():
    with pytest.raises(TypeError, match="event.*vjp"):
        odecore.vjp_odeint(
            DecayWithVjp(),
            np.array([Y0]),
            np.array([0.0, 3.0]),
            (np.array(K), np.array(LEVEL)),
            event=below_level,
        )


# The bouncing ball: height h, velocity v, h' = v, v' = -G; at h = 0 falling, v -> -E v.
G, E, H0 = 9.81, 0.8, 1.3


def ball(t, y, params=None):
    return (y[1], -G + 0 * y[0])


def bounce_times(h0, e, count):
    """The closed form: the first impact at sqrt(2 h0 / G) with speed w = sqrt(2 G h0); each
    flight after an impact lasts 2 w / G and the next impact speed is e w."""
    w = math.sqrt(2 * G * h0)
    times = [w / G]
    for _ in range(count - 1):
        w *= e
        times.append(times[-1] + 2 * w / G)
    return np.array(times)


def _bounces(xp, to_tensor, h0, e, count):
    """The bounce times, each solve restarting from the previous event's state."""
    state = (to_tensor([h0]), to_tensor([0.0]))
    t0 = to_tensor(0.0)
    times = []
    for _ in range(count):
        sol = odecore.solve(
            ball,
            state,
            xp.stack([t0, t0 + 10.0]),
            event=odecore.Event(lambda t, y: y[0][0], direction=-1),
            **TIGHT,
        )
        t0 = sol.events.t
        h, v = sol.events.y
        state = (h, -e * v)
        times.append(t0)
    return times


def test_bouncing_ball_times_match_closed_form(backend):
    def to_tensor(v):
        return backend.asarray(v)

    times = _bounces(backend.xp, to_tensor, H0, E, 4)
    got = np.array([float(backend.to_numpy(t)) for t in times])
    np.testing.assert_allclose(got, bounce_times(H0, E, 4), rtol=0, atol=1e-8)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_bouncing_ball_gradients_match_finite_differences(mode):
    import torch

    h0 = torch.tensor(H0, dtype=torch.float64, requires_grad=True)
    e = torch.tensor(E, dtype=torch.float64, requires_grad=True)

    with odecore.use_backend("torch"):
        state = (h0.reshape(1), torch.zeros(1, dtype=torch.float64))
        t0 = torch.tensor(0.0, dtype=torch.float64)
        for _ in range(3):
            sol = odecore.solve(
                ball,
                state,
                torch.stack([t0, t0.detach() + 10.0]),
                event=odecore.Event(lambda t, y: y[0][0], direction=-1),
                adjoint=mode,
                **TIGHT,
            )
            t0 = sol.events.t
            h, v = sol.events.y
            state = (h, -e * v)
    dh0, de = torch.autograd.grad(t0, (h0, e))
    # Central differences of the closed form (step 1e-6: truncation ~1e-12, rounding ~1e-10).
    step = 1e-6

    def third(h, r):
        return bounce_times(h, r, 3)[-1]

    fd_h = (third(H0 + step, E) - third(H0 - step, E)) / (2 * step)
    fd_e = (third(H0, E + step) - third(H0, E - step)) / (2 * step)
    # The IFT gradient on a solve with error ~1e-10 per bounce.
    assert abs(float(dh0) - fd_h) < 1e-6
    assert abs(float(de) - fd_e) < 1e-6


def _cos(t, y):
    # y' = cos t from y(0) = 0: y = sin t, which crosses zero at every multiple of pi.
    import array_api_compat

    xp = array_api_compat.array_namespace(y)
    return xp.cos(t) + 0 * y


@pytest.mark.parametrize(
    "direction, crossings", [(1, [2 * math.pi]), (-1, [math.pi, 3 * math.pi]), (0, [1, 2, 3])]
)
def test_direction_and_recorded_crossings(backend, direction, crossings):
    if direction == 0:
        crossings = [k * math.pi for k in crossings]
    sol = odecore.solve(
        _cos,
        backend.asarray([0.0]),
        backend.asarray([0.0, 10.0]),
        event=odecore.Event(lambda t, y: y[..., 0], terminal=False, direction=direction),
        **TIGHT,
    )
    assert int(sol.status) == int(odecore.Status.SUCCESS)
    assert int(sol.events.index) == -1
    assert np.isnan(float(backend.to_numpy(sol.events.t)))
    count = int(sol.events.count)
    assert count == len(crossings)
    times = backend.to_numpy(sol.events.times)
    np.testing.assert_allclose(times[:count], crossings, rtol=0, atol=CLOSE)
    assert np.all(np.isnan(times[count:]))
    assert np.all(backend.to_numpy(sol.events.which)[:count] == 0)


@pytest.mark.parametrize("batch_axis", [None, 0])
def test_crossings_beyond_max_events_warn_and_the_first_are_kept(backend, batch_axis):
    """sin t crosses zero three times on (0, 10]; a record of two keeps pi and 2 pi and
    counts 3, and the solve says so: a caller reading times alone would miss the third."""
    y0 = backend.asarray([[0.0]] if batch_axis == 0 else [0.0])

    def solve(max_events):
        return odecore.solve(
            _cos,
            y0,
            backend.asarray([0.0, 10.0]),
            batch_axis=batch_axis,
            event=odecore.Event(lambda t, y: y[..., 0], terminal=False),
            options={"max_events": max_events},
            **TIGHT,
        )

    with pytest.warns(UserWarning, match=r"crossed 3 events.*keeps the first 2") as caught:
        sol = solve(2)
    assert caught[0].filename == __file__  # it points at the caller's line
    times = backend.to_numpy(sol.events.times).reshape(-1)
    np.testing.assert_allclose(times, [math.pi, 2 * math.pi], rtol=0, atol=CLOSE)
    assert int(backend.to_numpy(sol.events.count).reshape(-1)[0]) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(3)


def test_first_terminal_event_wins_and_non_terminal_are_recorded(backend):
    events = [
        odecore.Event(lambda t, y: y[..., 0] - 0.5, terminal=False),  # at pi/6
        odecore.Event(lambda t, y: y[..., 0] - 0.9),  # at asin(0.9)
        odecore.Event(lambda t, y: y[..., 0] - 0.7),  # at asin(0.7), earlier: it wins
    ]
    sol = odecore.solve(
        _cos, backend.asarray([0.0]), backend.asarray([0.0, 3.0]), event=events, **TIGHT
    )
    assert int(sol.events.index) == 2
    assert abs(float(backend.to_numpy(sol.events.t)) - math.asin(0.7)) < CLOSE
    count = int(sol.events.count)
    which = list(backend.to_numpy(sol.events.which)[:count])
    times = backend.to_numpy(sol.events.times)[:count]
    # The non-terminal crossing, and the terminal one that stopped the sample; the later
    # terminal event never happens.
    assert which == [0, 2]
    np.testing.assert_allclose(times, [math.pi / 6, math.asin(0.7)], atol=CLOSE)


def test_batched_samples_stop_at_their_own_events(backend):
    y0s = [[2.0], [1.0], [0.4]]
    times = [0.0, 1.0, 2.5]
    params = (backend.asarray(K), backend.asarray(LEVEL))
    batch = odecore.solve(
        decay,
        backend.asarray(y0s),
        backend.asarray(times),
        params=params,
        event=below_level,
        batch_axis=0,
        **TIGHT,
    )
    # Sample 2 starts below the level and never crosses it.
    assert list(backend.to_numpy(batch.status)) == [6, 6, 0]
    assert list(backend.to_numpy(batch.events.index)) == [0, 0, -1]
    for i, y0 in enumerate(y0s):
        alone = odecore.solve(
            decay,
            backend.asarray(y0),
            backend.asarray(times),
            params=params,
            event=below_level,
            **TIGHT,
        )
        np.testing.assert_allclose(
            backend.to_numpy(batch.ys)[:, i], backend.to_numpy(alone.ys), rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            backend.to_numpy(batch.events.t)[i], backend.to_numpy(alone.events.t), atol=1e-12
        )
    expected = np.log(np.array([2.0, 1.0]) / LEVEL) / K
    np.testing.assert_allclose(backend.to_numpy(batch.events.t)[:2], expected, atol=CLOSE)


# t* = log(y0 / LEVEL) / K: 1.98 and 0.99 for the first two samples; the third starts below
# the level and never crosses it. The output times fall on both sides of each.
FILL_Y0S = [[2.0], [1.0], [0.4]]
FILL_TIMES = [0.0, 0.5, 1.5, 2.5, 3.0]


def _assert_filled_to_the_event(ys, y0s) -> None:
    """One row per output time: the closed form up to each sample's event, NaN after it."""
    times = np.asarray(FILL_TIMES)
    assert ys.shape == (len(times), len(y0s), 1)
    for i, (y0,) in enumerate(y0s):
        t_star = math.log(y0 / LEVEL) / K if y0 > LEVEL else math.inf
        before = times < t_star
        np.testing.assert_allclose(ys[before, i, 0], y0 * np.exp(-K * times[before]), atol=CLOSE)
        assert np.all(np.isnan(ys[~before, i, 0])), (i, ys[:, i, 0])


@pytest.mark.parametrize("batched", [False, True], ids=["one sample", "batch"])
def test_outputs_after_a_terminal_event_are_nan_rows(backend, batched):
    """As docs/events.md says, on every backend: ``ys`` keeps a row per time in ``t`` (a
    fixed shape, as JAX's jit needs), NaN after the event, a batch's samples each after
    their own."""

    def run(y0):
        return odecore.solve(
            decay,
            backend.asarray(y0),
            backend.asarray(FILL_TIMES),
            params=(backend.asarray(K), backend.asarray(LEVEL)),
            event=below_level,
            batch_axis=0 if batched else None,
            **TIGHT,
        ).ys

    if batched:
        ys = backend.to_numpy(run(FILL_Y0S))
    else:
        ys = np.stack([backend.to_numpy(run(y0)) for y0 in FILL_Y0S], axis=1)
    _assert_filled_to_the_event(ys, FILL_Y0S)


@pytest.mark.backend("jax")
@pytest.mark.parametrize("batched", [False, True], ids=["one sample", "batch"])
def test_outputs_after_a_terminal_event_are_nan_rows_under_jit(batched):
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):

        @jax.jit
        def run(y0):
            return odecore.solve(
                decay,
                y0,
                jnp.asarray(FILL_TIMES),
                params=(jnp.asarray(K), jnp.asarray(LEVEL)),
                event=below_level,
                batch_axis=0 if batched else None,
                **TIGHT,
            ).ys

        if batched:
            ys = np.asarray(run(jnp.asarray(FILL_Y0S)))
        else:
            ys = np.stack([np.asarray(run(jnp.asarray(y0))) for y0 in FILL_Y0S], axis=1)
    _assert_filled_to_the_event(ys, FILL_Y0S)


@pytest.mark.backend("jax")
def test_events_under_jit_and_vmap():
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):

        def event_time(y0):
            sol = odecore.solve(
                decay,
                jnp.reshape(y0, (1,)),
                jnp.asarray([0.0, 3.0]),
                params=(jnp.asarray(K), jnp.asarray(LEVEL)),
                event=below_level,
                **TIGHT,
            )
            return sol.events.t

        y0s = jnp.asarray([2.0, 1.0, 3.0])
        expected = np.log(np.asarray(y0s) / LEVEL) / K
        np.testing.assert_allclose(jax.jit(jax.vmap(event_time))(y0s), expected, atol=CLOSE)
        grads = jax.vmap(jax.grad(event_time))(y0s)
        np.testing.assert_allclose(grads, 1 / (K * np.asarray(y0s)), atol=GRAD_CLOSE)


@pytest.mark.backend("jax")
def test_an_event_not_finite_at_t0_under_jit_gives_invalid_input():
    # Under jit the values are not known before the solve runs: the status says it.
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):

        def status(y0):
            sol = odecore.solve(
                decay,
                jnp.reshape(y0, (1,)),
                jnp.asarray([0.0, 3.0]),
                params=(jnp.asarray(K), jnp.asarray(LEVEL)),
                event=lambda t, y, p: jnp.log(y[0] - 1.0),
                throw=False,
            )
            return sol.status

        got = jax.jit(jax.vmap(status))(jnp.asarray([3.0, 1.0]))
    assert got.tolist() == [int(odecore.Status.EVENT), int(odecore.Status.INVALID_INPUT)]


def test_bad_events_are_refused(backend):
    def solve(event):
        return _decay_solution_with(backend, event)

    with pytest.raises(TypeError, match="event must be a callable"):
        solve(3.0)
    with pytest.raises(TypeError, match=r"event\[1\] must be a callable"):
        solve([below_level, "g"])
    with pytest.raises(ValueError, match="direction must be"):
        odecore.Event(below_level, direction=2)
    with pytest.raises(ValueError, match=r"event returned shape \(1,\), expected \(\)"):
        solve(lambda t, y, p: y - p[1])
    with pytest.raises(ValueError, match="empty"):
        solve([])
    with pytest.raises(ValueError, match="max_events"):
        _decay_solution_with(backend, below_level, options={"max_events": 0})


def test_a_boolean_event_is_refused(backend):
    # diffrax's cond_fn may be a condition; here one read as 0 and 1 never went below zero,
    # and the solve ended without its event, successfully.
    with pytest.raises(TypeError, match=r"event returned booleans; .* rather than y\[0\] < 0.5"):
        _decay_solution_with(backend, lambda t, y, p: y[0] < p[1])


@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_a_step_event_keeps_its_time_where_gradients_are_taken(backend, mode):
    # sign(y - c) crosses where y - c does, but is flat there: the implicit function
    # theorem's rate along the solution is zero. Its correction, 0 / 0, made the event time
    # and state NaN wherever gradients were attached (on JAX always), though the loop had
    # located them.
    if mode not in MODES.get(backend.name, []):
        pytest.skip(f"{backend.name} has no {mode!r} mode with autodiff")
    xp = backend.xp

    def event_time_and_state(y0):
        sol = odecore.solve(
            decay,
            y0,
            backend.asarray([0.0, 3.0]),
            params=(backend.asarray(K), backend.asarray(LEVEL)),
            event=lambda t, y, p: xp.sign(y[0] - p[1]),
            adjoint=mode,
            **TIGHT,
        )
        return sol.events.t, sol.events.y

    if backend.name == "torch":
        import torch

        t_event, y_event = event_time_and_state(
            torch.tensor([Y0], dtype=torch.float64, requires_grad=True)
        )
        t_event, y_event = float(t_event.detach()), y_event.detach().numpy()
    else:
        import jax

        (t_event, y_event), _ = jax.vjp(event_time_and_state, backend.asarray([Y0]))
        t_event, y_event = float(t_event), np.asarray(y_event)
    assert abs(t_event - T_STAR) < CLOSE
    np.testing.assert_allclose(y_event, [LEVEL], rtol=0, atol=CLOSE)


def test_an_event_not_finite_at_t0_is_refused(backend):
    # A NaN compares false both ways: the event was never found, and the solve ended
    # without it, silently (odeint_event then said the event "never crossed zero").
    xp = backend.xp

    def log_gap(t, y, params):  # log(y - y0) is -inf at t0
        return xp.log(y[..., 0] - Y0)

    with np.errstate(divide="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match=r"event is -inf at t0; an event function must"):
            _decay_solution_with(backend, log_gap)
        with pytest.raises(ValueError, match=r"event\[1\] is nan at t0 for sample 1;"):
            odecore.solve(
                decay,
                backend.asarray([[Y0], [1.0], [3.0]]),
                backend.asarray([0.0, 3.0]),
                params=(backend.asarray(K), backend.asarray(LEVEL)),
                batch_axis=0,
                event=[below_level, lambda t, y, p: xp.sqrt(y[:, 0] - 1.5)],
            )
    # With throw=False a batch's sample whose event is not finite at t0 (y0 = 0.5) is not
    # solved (INVALID_INPUT), as one whose y0 is not finite, which is not asked about its
    # event. The other finds its event: y = 1 at t = log(2) / k.
    with np.errstate(invalid="ignore"):
        solution = odecore.solve(
            decay,
            backend.asarray([[math.nan], [Y0], [0.5]]),
            backend.asarray([0.0, 3.0]),
            params=(backend.asarray(K), backend.asarray(LEVEL)),
            batch_axis=0,
            throw=False,
            event=lambda t, y, p: xp.sqrt(y[:, 0] - 0.75) - 0.5,
            **TIGHT,
        )
    invalid, event = int(odecore.Status.INVALID_INPUT), int(odecore.Status.EVENT)
    assert backend.to_numpy(solution.status).tolist() == [invalid, event, invalid]
    t_event = backend.to_numpy(solution.events.t)
    assert math.isnan(t_event[0]) and math.isnan(t_event[2])
    np.testing.assert_allclose(t_event[1], math.log(2.0) / K, rtol=CLOSE)


def drain(t, y, params=None):  # y = y0 - t
    return y * 0.0 - 1.0


def _drained(backend, event, y0=(1.0,), **kwargs):
    """A drain from ``y0`` over [0, 2] watched by ``event`` (a batch when ``y0`` has rows)."""
    batched = isinstance(y0[0], tuple)
    with np.errstate(invalid="ignore"):
        return odecore.solve(
            drain,
            backend.asarray(list(y0) if not batched else [list(row) for row in y0]),
            backend.asarray([0.0, 2.0]),
            event=event,
            batch_axis=0 if batched else None,
            **kwargs,
        )


def test_an_event_past_a_step_that_leaves_its_domain_is_found(backend):
    # g = sqrt(y) - 1/2 on y = 1 - t crosses at t = 3/4 and is NaN past t = 1. The error
    # estimate of this linear drain is zero, so the first step is as long as the heuristic
    # makes it and lands past t = 1; a NaN compares false with zero both ways, so the crossing
    # was missed and the solve went on to t = 2, silently. Such a step is now retried shorter.
    xp = backend.xp
    solution = _drained(backend, lambda t, y: xp.sqrt(y[..., 0]) - 0.5)
    assert int(solution.status) == odecore.Status.EVENT
    # dopri5's interpolant is exact on a linear state: the root is located to a few ulp.
    np.testing.assert_allclose(float(solution.events.t), 0.75, rtol=CLOSE)


def test_a_single_output_time_has_an_event_record_and_checks_the_events(backend):
    # A single output time returns y0 with no step taken: no crossing can have happened. The
    # event was ignored: Solution.events was None, as for a solve without events, and an
    # event function that a solve refuses passed unchecked.
    xp = backend.xp
    params = (backend.asarray(K), backend.asarray(LEVEL))
    sol = odecore.solve(
        decay, backend.asarray([Y0]), backend.asarray([0.5]), params=params, event=below_level
    )
    events = sol.events
    assert int(sol.status) == int(odecore.Status.SUCCESS)
    assert int(events.index) == -1 and int(events.count) == 0
    assert math.isnan(float(backend.to_numpy(events.t)))
    assert np.isnan(backend.to_numpy(events.y)).all()
    # The crossings' buffers have options["max_events"] slots, as in a solve.
    assert np.isnan(backend.to_numpy(events.times)).all() and events.times.shape == (64,)
    assert (backend.to_numpy(events.which) == -1).all()
    with np.errstate(invalid="ignore"):
        with pytest.raises(ValueError, match=r"event is nan at t0; an event function must"):
            odecore.solve(
                decay,
                backend.asarray([Y0]),
                backend.asarray([0.5]),
                params=params,
                event=lambda t, y, p: xp.sqrt(y[0] - 3.0),
            )
    with pytest.raises(ValueError, match=r"event returned shape \(1,\), expected \(\)"):
        odecore.solve(
            decay, backend.asarray([Y0]), backend.asarray([0.5]), params=params,
            event=lambda t, y, p: y,
        )  # fmt: skip
    # A batch with throw=False: the sample whose event is not finite at t0 is INVALID_INPUT,
    # as in a solve with two output times.
    with np.errstate(invalid="ignore"):
        sol = odecore.solve(
            decay,
            backend.asarray([[Y0], [0.5]]),
            backend.asarray([0.5]),
            params=params,
            batch_axis=0,
            throw=False,
            event=lambda t, y, p: xp.sqrt(y[:, 0] - 0.75),
            options={"max_events": 3},
        )
    invalid, success = int(odecore.Status.INVALID_INPUT), int(odecore.Status.SUCCESS)
    assert backend.to_numpy(sol.status).tolist() == [success, invalid]
    assert backend.to_numpy(sol.events.count).tolist() == [0, 0]
    assert sol.events.times.shape == (3, 2)


def test_an_event_that_stays_nan_fails_the_solve(backend):
    # g = sqrt(y) + 1 never crosses zero but is NaN past t = 1, where its crossings cannot be
    # watched: no shorter step gets past, and the solve says why instead of succeeding.
    xp = backend.xp

    def never(t, y):
        return xp.sqrt(y[..., 0]) + 1.0

    with pytest.raises(odecore.SolveError, match="an event function returned NaN") as info:
        _drained(backend, never)
    solution = info.value.solution
    assert int(solution.status) == odecore.Status.NONFINITE_EVENT
    # The state reaches 0 at t = 1 to the rounding of the steps' sums (a few ulp per step).
    assert abs(float(solution.t_reached) - 1.0) < 1e-12
    # A fixed step cannot be shortened: the step from 0.9 to 1.2 fails, and the message says
    # that a fixed step was tried once.
    with pytest.raises(odecore.SolveError, match="with fixed steps") as info:
        _drained(backend, never, method="rk4", options={"step_size": 0.3})
    assert int(info.value.solution.status) == odecore.Status.NONFINITE_EVENT
    np.testing.assert_allclose(float(info.value.solution.t_reached), 0.9, rtol=1e-12)
    # In a batch with throw=False the other samples are solved: y0 = 5 stays positive.
    batch = _drained(backend, never, y0=((1.0,), (5.0,)), throw=False)
    codes = [int(odecore.Status.NONFINITE_EVENT), int(odecore.Status.SUCCESS)]
    assert backend.to_numpy(batch.status).tolist() == codes
    np.testing.assert_allclose(backend.to_numpy(batch.ys)[-1, 1, 0], 3.0, rtol=1e-12)


def thrown_ball(t, y):
    """``ball`` as one array, h' = v, v' = -G: the state scipy's solve_ivp takes."""
    return np.array([y[1], -G])


def test_scipy_event_attributes_are_honoured():
    # scipy's solve_ivp reads `terminal` and `direction` off its event functions; odecore
    # passed over them, and a terminal, falling event written for scipy stopped at the
    # rising crossing. A ball thrown up from h = -1: h = -1 + v0 t - g t^2 / 2 is 0 rising
    # at t- and falling at t+ = (v0 + sqrt(v0^2 - 2 g)) / g.
    from scipy.integrate import solve_ivp

    g, v0, ball = G, 5.0, thrown_ball

    def ground(t, y):
        return y[0]

    ground.terminal, ground.direction = True, -1.0
    t_fall = (v0 + math.sqrt(v0**2 - 2 * g)) / g
    t_rise = (v0 - math.sqrt(v0**2 - 2 * g)) / g
    y0, ts = np.array([-1.0, v0]), np.array([0.0, 2.0])
    sol = odecore.solve(ball, y0, ts, event=ground, **TIGHT)
    assert sol.status == odecore.Status.EVENT
    np.testing.assert_allclose(float(sol.events.t), t_fall, rtol=CLOSE)
    scipy_sol = solve_ivp(ball, (0.0, 2.0), y0, events=ground, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(sol.events.t), scipy_sol.t_events[0][0], rtol=CLOSE)
    # terminal = False: both crossings recorded, the solve goes on to the end.
    ground.terminal, ground.direction = False, 0
    sol = odecore.solve(ball, y0, ts, event=[ground], **TIGHT)
    assert sol.status == odecore.Status.SUCCESS
    np.testing.assert_allclose(sol.events.times[:2], [t_rise, t_fall], rtol=CLOSE)
    ground.terminal = 2  # scipy: stop at the second crossing
    with pytest.raises(ValueError, match=r"event\[0\].terminal = 2: scipy stops after"):
        odecore.solve(ball, y0, ts, event=[ground])


def test_scipy_event_attributes_may_be_numpy_numbers():
    # Attributes set from NumPy values (a direction read off an array, a terminal flag from
    # a comparison): scipy takes them; odecore crashed in NumPy's refusal to subtract its
    # booleans, or refused np.True_ as not True or False. The ball thrown up from h = -1
    # falls through 0 at t+ = (v0 + sqrt(v0^2 - 2 g)) / g, as scipy finds it.
    from scipy.integrate import solve_ivp

    g, v0, ball = G, 5.0, thrown_ball

    def ground(t, y):
        return y[0]

    ground.terminal, ground.direction = np.array([1.0]) > 0, np.float64(-1.0)
    ground.terminal = ground.terminal[0]
    y0, ts = np.array([-1.0, v0]), np.array([0.0, 2.0])
    sol = odecore.solve(ball, y0, ts, event=ground, **TIGHT)
    scipy_sol = solve_ivp(ball, (0.0, 2.0), y0, events=ground, rtol=1e-10, atol=1e-12)
    t_fall = (v0 + math.sqrt(v0**2 - 2 * g)) / g
    assert sol.status == odecore.Status.EVENT
    np.testing.assert_allclose(float(sol.events.t), t_fall, rtol=CLOSE)
    np.testing.assert_allclose(scipy_sol.t_events[0], [t_fall], rtol=CLOSE)
    ground.terminal, ground.direction = np.False_, np.int64(1)
    sol = odecore.solve(ball, y0, ts, event=ground, **TIGHT)
    t_rise = (v0 - math.sqrt(v0**2 - 2 * g)) / g
    assert sol.status == odecore.Status.SUCCESS and int(sol.events.count) == 1
    np.testing.assert_allclose(float(sol.events.times[0]), t_rise, rtol=CLOSE)
    assert odecore.Event(ground, terminal=np.True_).terminal is True


def _decay_solution_with(backend, event, **kwargs):
    return odecore.solve(
        decay,
        backend.asarray([Y0]),
        backend.asarray([0.0, 3.0]),
        params=(backend.asarray(K), backend.asarray(LEVEL)),
        event=event,
        **kwargs,
    )


@pytest.mark.backend("torch")
@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("reverse_time", [False, True])
def test_odeint_event_matches_torchdiffeq(interface, reverse_time):
    import torch
    import torchdiffeq

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(K, dtype=torch.float64))

        def forward(self, t, y):
            return -self.k * y

    level = LEVEL if not reverse_time else 4.0

    def event_fn(t, y):
        return y[0] - level

    results = []
    for library in (odecore, torchdiffeq):
        func = Decay()
        y0 = torch.tensor([Y0], dtype=torch.float64, requires_grad=True)
        t0 = torch.tensor(0.0, dtype=torch.float64)
        event_t, states = library.odeint_event(
            func,
            y0,
            t0,
            event_fn=event_fn,
            reverse_time=reverse_time,
            odeint_interface=getattr(library, interface),
            rtol=1e-10,
            atol=1e-12,
        )
        grads = torch.autograd.grad(event_t, (y0, func.k))
        gradients = [float(g) for g in grads]
        results.append((float(event_t.detach()), states.detach().numpy(), gradients))
    (t_ours, s_ours, g_ours), (t_theirs, s_theirs, g_theirs) = results
    expected = math.log(Y0 / level) / K
    assert abs(t_ours - expected) < CLOSE
    # torchdiffeq bisects to its own tolerance; both agree with the closed form.
    assert abs(t_theirs - expected) < 1e-6
    np.testing.assert_allclose(s_ours, s_theirs, atol=1e-6)
    assert s_ours.shape == (2, 1)
    np.testing.assert_allclose(g_ours, g_theirs, atol=1e-5)
    np.testing.assert_allclose(g_ours, [1 / (K * Y0), -math.log(Y0 / level) / K**2], atol=1e-7)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("reverse_time", [False, True])
def test_odeint_takes_torchdiffeqs_event_fn(interface, reverse_time):
    # torchdiffeq's odeint(func, y0, [t0, t1], event_fn=...) solves from t0 in the direction
    # of t1 until the event; odecore's odeint refused the keyword. The event time and its
    # gradients against the closed form t* = log(y0 / c) / k (backward: from y0 up to c).
    import torch

    k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([Y0], dtype=torch.float64, requires_grad=True)
    level = LEVEL if not reverse_time else 4.0
    t = torch.tensor([0.0, -1.0 if reverse_time else 1.0], dtype=torch.float64)
    event_t, states = getattr(odecore, interface)(
        lambda t, y, k: -k * y, y0, t, params=k, event_fn=lambda t, y, k: y[0] - level,
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    expected = math.log(Y0 / level) / K
    assert abs(float(event_t.detach()) - expected) < CLOSE
    np.testing.assert_allclose(states.detach().numpy(), [[Y0], [level]], atol=1e-8)
    grads = [float(g) for g in torch.autograd.grad(event_t, (y0, k))]
    np.testing.assert_allclose(grads, [1 / (K * Y0), -math.log(Y0 / level) / K**2], atol=1e-7)
    with pytest.raises(ValueError, match=r"t must be \[t0, t1\] .* got shape \(3,\)"):
        odecore.odeint(lambda t, y: -y, y0, torch.zeros(3), event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="both event= and event_fn="):
        odecore.odeint(lambda t, y: -y, y0, t, event_fn=lambda t, y: y[0], event=lambda t, y: y[0])


def test_vjp_odeint_event_gradients_of_a_batch():
    y0s = np.array([[2.0], [1.0], [3.0]])
    params = (np.array(K), np.array(LEVEL))
    ys, events, pullback = odecore.vjp_odeint(
        DecayWithVjp(),
        y0s,
        np.array([0.0, 3.0]),
        params,
        batch_axis=0,
        event=LevelWithVjp(),
        **TIGHT,
    )
    np.testing.assert_allclose(events.t, np.log(y0s[:, 0] / LEVEL) / K, atol=CLOSE)
    y0_bar, params_bar, _ = pullback(np.zeros_like(ys), event_t_bar=np.ones(3))
    # Each sample's own event time depends on its own y0 only; k and c are shared.
    np.testing.assert_allclose(y0_bar[:, 0], 1 / (K * y0s[:, 0]), atol=GRAD_CLOSE)
    dk = np.sum(-np.log(y0s[:, 0] / LEVEL) / K**2)
    np.testing.assert_allclose([params_bar[0], params_bar[1]], [dk, -3 / (K * LEVEL)], atol=1e-6)


def test_vjp_odeint_equal_event_times_far_from_zero():
    # The gradients come from a second solve whose output times are the samples' stop
    # times: two samples stopped by the same event (y0 = 2), and two with no event (stopped
    # at t[-1]), have equal ones. Nudged apart by a few units in the last place of their
    # distance from t[0], they rounded back together at t[0] = 1000 and the second solve
    # refused its repeated output times.
    t0 = 1000.0
    y0s = np.array([[2.0], [2.0], [1.0], [0.4], [0.3]])
    params = (np.array(K), np.array(LEVEL))
    ys, events, pullback = odecore.vjp_odeint(
        DecayWithVjp(),
        y0s,
        np.array([t0, t0 + 4.0]),
        params,
        batch_axis=0,
        event=LevelWithVjp(),
        **TIGHT,
    )
    hit = y0s[:3, 0]
    np.testing.assert_allclose(events.t[:3], t0 + np.log(hit / LEVEL) / K, rtol=0, atol=CLOSE)
    assert np.isnan(events.t[3:]).all()
    y0_bar, params_bar, _ = pullback(np.zeros_like(ys), event_t_bar=np.ones(5))
    np.testing.assert_allclose(y0_bar[:, 0], [*(1 / (K * hit)), 0.0, 0.0], atol=GRAD_CLOSE)
    dk = np.sum(-np.log(hit / LEVEL) / K**2)
    np.testing.assert_allclose([params_bar[0], params_bar[1]], [dk, -3 / (K * LEVEL)], atol=1e-6)


@pytest.mark.backend("numba")
def test_numba_runs_events_through_the_generic_loop():
    def rate(t, y, dy, params):
        dy[0] = -params[0][0] * y[0]

    sol = odecore.solve(
        rate,
        np.array([Y0]),
        np.array([0.0, 3.0]),
        params=(np.array([K]),),
        backend="numba",
        event=lambda t, y, params: y[0] - LEVEL,
        **TIGHT,
    )
    assert int(sol.status) == int(odecore.Status.EVENT)
    assert abs(float(sol.events.t) - T_STAR) < CLOSE


def _event_times_and_gradients(backend, mode, y0s, times):
    """Each sample's time of reaching LEVEL under ``decay`` (NaN where it does not), and the
    gradients of their sum, the NaNs left out, in ``y0`` and ``K``: one batched solve in
    ``mode``, as NumPy arrays and a float."""

    def event_times(y0, k):
        sol = odecore.solve(
            decay,
            y0[:, None],
            backend.asarray(times),
            params=(k, backend.asarray(LEVEL)),
            event=below_level,
            batch_axis=0,
            adjoint=mode,
            **TIGHT,
        )
        return sol.events.t

    if backend.name == "torch":
        import torch

        y0 = torch.tensor(y0s, requires_grad=True)
        k = torch.tensor(K, dtype=torch.float64, requires_grad=True)
        t = event_times(y0, k)
        dy0, dk = torch.autograd.grad(torch.where(torch.isnan(t), 0.0, t).sum(), (y0, k))
        return t.detach().numpy(), dy0.numpy(), float(dk)
    import jax
    import jax.numpy as jnp

    def total(y0, k):
        t = event_times(y0, k)
        return jnp.sum(jnp.where(jnp.isnan(t), 0.0, t)), t

    (_, t), (dy0, dk) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(y0s), jnp.asarray(K)
    )
    return np.asarray(t), np.asarray(dy0), float(dk)


@pytest.mark.parametrize(
    "mode", ["direct", "backsolve", pytest.param("checkpoint", marks=pytest.mark.slow_on("jax"))]
)
def test_batched_event_time_gradients_per_sample(backend, mode):
    if mode not in MODES.get(backend.name, []):
        pytest.skip(f"{backend.name} has no {mode!r} mode with autodiff")
    # The last sample starts below the level: no event, NaN time, and no gradient leaking
    # from it into the others (its cotangent is zero).
    y0s = np.array([2.0, 1.0, 3.0, 0.4])
    t, dy0, dk = _event_times_and_gradients(backend, mode, y0s, [0.0, 4.0])
    hit = y0s[:3]
    np.testing.assert_allclose(t[:3], np.log(hit / LEVEL) / K, atol=CLOSE)
    assert np.isnan(t[3])
    np.testing.assert_allclose(dy0, [*(1 / (K * hit)), 0.0], atol=GRAD_CLOSE)
    np.testing.assert_allclose(dk, np.sum(-np.log(hit / LEVEL) / K**2), atol=GRAD_CLOSE)


@pytest.mark.parametrize("mode", ["direct", "backsolve", "checkpoint"])
def test_equal_event_times_far_from_zero_get_their_gradients(backend, mode):
    if mode not in MODES.get(backend.name, []):
        pytest.skip(f"{backend.name} has no {mode!r} mode with autodiff")
    # Two samples stopped by the same event (y0 = 2) and two with none (both stopped at the
    # end) share their stop times, far from zero. The gradients' second solve refused its
    # repeated output times on torch, and on JAX, where that is known only at run time,
    # every gradient was NaN.
    t0 = 1000.0
    y0s = np.array([2.0, 2.0, 1.0, 0.4, 0.3])
    t, dy0, dk = _event_times_and_gradients(backend, mode, y0s, [t0, t0 + 4.0])
    hit = y0s[:3]
    # The time's absolute error does not grow with t0 (the decay is autonomous).
    np.testing.assert_allclose(t[:3], t0 + np.log(hit / LEVEL) / K, rtol=0, atol=CLOSE)
    assert np.isnan(t[3:]).all()
    np.testing.assert_allclose(dy0, [*(1 / (K * hit)), 0.0, 0.0], atol=GRAD_CLOSE)
    np.testing.assert_allclose(dk, np.sum(-np.log(hit / LEVEL) / K**2), atol=GRAD_CLOSE)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["backsolve", "checkpoint"])
def test_an_event_within_a_float32_ulp_of_t0_gets_its_gradient(mode):
    # Event times are float64 beside a float32 t; t* = t0 + log(1 / c) lies 1e-6 after
    # t0 = 1000, within half a float32 unit in the last place there (a unit is 6e-5): rounded onto
    # t0 the gradients' second solve refused its output times [t0, t0].
    import torch

    c = float(np.float32(1.0 - 1e-6))  # the level as the float32 event function sees it
    y0 = torch.tensor([1.0], requires_grad=True)
    sol = odecore.solve(
        lambda t, y: -y,
        y0,
        torch.tensor([1000.0, 1001.0]),
        event=lambda t, y: y[0] - c,
        adjoint=mode,
    )
    # y - c near 1 is resolved to float32's unit in the last place, and |dy/dt| = 1 there.
    eps32 = float(np.finfo(np.float32).eps)
    assert abs(float(sol.events.t.detach()) - (1000.0 - math.log(c))) < 2 * eps32
    (dt_dy0,) = torch.autograd.grad(sol.events.t, y0)
    # d t*/d y0 = 1 / y0, from float32 states: a few units in float32's last place.
    assert abs(float(dt_dy0) - 1.0) < 1e-5


def test_odeint_event_on_a_structured_state(backend):
    # The ball from height H0 at rest: it lands at sqrt(2 H0 / G) with speed -sqrt(2 G H0).
    state = (backend.asarray([H0]), backend.asarray([0.0]))
    event_t, (h, v) = odecore.odeint_event(
        ball, state, backend.asarray(0.0), event_fn=lambda t, y: y[0][0], **TIGHT
    )
    assert abs(float(backend.to_numpy(event_t)) - math.sqrt(2 * H0 / G)) < CLOSE
    np.testing.assert_allclose(backend.to_numpy(h), [[H0], [0.0]], atol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(v), [[0.0], [-math.sqrt(2 * G * H0)]], atol=CLOSE)


def test_odeint_event_without_a_crossing_raises(backend):
    # dy/dt = v from y = 1: the samples with v < 0 cross y = 0 at t = 1 / |v|; with v > 0
    # they never do, and their steps grow until they reach odeint_event's far horizon, with
    # NaN for an event time.
    def rise(t, y, v):
        return v[:, None] + 0 * y

    v = backend.asarray([-1.0, 2.0, -4.0, 3.0])
    missing = r"never crossed zero for 2 of 4 samples: 1 .*, 3 "
    with pytest.raises(odecore.SolveError, match=missing):
        odecore.odeint_event(
            rise,
            backend.asarray([[1.0]] * 4),
            0.0,
            params=v,
            batch_axis=0,
            event_fn=lambda t, y, v: y[:, 0],
        )
    event_t, _ = odecore.odeint_event(
        rise, backend.asarray([[1.0], [1.0]]), 0.0, params=v[::2], batch_axis=0,
        event_fn=lambda t, y, v: y[:, 0], **TIGHT,
    )  # fmt: skip
    np.testing.assert_allclose(backend.to_numpy(event_t), [1.0, 0.25], rtol=CLOSE)
    # The steps grow toward the horizon without overflowing on the way (NumPy warned).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(odecore.SolveError, match="never crossed zero before the solve"):
            odecore.odeint_event(
                lambda t, y: 1 + 0 * y, backend.asarray([1.0]), 0.0, event_fn=lambda t, y: y[0]
            )


def test_odeint_event_with_a_value_zero_at_t0_finds_the_others_crossing(backend):
    # u' = -u from 1 and s' = 1 from 0, with event_fn = (u - 1/2, s): u crosses 1/2 at
    # t = log 2. The values were combined as the least of value times its sign at t0, which
    # for s (sign 0) stayed 0 for good: the crossing was never found, and the solve ground on
    # to max_num_steps. A value zero at t0 counts once it has left zero, as a single one does.
    xp = backend.xp

    def field(t, y):
        return xp.stack([-y[0], y[1] * 0.0 + 1.0])

    def levels(t, y):
        return xp.stack([y[0] - 0.5, y[1]])

    event_t, ys = odecore.odeint_event(
        field, backend.asarray([1.0, 0.0]), 0.0, event_fn=levels, **TIGHT
    )
    np.testing.assert_allclose(float(event_t), math.log(2.0), rtol=CLOSE)
    np.testing.assert_allclose(backend.to_numpy(ys)[-1], [0.5, math.log(2.0)], rtol=CLOSE)

    # A value that leaves zero and comes back is the event: v' = 1 - 2t from 0 gives
    # v = t - t^2, back at zero at t = 1, before u = exp(-t) reaches 1/4 at t = log 4.
    def field_back(t, y):
        return xp.stack([-y[0], y[1] * 0.0 + 1.0 - 2.0 * t])

    def levels_back(t, y):
        return xp.stack([y[0] - 0.25, y[1]])

    event_t, _ = odecore.odeint_event(
        field_back, backend.asarray([1.0, 0.0]), 0.0, event_fn=levels_back, **TIGHT
    )
    np.testing.assert_allclose(float(event_t), 1.0, rtol=CLOSE)


def test_odeint_event_missing_a_return_within_a_step_names_max_step(backend):
    # y' = t from y(2) = 2.075 backward: y = 2.075 + (t^2 - 4) / 2 falls to y = 1 at
    # t = sqrt(1.85) and rises again. dopri5 integrates the quadratic exactly, so its error
    # estimate is zero and its steps grow until one crosses y = 1 and comes back: the message
    # said only that event_fn never crossed zero. It names max_step, which finds the crossing.
    def rate(t, y):
        return t + 0 * y

    def level(t, y):
        return y[0] - 1.0

    y0, t0 = backend.asarray([2.075]), backend.asarray(2.0)
    with pytest.raises(odecore.SolveError, match=r"never crossed zero .*options\['max_step'\]"):
        odecore.odeint_event(rate, y0, t0, event_fn=level, reverse_time=True, **TIGHT)
    event_t, _ = odecore.odeint_event(
        rate, y0, t0, event_fn=level, reverse_time=True, options={"max_step": 0.25}, **TIGHT
    )
    np.testing.assert_allclose(float(backend.to_numpy(event_t)), math.sqrt(1.85), rtol=CLOSE)


def test_odeint_event_out_of_steps_says_no_event_was_found(backend):
    # A decay keeps an explicit method's steps bounded by its stability, so an event that
    # never comes ends the solve at max_num_steps, not at the horizon: the message says that
    # no event was found and what to check.
    with pytest.raises(odecore.SolveError, match=r"max_num_steps reached.*no event had been"):
        odecore.odeint_event(
            lambda t, y: -y,
            backend.asarray([1.0]),
            0.0,
            event_fn=lambda t, y: y[0] + 1.0,
            options={"max_num_steps": 200},
        )


def test_odeint_event_names_how_it_calls_event_fn(backend):
    with pytest.raises(TypeError, match=r"calls event_fn\(t, y, params\) when params are"):
        odecore.odeint_event(
            lambda t, y, k: -k * y,
            backend.asarray([1.0]),
            0.0,
            params=backend.asarray(1.0),
            event_fn=lambda t, y: y[0] - 0.5,
        )


def test_odeint_event_refuses_several_initial_times(backend):
    with pytest.raises(ValueError, match=r"t0 must be one time .* shape \(2,\)"):
        odecore.odeint_event(
            lambda t, y: -y, backend.asarray([1.0]), backend.asarray([0.0, 1.0]),
            event_fn=lambda t, y: y[0] - 0.5,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("t0", "error", "match"),
    [
        # None was read as NaN and reported as "t contains NaN"; a string was parsed as a
        # number; True was time 1.
        (None, TypeError, r"^t0 must be a time .* got None"),
        ("0", TypeError, r"^t0 must be a time .* got '0'"),
        (True, TypeError, r"^t0 must be a time .* got True"),
        (math.nan, ValueError, r"^t0 must be a finite time, got nan"),
        (-math.inf, ValueError, r"^t0 must be a finite time, got -inf"),
    ],
    ids=["None", "str", "bool", "nan", "inf"],
)
def test_odeint_event_names_a_bad_initial_time(backend, t0, error, match):
    with pytest.raises(error, match=match):
        odecore.odeint_event(
            lambda t, y: -y, backend.asarray([1.0]), t0, event_fn=lambda t, y: y[0] - 0.5
        )


@pytest.mark.parametrize(
    ("y0", "error", "match"),
    [
        # The dtype's largest value, which sets the horizon, failed on these first:
        # "data type <class 'numpy.object_'> not inexact", an IndexError for an empty y0.
        (None, TypeError, r"^y0 must be an array of real floating numbers, got None"),
        ([1, 2], TypeError, r"^y0 must have a real floating dtype, got \S*int"),
        ([], ValueError, r"^y0 is empty"),
    ],
    ids=["None", "int", "empty"],
)
def test_odeint_event_names_a_bad_initial_state(backend, y0, error, match):
    y0 = y0 if y0 is None else backend.asarray(y0, dtype=None)
    with pytest.raises(error, match=match):
        odecore.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5)


def test_odeint_event_refuses_a_reverse_time_that_is_not_a_bool(backend):
    with pytest.raises(TypeError, match=r"^reverse_time must be True or False, got 1"):
        odecore.odeint_event(
            lambda t, y: -y, backend.asarray([1.0]), 0.0, event_fn=lambda t, y: y[0] - 0.5,
            reverse_time=1,
        )  # fmt: skip


def test_odeint_event_from_an_integer_initial_time_finds_the_closed_form(backend):
    """An integer array t0 is a time in y0's dtype; torch's integer tensor failed with
    "'torch.dtype' object has no attribute 'dtype'"."""
    y0 = backend.asarray([Y0])
    t0 = backend.asarray(1, dtype="int64")
    event_t, _ = odecore.odeint_event(
        lambda t, y: -K * y, y0, t0, event_fn=lambda t, y: y[0] - LEVEL, **TIGHT
    )
    # The crossing of Y0 * exp(-K (t - 1)) = LEVEL, to the global error of a tolerance
    # of 1e-10 over a span of 2 (the event's root is located to a few ulp of the time).
    assert abs(float(backend.to_numpy(event_t)) - (1.0 + T_STAR)) < CLOSE


@pytest.mark.backend("torch")
def test_second_derivative_of_an_event_time_raises_on_torch():
    # torch's 'direct' mode takes second derivatives of the states, but the event time's
    # gradient is the implicit function theorem's to first order: its Hessian came out
    # 20-70% off. The first derivative, with create_graph, is unchanged.
    import torch

    k = torch.tensor([K, 0.3], dtype=torch.float64, requires_grad=True)
    event_t, _ = odecore.odeint_event(
        lambda t, y, k: -k[0] * y * (1.0 + k[1] * t),
        torch.tensor([Y0], dtype=torch.float64), 0.0, params=k,
        event_fn=lambda t, y, k: y[0] - LEVEL, **TIGHT,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(event_t, k, create_graph=True)
    # t* solves log(y0 / c) = k0 (t + k1 t^2 / 2); d t*/d k0 = -(t + k1 t^2 / 2) / (k0 (1 + k1 t)).
    t = event_t.item()
    assert abs(float(grad[0].detach()) + (t + 0.3 * t**2 / 2) / (K * (1 + 0.3 * t))) < GRAD_CLOSE
    with pytest.raises(NotImplementedError, match="second-order derivatives of an event"):
        torch.autograd.grad(grad[0], k)
