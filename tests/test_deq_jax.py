"""Fixed points on the JAX backend: eager, under jit, grad and vmap.

References not from the JAX backend: closed forms (z = cos z, affine maps solved with
numpy.linalg), and central finite differences of the float64 solve.
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_params import framework_module

pytestmark = pytest.mark.backend("jax")
jax = framework_module("jax")
jnp = jax.numpy

import odecore  # noqa: E402

DOTTIE = 0.7390851332151607
W = np.array([[0.3, -0.2, 0.1], [0.1, 0.25, -0.15], [-0.2, 0.05, 0.2]])
BIAS = np.array([[0.5, -1.0, 0.25], [1.5, 0.3, -0.7]])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def cos_map(z, b):
    return jnp.cos(z) + b


def affine(z, params):
    w, b = params
    return z @ w.T + b


def solve(f, z0, params, **kw):
    kw.setdefault("tol", 1e-12)
    kw.setdefault("max_iter", 200)
    return odecore.solve_fixed_point(f, z0, params, batch_axis=0, backend="jax", **kw)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_dottie_number_eager_and_jit(x64, solver):
    z0, b = jnp.zeros((3, 1)), jnp.zeros((3, 1))
    sol = solve(cos_map, z0, b, solver=solver)
    np.testing.assert_allclose(np.asarray(sol.z), DOTTIE, rtol=0, atol=1e-10)
    assert sol.success
    jitted = jax.jit(lambda b: solve(cos_map, z0, b, solver=solver).z)(b)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(sol.z))


def test_affine_closed_form_and_per_sample_statistics(x64):
    z0 = jnp.zeros(BIAS.shape)

    def run(w, b):
        sol = solve(affine, z0, (w, b), solver="anderson")
        return sol.z, sol.status, sol.iterations, sol.abs_residual

    z, status, iterations, abs_residual = jax.jit(run)(W, BIAS)
    want = np.linalg.solve(np.eye(3) - W, BIAS.T).T
    np.testing.assert_allclose(np.asarray(z), want, rtol=0, atol=1e-10)
    assert np.asarray(status).tolist() == [0, 0]
    assert np.asarray(iterations).shape == (2,)
    assert (np.asarray(abs_residual) <= 1e-12).all()


def test_max_iter_is_reported_under_jit_without_raising(x64):
    z0, b = jnp.zeros((2, 1)), jnp.zeros((2, 1))

    def run(b):
        sol = solve(cos_map, z0, b, solver="picard", max_iter=3)
        return sol.status, sol.iterations

    status, iterations = jax.jit(run)(b)
    assert np.asarray(status).tolist() == [1, 1]
    assert np.asarray(iterations).tolist() == [3, 3]


def test_a_failed_fixed_point_under_jit_and_vmap_is_nan(x64):
    # z = a z + 1 has z* = 1 / (1 - a); five Picard steps from 0 reach it for no a here. Under
    # jit the last iterate (4.1 for a = 0.9) was returned as the fixed point, silently: with
    # throw=True a failed sample is NaN, value and gradient, as a failed ODE solve is.
    def zstar(a, **kw):
        return odecore.fixed_point(
            lambda z, a: a * z + 1.0, jnp.zeros(2), a, solver="picard", max_iter=5, **kw
        )

    assert np.isnan(np.asarray(jax.jit(zstar)(0.9))).all()
    assert np.isnan(np.asarray(jax.vmap(zstar)(jnp.asarray([0.5, 0.9])))).all()
    assert np.isnan(float(jax.jit(jax.grad(lambda a: zstar(a).sum()))(0.9)))
    # A converged sample keeps its value beside a failed one (per-sample status).
    sol = jax.jit(lambda b: solve(lambda z, b: 0.5 * z + b, jnp.zeros((2, 1)), b, max_iter=60))(
        jnp.asarray([[1.0], [jnp.inf]])
    )
    np.testing.assert_allclose(np.asarray(sol.z)[0], [2.0], rtol=1e-11)
    assert np.isnan(np.asarray(sol.z)[1]).all()
    # throw=False keeps the last iterate: sum_{k<5} 0.9^k.
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda a: zstar(a, throw=False))(0.9)), (1 - 0.9**5) / 0.1, rtol=1e-12
    )


def test_implicit_gradient_of_cos_map_closed_form(x64):
    z0, b = jnp.zeros((3, 1)), jnp.zeros((3, 1))
    for backward_solver in ("picard", "anderson"):

        def loss(b, backward_solver=backward_solver):
            return solve(cos_map, z0, b, backward_solver=backward_solver).z.sum()

        g = jax.jit(jax.grad(loss))(b)
        np.testing.assert_allclose(np.asarray(g), 1 / (1 + np.sin(DOTTIE)), rtol=1e-9)


def test_implicit_gradient_of_affine_map_closed_form(x64):
    z0 = jnp.zeros(BIAS.shape)
    g = jax.grad(lambda b: solve(affine, z0, (jnp.asarray(W), b)).z.sum())(jnp.asarray(BIAS))
    want = np.linalg.solve((np.eye(3) - W).T, np.ones(3))
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(want, BIAS.shape), rtol=1e-9)


@pytest.mark.parametrize(
    "backward, kw",
    [("implicit", {}), ("one_step", {}), ("unrolled", {"unroll_steps": 4, "unroll_damping": 0.7})],
)
def test_gradient_modes_match_finite_differences(x64, backward, kw):
    z0 = jnp.zeros(BIAS.shape)
    w = jnp.asarray(W)

    def loss(b):
        return (solve(affine, z0, (w, b), backward=backward, **kw).z ** 2).sum()

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(BIAS)))
    if backward != "implicit":
        # one_step / unrolled differentiate k damped steps from the detached z*, so their
        # reference is the finite difference of that function, built here in NumPy.
        z_star = np.linalg.solve(np.eye(3) - W, BIAS.T).T
        steps, d = (1, 1.0) if backward == "one_step" else (4, 0.7)

        def reference(b):
            z = z_star
            for _ in range(steps):
                z = (1 - d) * z + d * (z @ W.T + b)
            return (z**2).sum()
    else:

        def reference(b):
            return (np.linalg.solve(np.eye(3) - W, b.T).T ** 2).sum()

    eps = 1e-6
    fd = np.zeros_like(BIAS)
    for idx in np.ndindex(BIAS.shape):
        e = np.zeros_like(BIAS)
        e[idx] = eps
        fd[idx] = (reference(BIAS + e) - reference(BIAS - e)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)


def test_vmap_of_grad_equals_per_sample_grad(x64):
    w = jnp.asarray(W)

    def loss(b):
        return solve(affine, jnp.zeros((1, 3)), (w, b[None])).z.sum()

    bs = jnp.asarray(BIAS)
    batched = np.asarray(jax.vmap(jax.grad(loss))(bs))
    for i in range(bs.shape[0]):
        np.testing.assert_allclose(batched[i], np.asarray(jax.grad(loss)(bs[i])), rtol=1e-12)


def test_batch_independence(x64):
    z0 = jnp.zeros((2, 1))
    b = jnp.array([[0.0], [0.5]])
    both = solve(cos_map, z0, b).z
    alone = solve(cos_map, z0[1:], b[1:]).z
    np.testing.assert_allclose(np.asarray(both[1:]), np.asarray(alone), rtol=0, atol=1e-12)


def tanh_layer(z, params):
    w, b = params
    return jnp.tanh(z @ w.T + b)


def test_gmres_backward_under_jit_matches_eager_and_a_direct_linear_solve(x64):
    # GMRES is one masked while_loop with a fixed-length cycle, so it traces under jit.
    # Reference: at z* = tanh(W z* + b), J = D W with D = diag(1 - z*^2), and the loss
    # sum(c * z*) has db = u D with (I - J)^T u = c, solved directly in float64.
    c = np.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])
    z0, w = jnp.zeros(BIAS.shape), jnp.asarray(W)

    def loss(b):
        return (solve(tanh_layer, z0, (w, b), backward_solver="gmres").z * c).sum()

    eager = np.asarray(jax.grad(loss)(jnp.asarray(BIAS)))
    jitted = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(BIAS)))
    want = np.zeros_like(BIAS)
    for i in range(BIAS.shape[0]):
        z = np.zeros(3)
        for _ in range(200):  # |W|_2 < 0.5: 200 steps contract far below float64 rounding
            z = np.tanh(W @ z + BIAS[i])
        d = 1 - z**2
        u = np.linalg.solve((np.eye(3) - d[:, None] * W).T, c[i])
        want[i] = u * d
    # tol 1e-12 on the forward and on the backward's linear residual, with I - J well
    # conditioned: the gradient is exact to about 1e-11.
    np.testing.assert_allclose(eager, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jitted, want, rtol=1e-9, atol=1e-12)


def test_unconverged_solve_raises_eagerly(x64):
    # z -> 2 z + b: the fixed point -b repels, so Picard's best iterate is z0 = 0, whose
    # residual is |b| = 1.
    with pytest.raises(odecore.FixedPointError) as info:
        solve(lambda z, b: 2 * z + b, jnp.zeros((2, 1)), jnp.ones((2, 1)), solver="picard")
    message = str(info.value)
    assert "for 2 of 2 samples (indices 0, 1)" in message
    assert "residual ||f(z) - z|| = 1 (tol 1e-12) after 200 iterations" in message
    np.testing.assert_array_equal(np.asarray(info.value.solution.z), 0.0)


def test_captured_differentiated_value_raises(x64):
    z0, b = jnp.zeros((2, 1)), jnp.ones((2, 1))

    def loss(w):
        return solve(lambda z, p: w * z + p, z0, b).z.sum()

    # The message names the fixed point's map as docs/deq.md writes it, not an ODE's func.
    for transform in (jax.grad, lambda fn: jax.jit(jax.grad(fn))):
        with pytest.raises(ValueError, match=r"fixed-point solve.*as f\(z, params\)"):
            transform(loss)(0.5)
    # Under grad of a jit the capture cannot be seen: the gradient is NaN, never a wrong
    # finite number (the true dz*/dw summed is 2 b / (1 - w)^2 = 8).
    assert np.isnan(float(jax.grad(jax.jit(loss))(0.5)))
    # The remedy, w in params, gives that closed form.
    g = jax.grad(lambda w: solve(lambda z, p: p[0] * z + p[1], z0, (w, b)).z.sum())(
        jnp.asarray(0.5)
    )
    assert abs(float(g) - 8.0) < 1e-9


@pytest.mark.parametrize("setting", ["tol", "damping"])
def test_a_differentiated_setting_is_refused_by_name(x64, setting):
    # Refused as being differentiated, as a solve's rtol is, not for the tracer's type.
    z0, b = jnp.zeros((2, 1)), jnp.ones((2, 1))

    def loss(value):
        kwargs = {setting: value, "solver": "picard"}
        return solve(lambda z, p: 0.5 * z + p, z0, b, **kwargs).z.sum()

    for transform in (jax.grad, lambda fn: jax.jit(jax.grad(fn))):
        with pytest.raises(ValueError, match=rf"^{setting} is being differentiated.*Python float"):
            transform(loss)(0.5)


def test_map_returning_a_list_is_named(x64):
    with pytest.raises(TypeError, match="f must return a jax array.*it returned a list"):
        solve(lambda z, b: [z, b], jnp.zeros((2, 1)), jnp.ones((2, 1)))


@pytest.mark.parametrize("backward_solver", ["anderson", "gmres"])
def test_linearize_once_traces_f_once_in_the_backward(x64, backward_solver):
    z0, w = jnp.zeros(BIAS.shape), jnp.asarray(W)
    calls = {"counting": False, "n": 0}

    def counted_affine(z, params):
        calls["n"] += calls["counting"]
        return affine(z, params)

    grads, backward_calls = {}, {}
    for linearization in ("once", "per_iteration"):
        z, pullback = jax.vjp(
            lambda b, lin=linearization: (
                solve(
                    counted_affine,
                    z0,
                    (w, b),
                    backward_solver=backward_solver,
                    backward_linearization=lin,
                ).z
            ),
            jnp.asarray(BIAS),
        )
        calls["counting"], calls["n"] = True, 0
        (grads[linearization],) = pullback(2 * z)
        calls["counting"] = False
        backward_calls[linearization] = calls["n"]
    # JAX calls f while tracing: "once" traces it one time, outside the backward's loop,
    # so it runs once; re-evaluating traces it inside the loop's body as well.
    assert backward_calls["once"] == 1
    assert backward_calls["per_iteration"] >= 2
    # The gradient of sum(z*^2) for the affine map: 2 z*^T (I - W)^{-1}, per sample; the
    # backward solve converges to 1e-12, far inside the tolerance below.
    z_star = np.linalg.solve(np.eye(3) - W, BIAS.T).T
    expected = np.linalg.solve((np.eye(3) - W).T, 2 * z_star.T).T
    for g in grads.values():
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        np.asarray(grads["once"]), np.asarray(grads["per_iteration"]), rtol=1e-12, atol=1e-14
    )


def test_spectral_radius_under_jit(x64):
    # W's dominant eigenvalues are a complex pair; the estimate is their modulus under jit.
    estimate = jax.jit(
        lambda w: odecore.spectral_radius(
            lambda z, p: z @ p.T, jnp.zeros(3), w, iterations=60, backend="jax"
        )
    )(jnp.asarray(W))
    eigenvalues = np.linalg.eigvals(W)
    assert np.iscomplexobj(eigenvalues[np.argmax(np.abs(eigenvalues))])
    assert abs(float(estimate) - np.max(np.abs(eigenvalues))) < 1e-9


def test_spectral_radius_has_no_gradient(x64):
    """As documented, and as on torch. Traced through, the power iteration had a nonzero
    derivative with respect to the map's parameters."""

    def estimate(w, z):
        return odecore.spectral_radius(lambda z, p: z @ p.T, z, w, iterations=30, backend="jax")

    w, z = jnp.asarray(W), jnp.zeros(3)
    value = estimate(w, z)
    assert abs(float(value) - np.max(np.abs(np.linalg.eigvals(W)))) < 1e-6
    dw, dz = jax.grad(estimate, argnums=(0, 1))(w, z)
    assert np.all(np.asarray(dw) == 0.0)
    assert np.all(np.asarray(dz) == 0.0)


def test_a_backward_that_does_not_converge_gives_nan_under_jit(x64):
    # f = 0.99 z + p: dz*/dp = 100; 20 Picard backward iterations gave 18.2 without a word.
    # Under jit nothing can be raised: the gradient is NaN, as a failed ODE solve's is.
    def loss(p, **options):
        return solve(
            lambda z, p: 0.99 * z + p, jnp.zeros((1, 2)), p, solver="anderson", **options
        ).z.sum()

    grad = jax.jit(jax.grad(lambda p: loss(p, backward_solver="picard", backward_max_iter=20)))(
        jnp.ones((1, 2))
    )
    assert np.isnan(np.asarray(grad)).all()
    grad = jax.jit(jax.grad(loss))(jnp.ones((1, 2)))
    np.testing.assert_allclose(np.asarray(grad), 100.0, rtol=1e-8)


@pytest.mark.parametrize("c", [0.5, -1.5])
def test_gmres_backward_when_the_krylov_space_is_invariant(x64, c):
    # J_f = c I: the small least-squares system was singular, and the gradient came out 0.
    grad = jax.grad(
        lambda p: solve(
            lambda z, p: c * z + p, jnp.zeros((1, 5)), p, solver="anderson", backward_solver="gmres"
        ).z.sum()
    )(jnp.ones((1, 5)))
    np.testing.assert_allclose(np.asarray(grad), 1 / (1 - c), rtol=1e-10)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "unrolled"])
@pytest.mark.parametrize("batched", ["batch_axis", "vmap"])
def test_a_nan_sample_the_loss_skips_leaves_the_shared_gradient(x64, backward, batched):
    """z = a z + 1 with a NaN z0 in one sample and a loss (nansum) that does not read it:
    that sample's VJP at z* = NaN summed 0 * NaN into the shared a's gradient. The others
    get theirs: dz*/da = 1 / (1 - a)^2 exactly (implicit), z* for the one-step gradient,
    and 1 + a + ... + a^(k-1) times z* for k unrolled steps."""
    a = 0.5
    z0 = jnp.asarray([[0.0], [np.nan], [1.0]])

    def fixed_point(a, z0):
        kw = dict(tol=1e-13, max_iter=200, throw=False, backward=backward)
        if batched == "vmap":
            return jax.vmap(lambda z: odecore.fixed_point(lambda z, a: a * z + 1.0, z, a, **kw))(z0)
        return odecore.fixed_point(lambda z, a: a * z + 1.0, z0, a, batch_axis=0, **kw)

    got = jax.grad(lambda a: jnp.nansum(fixed_point(a, z0)))(a)
    z_star = 1.0 / (1.0 - a)
    per_sample = {
        "implicit": z_star / (1.0 - a),
        "one_step": z_star,
        # The solver's default unroll_steps, 5 steps of the undamped map.
        "unrolled": z_star * sum(a**i for i in range(5)),
    }[backward]
    assert np.isnan(np.asarray(fixed_point(a, z0))[1]).all()
    # Rounding of a 1e-13 fixed point, amplified by at most 1 / (1 - a) = 2.
    assert abs(float(got) - 2 * per_sample) < 1e-11


def test_reverse_over_reverse_is_refused_and_forward_over_reverse_is_exact(x64):
    # z* = a z* + 1 is 1 / (1 - a), so d2z*/da2 = 2 / (1 - a)^3. grad of grad failed with
    # JAX's words about lax.while_loop, which name no remedy.
    def z_star(a):
        return odecore.fixed_point(lambda z, a: a * z + 1.0, jnp.asarray([0.0]), a, tol=1e-13)[0]

    a = jnp.asarray(0.5)
    with pytest.raises(NotImplementedError, match=r"reverse-mode derivative.*jax\.hessian"):
        jax.grad(jax.grad(z_star))(a)
    # Iterations converged to 1e-13, amplified by at most (1 / (1 - a))^2 = 4 per derivative.
    assert float(jax.hessian(z_star)(a)) == pytest.approx(2 / (1 - 0.5) ** 3, abs=1e-10)
