"""odecore against diffrax on a small neural ODE, both jitted, on the CPU.

    python benchmarks/bench_jax.py              # a few minutes
    python benchmarks/bench_jax.py --quick      # shorter timings, no evaluation counts
    nox -s bench -- benchmarks/bench_jax.py     # in nox's virtualenv (needs diffrax)

The problem is bench_torch.py's: ``dy/dt = W2 tanh(W1 y + b1) + b2`` (state dimension 2,
hidden width 64) on a batch of 512 initial states solved as one state, float64, dopri5 at
rtol 1e-6 and atol 1e-8, on t in [0, 1] with outputs at t = 0 and 1. The parameters are passed
explicitly (``params=`` / ``args=``), as both libraries need for gradients.

Printed, odecore against diffrax (ratios odecore / diffrax; below 1 means odecore is faster;
each time is the best call of as many as fill --min-time seconds after the compile, the
calls of one row alternating so that a change in the machine's load affects both sides):

- the jitted forward solve against ``diffeqsolve`` with ``Dopri5`` and a ``PIDController``
  at the same tolerances;
- the jitted gradient of ``sum(y(1)**2)`` with respect to every parameter: ``backsolve``
  against ``BacksolveAdjoint``, ``checkpoint`` against ``RecursiveCheckpointAdjoint``
  (diffrax's default);
- the steps each library took, which should be comparable;
- compile times (trace, lower and compile, no run), separately;
- floors: the time of odecore's function evaluations alone (and, for a gradient, of its
  backward's VJPs), chained in a jitted loop, as a fraction of diffrax's time; no solver
  taking those evaluations is faster;
- each time beside the error of its result against the reference, and at the end a summary
  table of the ratios with those errors.

The reference is the same network solved by odecore with dopri8 at rtol = atol = 1e-12 in
float64, and for gradients the exact gradient of that discrete solve (``checkpoint``).
diffrax's Dopri8 at the same tolerances (its gradient by ``RecursiveCheckpointAdjoint``) is
printed beside it: their difference bounds the reference's error. Errors are
max |result - reference| / max |reference|, for the worst output or parameter gradient.

Both libraries get ``max_steps = 4096`` (diffrax's default), which also sizes odecore's
checkpoint buffers (the times of 4096 steps, the states of 64 plus a 64-state recompute
buffer). Each gradient's function evaluations (forward and backward together) are counted in
one more, untimed, call (not with --quick: it compiles four more functions). This is a
report, not a test: it exits 0 unless --strict is given and a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _common import (  # noqa: E402
    alternating_best_times,
    environment_lines,
    print_summary,
    relative_error,
)

import odecore  # noqa: E402

try:
    import diffrax
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench_jax.py compares with diffrax: pip install diffrax")

STATE, HIDDEN, BATCH = 2, 64, 512
RTOL, ATOL, METHOD = 1e-6, 1e-8, "dopri5"
MAX_STEPS = 4096
SEED = 0
# As in bench_torch.py: the step size varies along the solve, a few dozen steps.
W1_SCALE, W2_SCALE = 4.0, 4.0
TARGET = 1.0
REFERENCE_METHOD, REFERENCE_TOL = "dopri8", 1e-12


def make_params():
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(SEED), 5)
    params = {
        "w1": jax.random.normal(k1, (HIDDEN, STATE)) * (W1_SCALE / STATE**0.5),
        "b1": jax.random.normal(k2, (HIDDEN,)),
        "w2": jax.random.normal(k3, (STATE, HIDDEN)) * (W2_SCALE / HIDDEN**0.5),
        "b2": jax.random.normal(k4, (STATE,)) * 0.1,
    }
    y0 = jax.random.normal(k5, (BATCH, STATE))
    return params, y0


def mlp(t, y, p):
    return jnp.tanh(y @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]


TS = jnp.asarray([0.0, 1.0])


# --------------------------------------------------------------------------------------------
# The calls being compared


def odecore_solve(y0, params, adjoint="backsolve", func=mlp, method=METHOD, tol=(RTOL, ATOL)):
    return odecore.solve(
        func,
        y0,
        TS,
        params=params,
        rtol=tol[0],
        atol=tol[1],
        method=method,
        adjoint=adjoint,
        options={"max_num_steps": MAX_STEPS},
    )


def diffrax_solve(y0, params, adjoint=None, func=mlp, solver=None, tol=(RTOL, ATOL)):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: func(t, y, args)),
        solver or diffrax.Dopri5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=y0,
        args=params,
        saveat=diffrax.SaveAt(ts=TS),
        stepsize_controller=diffrax.PIDController(rtol=tol[0], atol=tol[1]),
        adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(),
        max_steps=MAX_STEPS,
    )


def odecore_forward(y0, params):
    return odecore_solve(y0, params).ys


def diffrax_forward(y0, params):
    return diffrax_solve(y0, params).ys


def evaluations_alone(nfev):
    """The forward's floor: ``nfev`` evaluations of the network, each input depending on the
    last output as a stage's does, in one jitted loop and nothing else. No solver that takes
    these evaluations can be faster; a ratio below floor / diffrax needs fewer of them."""

    return jax.jit(lambda y0, params: chained_evaluations(y0, params, nfev))


def chained_evaluations(y0, params, nfev):
    """``nfev`` evaluations of the network in one loop, each input depending on the last
    output, so that none can be skipped or run beside another."""

    def body(_, k):
        return mlp(0.0, y0 + 1e-3 * k, params)

    return jax.lax.fori_loop(0, nfev, body, jnp.zeros_like(y0))


def odecore_gradient(mode, func=mlp, **settings):
    def loss(params, y0):
        ys = odecore_solve(y0, params, adjoint=mode, func=func, **settings).ys
        return jnp.sum(ys[-1] ** 2)

    return jax.grad(loss)


def diffrax_gradient(adjoint, func=mlp, **settings):
    def loss(params, y0):
        ys = diffrax_solve(y0, params, adjoint=adjoint, func=func, **settings).ys
        return jnp.sum(ys[-1] ** 2)

    return jax.grad(loss)


# Each odecore gradient mode and the diffrax adjoint it is compared with.
GRADIENT_PEERS = {
    "backsolve": diffrax.BacksolveAdjoint(),
    "checkpoint": diffrax.RecursiveCheckpointAdjoint(),
}


def count_evaluations(make_gradient, params, y0) -> int:
    """Function evaluations of one jitted gradient call: a host callback in the dynamics
    counts them (forward and backward, VJPs included), outside the timed calls."""
    count = [0]

    def bump():
        count[0] += 1

    def counted(t, y, p):
        jax.debug.callback(bump)
        return mlp(t, y, p)

    jax.block_until_ready(jax.jit(make_gradient(counted))(params, y0))
    return count[0]


def count_gradient_evaluations(params, y0) -> dict:
    """Each gradient mode's evaluations, odecore's and diffrax's: {mode: (ours, theirs)}."""
    counts = {}
    for mode, adjoint in GRADIENT_PEERS.items():
        ours = count_evaluations(lambda f, m=mode: odecore_gradient(m, f), params, y0)
        theirs = count_evaluations(lambda f, a=adjoint: diffrax_gradient(a, f), params, y0)
        counts[mode] = (ours, theirs)
    return counts


def gradient_alone(forward_nfev, backward_nfev):
    """A gradient's floor: the forward's evaluations chained as in ``evaluations_alone``,
    then ``backward_nfev`` VJPs of the network (each evaluates it and pulls a cotangent back
    to the state and the parameters, as each of the backward's counted evaluations does),
    chained through the state's cotangent and summed into the parameters' as an adjoint's
    are. No gradient that takes these evaluations can be faster."""

    def run(params, y0):
        def backward(_, carry):
            a, g = carry
            _, pull = jax.vjp(lambda y, p: mlp(0.0, y, p), y0 + 1e-3 * a, params)
            a_bar, p_bar = pull(a)
            return a + 1e-3 * a_bar, jax.tree.map(lambda x, d: x + 1e-3 * d, g, p_bar)

        k = chained_evaluations(y0, params, forward_nfev)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, backward_nfev, backward, (k, zeros))[1]

    return jax.jit(run)


def print_floor(name, floor_fn, ours, theirs, call_args, min_time, min_repeats):
    """Time a floor beside the two calls it bounds, alternating, and print the ratios."""
    for fn in (floor_fn, ours, theirs):
        jax.block_until_ready(fn(*call_args))
    t_floor, t_ours, t_theirs = alternating_best_times(
        [lambda fn=fn: fn(*call_args) for fn in (floor_fn, ours, theirs)],
        min_time,
        min_repeats,
        finish=jax.block_until_ready,
    )
    print(
        f"floor, {name}: {t_floor * 1e3:.2f} ms, {t_floor / t_theirs:.2f} of diffrax's "
        f"(odecore's {t_ours / t_theirs:.2f}, in the same run)"
    )


# --------------------------------------------------------------------------------------------
# The reference


def reference(params, y0):
    """``(ys, gradients)`` of the same network solved by odecore with dopri8 at rtol = atol =
    1e-12 in float64 (the outputs are the end points of the solve, never interpolated); the
    gradients are those of that discrete solve (checkpoint), exact to rounding."""
    tight = {"method": REFERENCE_METHOD, "tol": (REFERENCE_TOL, REFERENCE_TOL)}
    ys = jax.jit(lambda y0, p: odecore_solve(y0, p, adjoint="checkpoint", **tight).ys)(y0, params)
    grads = jax.jit(odecore_gradient("checkpoint", **tight))(params, y0)
    return ys, grads


def reference_check(params, y0):
    """The same tight solve by diffrax (Dopri8; its gradient by its recursive checkpoint):
    how far it is from the reference bounds the reference's own error."""
    tight = {"solver": diffrax.Dopri8(), "tol": (REFERENCE_TOL, REFERENCE_TOL)}
    ys = jax.jit(lambda y0, p: diffrax_solve(y0, p, **tight).ys)(y0, params)
    grads = jax.jit(diffrax_gradient(diffrax.RecursiveCheckpointAdjoint(), **tight))(params, y0)
    return ys, grads


def error(value, reference_value) -> float:
    leaves = jax.tree_util.tree_leaves
    return relative_error(leaves(value), leaves(reference_value))


# --------------------------------------------------------------------------------------------
# Measuring


def compile_time(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timing")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 3.0)
    min_repeats = 3 if args.quick else 10

    params, y0 = make_params()
    for line in environment_lines(
        {"jax": jax.__version__, "diffrax": diffrax.__version__, "odecore": odecore.__version__}
    ):
        print(line)
    print(f"devices: {jax.devices()}")
    print(
        f"problem: MLP {STATE}-{HIDDEN}-{STATE}, batch {BATCH} as one state, float64, "
        f"{METHOD} rtol={RTOL:g} atol={ATOL:g}, max_steps={MAX_STEPS}"
    )
    ys_ref, grads_ref = reference(params, y0)
    ys_check, grads_check = reference_check(params, y0)
    print(
        f"reference: odecore {REFERENCE_METHOD} at rtol = atol = {REFERENCE_TOL:g}, gradients of "
        "that solve (checkpoint);"
    )
    print(
        f"  diffrax's Dopri8 at the same tolerances differs from it by "
        f"{error(ys_check, ys_ref):.1e} "
        f"(values) and {error(grads_check, grads_ref):.1e} (gradients)"
    )
    print()

    rows = [
        ("forward", odecore_forward, diffrax_forward, (y0, params), ys_ref, "diffeqsolve"),
        (
            "grad backsolve",
            odecore_gradient("backsolve"),
            diffrax_gradient(diffrax.BacksolveAdjoint()),
            (params, y0),
            grads_ref,
            "BacksolveAdjoint",
        ),
        (
            "grad checkpoint",
            odecore_gradient("checkpoint"),
            diffrax_gradient(diffrax.RecursiveCheckpointAdjoint()),
            (params, y0),
            grads_ref,
            "RecursiveCheckpointAdjoint",
        ),
    ]
    header = (
        f"{'':16} {'odecore ms':>11} {'error':>8} {'diffrax ms':>11} {'error':>8} {'ratio':>7}  "
        f"{'compile s':>15}  peer"
    )
    print(header)
    print("-" * len(header))
    missed, summary = [], []
    for name, ours, theirs, call_args, ref, peer in rows:
        c_ours, f_ours = compile_time(ours, *call_args)
        c_theirs, f_theirs = compile_time(theirs, *call_args)
        t_ours, t_theirs = alternating_best_times(
            [lambda f=f_ours, a=call_args: f(*a), lambda f=f_theirs, a=call_args: f(*a)],
            min_time,
            min_repeats,
            finish=jax.block_until_ready,
        )
        ratio = t_ours / t_theirs
        if ratio > TARGET:
            missed.append(name)
        e_ours, e_theirs = error(f_ours(*call_args), ref), error(f_theirs(*call_args), ref)
        summary.append((name, t_ours, e_ours, t_theirs, e_theirs, f"vs {peer}"))
        print(
            f"{name:16} {t_ours * 1e3:11.2f} {e_ours:8.1e} {t_theirs * 1e3:11.2f} {e_theirs:8.1e} "
            f"{ratio:7.2f}  {c_ours:6.2f} / {c_theirs:6.2f}  {peer}"
        )
    print(
        "(error: max |result - reference| / max |reference|, the worst output or parameter "
        "gradient)"
    )

    sol = jax.jit(lambda y0, p: odecore_solve(y0, p))(y0, params)
    dsol = jax.jit(diffrax_solve)(y0, params)
    print()
    print(
        f"steps: odecore {int(sol.stats['nsteps'])} ({int(sol.stats['naccept'])} accepted, "
        f"{int(sol.stats['nfev'])} evaluations); diffrax {int(dsol.stats['num_steps'])} "
        f"({int(dsol.stats['num_accepted_steps'])} accepted)"
    )
    nfev = int(sol.stats["nfev"])
    print_floor(
        f"forward ({nfev} evaluations alone)",
        evaluations_alone(nfev),
        jax.jit(odecore_forward),
        jax.jit(diffrax_forward),
        (y0, params),
        min_time,
        min_repeats,
    )
    if args.quick:
        print("evaluations per gradient: not counted with --quick (four more compiles)")
    else:
        counts = count_gradient_evaluations(params, y0)
        print(
            "evaluations per gradient, odecore / diffrax: "
            + "; ".join(f"{mode} {ours} / {theirs}" for mode, (ours, theirs) in counts.items())
        )
        for mode, adjoint in GRADIENT_PEERS.items():
            backward = counts[mode][0] - nfev
            print_floor(
                f"grad {mode} ({nfev} evaluations and {backward} VJPs alone)",
                gradient_alone(nfev, backward),
                jax.jit(odecore_gradient(mode)),
                jax.jit(diffrax_gradient(adjoint)),
                (params, y0),
                min_time,
                min_repeats,
            )
    print(f"target: every ratio <= {TARGET}; compile times are odecore / diffrax, in seconds")
    if missed:
        print(f"missed: {', '.join(missed)}")
    print()
    print_summary("diffrax", summary)
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
