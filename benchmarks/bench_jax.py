"""odecore against diffrax on a small neural ODE, both jitted, on the CPU.

    python benchmarks/bench_jax.py              # a few minutes
    python benchmarks/bench_jax.py --quick      # shorter timings
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
- the largest difference between the two libraries' results.

Both libraries get ``max_steps = 4096`` (diffrax's default), which also sizes odecore's
checkpoint buffers (the times of 4096 steps, the states of 64 plus a 64-state recompute
buffer). Last, each gradient's function evaluations (forward and backward together) are
counted in one more, untimed, call. This is a report, not a test: it exits 0 unless --strict
is given and a target is missed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _common import environment_lines  # noqa: E402

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


def odecore_solve(y0, params, adjoint="backsolve", func=mlp):
    return odecore.solve(
        func,
        y0,
        TS,
        params=params,
        rtol=RTOL,
        atol=ATOL,
        method=METHOD,
        adjoint=adjoint,
        options={"max_num_steps": MAX_STEPS},
    )


def diffrax_solve(y0, params, adjoint=None, func=mlp):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: func(t, y, args)),
        diffrax.Dopri5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=y0,
        args=params,
        saveat=diffrax.SaveAt(ts=TS),
        stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
        adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(),
        max_steps=MAX_STEPS,
    )


def odecore_forward(y0, params):
    return odecore_solve(y0, params).ys


def diffrax_forward(y0, params):
    return diffrax_solve(y0, params).ys


def odecore_gradient(mode, func=mlp):
    def loss(params, y0):
        return jnp.sum(odecore_solve(y0, params, adjoint=mode, func=func).ys[-1] ** 2)

    return jax.grad(loss)


def diffrax_gradient(adjoint, func=mlp):
    def loss(params, y0):
        return jnp.sum(diffrax_solve(y0, params, adjoint=adjoint, func=func).ys[-1] ** 2)

    return jax.grad(loss)


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


# --------------------------------------------------------------------------------------------
# Measuring


def compile_time(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def alternate(fns, min_time: float, min_repeats: int) -> list[float]:
    """Best time of one call of each compiled function, calls alternating."""
    for fn in fns:
        jax.block_until_ready(fn())
    best, spent, count = [math.inf] * len(fns), [0.0] * len(fns), 0
    while count < min_repeats or min(spent) < min_time:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            elapsed = time.perf_counter() - start
            best[i] = min(best[i], elapsed)
            spent[i] += elapsed
        count += 1
    return best


def max_difference(a, b) -> float:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-300))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


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
    print()

    rows = [
        ("forward", odecore_forward, diffrax_forward, (y0, params), "diffeqsolve"),
        (
            "grad backsolve",
            odecore_gradient("backsolve"),
            diffrax_gradient(diffrax.BacksolveAdjoint()),
            (params, y0),
            "BacksolveAdjoint",
        ),
        (
            "grad checkpoint",
            odecore_gradient("checkpoint"),
            diffrax_gradient(diffrax.RecursiveCheckpointAdjoint()),
            (params, y0),
            "RecursiveCheckpointAdjoint",
        ),
    ]
    header = (
        f"{'':16} {'odecore ms':>11} {'diffrax ms':>11} {'ratio':>7}  {'compile s':>15}  "
        f"{'max rel diff':>12}  peer"
    )
    print(header)
    print("-" * len(header))
    missed = []
    for name, ours, theirs, call_args, peer in rows:
        c_ours, f_ours = compile_time(ours, *call_args)
        c_theirs, f_theirs = compile_time(theirs, *call_args)
        t_ours, t_theirs = alternate(
            [lambda f=f_ours, a=call_args: f(*a), lambda f=f_theirs, a=call_args: f(*a)],
            min_time,
            min_repeats,
        )
        ratio = t_ours / t_theirs
        if ratio > TARGET:
            missed.append(name)
        diff = max_difference(f_ours(*call_args), f_theirs(*call_args))
        print(
            f"{name:16} {t_ours * 1e3:11.2f} {t_theirs * 1e3:11.2f} {ratio:7.2f}  "
            f"{c_ours:6.2f} / {c_theirs:6.2f}  {diff:12.2e}  {peer}"
        )

    sol = jax.jit(lambda y0, p: odecore_solve(y0, p))(y0, params)
    dsol = jax.jit(diffrax_solve)(y0, params)
    print()
    print(
        f"steps: odecore {int(sol.stats['nsteps'])} ({int(sol.stats['naccept'])} accepted, "
        f"{int(sol.stats['nfev'])} evaluations); diffrax {int(dsol.stats['num_steps'])} "
        f"({int(dsol.stats['num_accepted_steps'])} accepted)"
    )
    evaluations = [
        (
            name,
            count_evaluations(lambda f, m=mode: odecore_gradient(m, f), params, y0),
            count_evaluations(lambda f, a=adjoint: diffrax_gradient(a, f), params, y0),
        )
        for name, mode, adjoint in (
            ("backsolve", "backsolve", diffrax.BacksolveAdjoint()),
            ("checkpoint", "checkpoint", diffrax.RecursiveCheckpointAdjoint()),
        )
    ]
    print(
        "evaluations per gradient, odecore / diffrax: "
        + "; ".join(f"{name} {ours} / {theirs}" for name, ours, theirs in evaluations)
    )
    print(f"target: every ratio <= {TARGET}; compile times are odecore / diffrax, in seconds")
    if missed:
        print(f"missed: {', '.join(missed)}")
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
