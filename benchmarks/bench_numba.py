"""odecore's numba backend against numbalsoda, scipy, diffrax and odecore's NumPy path.

    python benchmarks/bench_numba.py                  # N up to 2^14, a few minutes
    python benchmarks/bench_numba.py --max-log2 16    # the issue's full sweep
    nox -s bench -- benchmarks/bench_numba.py

Three tables, side by side in one run, ratios odecore / peer (below 1: odecore is faster):

1. The Lorenz system (sigma 10, rho 28, beta 8/3) from (1, 0, 0) on t in [0, 100], rtol =
   atol = 1e-8, 1001 output times: odecore dopri8 and dopri5 on numba (the in-place form,
   ``f(t, y, dy, p)``) against numbalsoda's ``dop853`` and ``lsoda`` and scipy's
   ``solve_ivp`` DOP853 and RK45. Each time is the best of several calls after a warm-up;
   odecore's first call, which compiles (into an empty kernel cache), is printed apart, and
   so is the first call of a new process that finds the kernel in that cache. The error
   beside each is against scipy's DOP853 at rtol = atol = 1e-13 over t in [0, 20] only: the
   system is chaotic, and by t = 100 any two solutions at 1e-8 have parted by the size of
   the attractor.
2. Gradients: d sum(ys) / d (sigma, rho, beta) on t in [0, 5] by ``odecore.vjp_odeint``
   with the VJP written in place (``lorenz.vjp``): numba's compiled checkpoint and
   backsolve against NumPy's generic checkpoint of the same steps and diffrax's
   ``jit(grad)`` (Dopri5 and Dopri8, recursive checkpointing), each with its difference
   from NumPy's checkpoint.
3. The ensemble: Lorenz with rho evenly in [0, 21] (DiffEqGPU's benchmark), N trajectories
   on t in [0, 1], the final state only: fixed steps of 1e-3 (odecore rk4, float32 and
   float64) and adaptive steps at rtol = atol = 1e-8 (odecore tsit5, and dopri8, the method
   of numbalsoda's ``dop853``), against numbalsoda's ``dop853`` called in a ``numba.prange``
   loop (adaptive only; it has no fixed-step method),
   diffrax's Tsit5 under ``jax.jit(jax.vmap(...))`` on the CPU (for the fixed steps with a
   ``ConstantStepSize``: 6 evaluations a step against rk4's 4, said in the row), and
   odecore's NumPy batched path (one (N, 3) state). Trajectories per second are printed.

A peer that is not installed, or fails to build (numbalsoda needs a Fortran compiler), is
skipped with the reason printed. This is a report: it exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
from _common import alternating_best_times, environment_lines
from scipy.integrate import solve_ivp

import odecore

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
LORENZ_P = np.array([SIGMA, RHO, BETA])
Y0 = np.array([1.0, 0.0, 0.0])
TOL = 1e-8
REFERENCE_TOL = 1e-13
ERROR_HORIZON = 20.0


def lorenz(t, y, dy, p):
    dy[0] = p[0] * (y[1] - y[0])
    dy[1] = y[0] * (p[1] - y[2]) - y[1]
    dy[2] = y[0] * y[1] - p[2] * y[2]


def lorenz_vjp(t, y, p, cotangent, y_bar, p_bar):
    """``cotangent`` times the Jacobians of ``lorenz`` in y and p, written in place."""
    c0, c1, c2 = cotangent[0], cotangent[1], cotangent[2]
    y_bar[0] = -p[0] * c0 + (p[1] - y[2]) * c1 + y[1] * c2
    y_bar[1] = p[0] * c0 - c1 + y[0] * c2
    y_bar[2] = -y[0] * c1 - p[2] * c2
    p_bar[0] = (y[1] - y[0]) * c0
    p_bar[1] = y[0] * c1
    p_bar[2] = -y[2] * c2


lorenz.vjp = lorenz_vjp


class LorenzNumpy:
    """``lorenz`` and its VJP in the returning form of NumPy's generic loop."""

    def __call__(self, t, y, p):
        dy = np.empty(3)
        lorenz(t, y, dy, p)
        return dy

    def vjp(self, t, y, p, cotangent):
        y_bar, p_bar = np.empty(3), np.empty(3)
        lorenz_vjp(t, y, p, cotangent, y_bar, p_bar)
        return y_bar, p_bar


def lorenz_returning(t, y, p):
    """The batched NumPy path's form: y is (N, 3), p (N, 3)."""
    x, v, z = y[:, 0], y[:, 1], y[:, 2]
    return np.stack([p[:, 0] * (v - x), x * (p[:, 1] - z) - v, x * v - p[:, 2] * z], axis=1)


class LorenzBatchNumpy:
    """The batched NumPy path's Lorenz (y and p (N, 3)) with its VJP, for a batch's
    gradient on NumPy's generic loop."""

    def __call__(self, t, y, p):
        return lorenz_returning(t, y, p)

    def vjp(self, t, y, p, cotangent):
        x, v, z = y[:, 0], y[:, 1], y[:, 2]
        c0, c1, c2 = cotangent[:, 0], cotangent[:, 1], cotangent[:, 2]
        y_bar = np.stack(
            [-p[:, 0] * c0 + (p[:, 1] - z) * c1 + v * c2, p[:, 0] * c0 - c1 + x * c2,
             -x * c1 - p[:, 2] * c2],
            axis=1,
        )  # fmt: skip
        p_bar = np.stack([(v - x) * c0, x * c1, -z * c2], axis=1)
        return y_bar, p_bar


def lorenz_scipy(t, y):
    return [SIGMA * (y[1] - y[0]), y[0] * (RHO - y[2]) - y[1], y[0] * y[1] - BETA * y[2]]


def numbalsoda_peer():
    """``(rhs address, dop853, lsoda)``, or the reason numbalsoda cannot be used."""
    try:
        from numbalsoda import dop853, lsoda, lsoda_sig
    except Exception as exc:  # a failed build raises more than ImportError
        return None, f"numbalsoda is not importable ({type(exc).__name__}: {exc})"
    rhs = numba.cfunc(lsoda_sig)(lorenz)
    return (rhs.address, dop853, lsoda), ""


def best(fn, min_time):
    return alternating_best_times([fn], min_time=min_time, min_repeats=3)[0]


def error_until(ts, ys, reference):
    kept = ts <= ERROR_HORIZON
    scale = np.max(np.abs(reference))
    return float(np.max(np.abs(ys[kept] - reference)) / scale)


def single(args, peer):
    ts = np.linspace(0.0, 100.0, 1001)
    kept = ts[ts <= ERROR_HORIZON]
    reference = solve_ivp(
        lorenz_scipy,
        (0.0, ERROR_HORIZON),
        Y0,
        method="DOP853",
        t_eval=kept,
        rtol=REFERENCE_TOL,
        atol=REFERENCE_TOL,
    ).y.T
    # name -> (function returning the outputs, first call's seconds or None)
    fast = {}
    variants = (
        ("dopri8", None),
        # Hairer's controller lets an accepted step shrink the next, as DOP853 does.
        ("dopri8", {"shrink_after_accept": True}),
        ("dopri5", None),
    )
    for method, options in variants:

        def run(method=method, options=options):
            return odecore.solve(
                lorenz,
                Y0,
                ts,
                params=LORENZ_P,
                backend="numba",
                method=method,
                rtol=TOL,
                atol=TOL,
                options=options,
            )

        start = time.perf_counter()
        steps = run().stats["nsteps"]
        first = time.perf_counter() - start
        name = f"odecore numba {method}" + (" shrink" if options else "") + f" ({steps} steps)"
        fast[name] = (lambda run=run: run().ys, first)
    if peer is not None:
        address, dop853, lsoda = peer
        for name, fn in (("dop853", dop853), ("lsoda", lsoda)):

            def run(fn=fn):
                usol, ok = fn(address, Y0, ts, data=LORENZ_P, rtol=TOL, atol=TOL)
                assert ok
                return usol

            fast[f"numbalsoda {name}"] = (run, None)
    # The compiled solvers' calls alternate, so that the machine's load reaches them alike.
    seconds = alternating_best_times(
        [fn for fn, _ in fast.values()], min_time=args.min_time, min_repeats=5
    )
    rows = [
        (name, t, error_until(ts, fn(), reference), first)
        for (name, (fn, first)), t in zip(fast.items(), seconds, strict=True)
    ]
    for method in ("DOP853", "RK45"):

        def run(method=method):
            return solve_ivp(
                lorenz_scipy, (0.0, 100.0), Y0, method=method, t_eval=ts, rtol=TOL, atol=TOL
            ).y.T

        start = time.perf_counter()
        ys = run()
        elapsed = time.perf_counter() - start
        rows.append((f"scipy {method}", elapsed, error_until(ts, ys, reference), None))
    print("\nLorenz, t in [0, 100], rtol = atol = 1e-8, 1001 outputs")
    print(f"{'solver':<42}{'time':>12}{'error (t<=20)':>16}{'first call':>14}")
    for name, seconds, error, first in rows:
        first_text = f"{first:.2f} s" if first is not None else ""
        print(f"{name:<42}{seconds * 1e3:>9.3f} ms{error:>16.2e}{first_text:>14}")
    times = {name: seconds for name, seconds, _, _ in rows}
    ours = [name for name in times if name.startswith("odecore")]
    for name in ours:
        for peer_name in ("numbalsoda dop853", "numbalsoda lsoda", "scipy DOP853", "scipy RK45"):
            if peer_name in times:
                print(f"  {name} / {peer_name}: {times[name] / times[peer_name]:.3g}x")


GRADIENT_TIMES = np.linspace(0.0, 5.0, 51)


def gradients(args):
    """The gradient of sum(ys) in the parameters, t in [0, 5] (Lorenz's sensitivities grow
    like e^{0.9 t}: by t = 5 about 100-fold), on numba against NumPy's generic loop and
    diffrax (jit(grad) through its recursive checkpointing) on the CPU."""
    weights = np.ones((len(GRADIENT_TIMES), 3))
    print(
        "\nGradient of sum(ys) in (sigma, rho, beta): Lorenz, t in [0, 5], 51 outputs, "
        "rtol = atol = 1e-8"
    )
    diffrax_grad, why = diffrax_gradient()
    if diffrax_grad is None:
        print(f"  diffrax skipped: {why}")
    print(f"{'method':<8}{'gradient':<42}{'time':>12}{'first call':>12}{'vs numpy checkpoint':>22}")
    for method in ("dopri5", "dopri8"):
        rows = {}
        for label, func, backend, adjoint in (
            ("odecore numba checkpoint", lorenz, "numba", "checkpoint"),
            ("odecore numba backsolve", lorenz, "numba", "backsolve"),
            ("odecore numpy checkpoint", LorenzNumpy(), "numpy", "checkpoint"),
        ):

            def run(func=func, backend=backend, adjoint=adjoint, method=method):
                _, pullback = odecore.vjp_odeint(
                    func, Y0, GRADIENT_TIMES, LORENZ_P, adjoint=adjoint, backend=backend,
                    method=method, rtol=TOL, atol=TOL,
                )  # fmt: skip
                return pullback(weights)[1]

            start = time.perf_counter()
            run()
            rows[label] = (run, time.perf_counter() - start)
        if diffrax_grad is not None:
            rows["diffrax checkpoint (jit(grad))"] = (
                lambda method=method: diffrax_grad(method),
                None,
            )
        reference = rows["odecore numpy checkpoint"][0]()
        seconds = alternating_best_times(
            [fn for fn, _ in rows.values()], min_time=args.min_time, min_repeats=3
        )
        for (label, (fn, first)), t in zip(rows.items(), seconds, strict=True):
            difference = np.max(np.abs(fn() - reference)) / np.max(np.abs(reference))
            first_text = f"{first:.2f} s" if first is not None else ""
            print(f"{method:<8}{label:<42}{t * 1e3:>9.3f} ms{first_text:>12}{difference:>22.1e}")
        times = dict(zip(rows, seconds, strict=True))
        for label in ("odecore numpy checkpoint", "diffrax checkpoint (jit(grad))"):
            if label in times:
                ratio = times["odecore numba checkpoint"] / times[label]
                print(f"  odecore numba checkpoint / {label}: {ratio:.3g}x")


def batch_gradients(args):
    """The gradient of sum(ys) in every trajectory's parameters for the rho-sweep, t in
    [0, 1]: a batch's backsolve (one joint backward solve) and checkpoint on numba, against
    NumPy's generic batch backsolve."""
    times = np.linspace(0.0, 1.0, 11)
    print("\nGradient of a batch: the Lorenz rho-sweep, t in [0, 1], 11 outputs, dopri5, 1e-8")
    print(f"{'N':>6}  {'gradient':<34}{'time':>12}{'first call':>12}{'vs numpy':>12}")
    for n in (64, 256, 1024):
        y0, params = np.tile(Y0, (n, 1)), sweep_params(n)
        weights = np.ones((len(times), n, 3))
        rows = {}
        for label, func, backend, adjoint in (
            ("odecore numba backsolve", lorenz, "numba", "backsolve"),
            ("odecore numba checkpoint", lorenz, "numba", "checkpoint"),
            ("odecore numpy backsolve", LorenzBatchNumpy(), "numpy", "backsolve"),
        ):

            def run(func=func, backend=backend, adjoint=adjoint, y0=y0, p=params, w=weights):
                _, pullback = odecore.vjp_odeint(
                    func, y0, times, p, adjoint=adjoint, backend=backend, batch_axis=0,
                    method="dopri5", rtol=TOL, atol=TOL,
                )  # fmt: skip
                return pullback(w)[1]

            start = time.perf_counter()
            run()
            rows[label] = (run, time.perf_counter() - start)
        reference = rows["odecore numpy backsolve"][0]()
        seconds = alternating_best_times(
            [fn for fn, _ in rows.values()], min_time=args.min_time, min_repeats=3
        )
        for (label, (fn, first)), t in zip(rows.items(), seconds, strict=True):
            difference = np.max(np.abs(fn() - reference)) / np.max(np.abs(reference))
            print(f"{n:>6}  {label:<34}{t * 1e3:>9.2f} ms{first:>10.2f} s{difference:>12.1e}")
        times_by = dict(zip(rows, seconds, strict=True))
        ratio = times_by["odecore numba backsolve"] / times_by["odecore numpy backsolve"]
        print(f"        odecore numba backsolve / odecore numpy backsolve: {ratio:.3g}x")


def _diffrax_lorenz():
    """``(jax, diffrax, Lorenz's vector field for diffrax, "")`` with x64 enabled, or
    ``(None, None, None, the reason diffrax cannot be used)``."""
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import diffrax
        import jax.numpy as jnp
    except Exception as exc:
        return None, None, None, f"diffrax is not importable ({type(exc).__name__}: {exc})"

    def vector_field(t, y, p):
        return jnp.stack(
            [p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]]
        )

    return jax, diffrax, vector_field, ""


def diffrax_gradient():
    """``(grad(method) -> d sum(ys) / d params as NumPy, reason)``: diffrax's Dopri5 or
    Dopri8 with its default adjoint (recursive checkpointing), compiled once per method."""
    jax, diffrax, vector_field, why = _diffrax_lorenz()
    if jax is None:
        return None, why
    jnp = jax.numpy

    solvers = {"dopri5": diffrax.Dopri5(), "dopri8": diffrax.Dopri8()}
    compiled = {}

    def grad(method):
        if method not in compiled:

            def loss(p):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(vector_field),
                    solvers[method],
                    0.0,
                    float(GRADIENT_TIMES[-1]),
                    None,
                    jnp.asarray(Y0),
                    args=p,
                    saveat=diffrax.SaveAt(ts=jnp.asarray(GRADIENT_TIMES)),
                    stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
                    max_steps=100_000,
                )
                return jnp.sum(sol.ys)

            compiled[method] = jax.jit(jax.grad(loss))
        return np.asarray(compiled[method](jnp.asarray(LORENZ_P)).block_until_ready())

    return grad, ""


def sweep_params(n):
    return np.stack([np.full(n, SIGMA), np.linspace(0.0, 21.0, n), np.full(n, BETA)], axis=1)


def numbalsoda_sweep(peer):
    address, dop853, _ = peer

    @numba.njit(parallel=True)
    def sweep(y0, params, ts, out):
        for i in numba.prange(params.shape[0]):
            usol, _ = dop853(address, y0, ts, data=params[i], rtol=TOL, atol=TOL)
            out[i] = usol[-1]

    def run(y0, params, ts):
        out = np.empty((params.shape[0], 3))
        sweep(y0, params, ts, out)
        return out

    return run


def diffrax_sweep():
    """``(run(y0, params, fixed) -> final states, reason)``."""
    jax, diffrax, vector_field, why = _diffrax_lorenz()
    if jax is None:
        return None, why
    jnp = jax.numpy

    compiled = {}

    def run(y0, params, fixed):
        key = (fixed, y0.dtype.name)
        if key not in compiled:
            if fixed:
                controller, dt0 = diffrax.ConstantStepSize(), 1e-3
            else:
                controller, dt0 = diffrax.PIDController(rtol=TOL, atol=TOL), None

            def one(y, p):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(vector_field),
                    diffrax.Tsit5(),
                    0.0,
                    1.0,
                    dt0,
                    y,
                    args=p,
                    stepsize_controller=controller,
                    max_steps=4096,
                )
                return sol.ys[-1]

            compiled[key] = jax.jit(jax.vmap(one))
        return compiled[key](jnp.asarray(y0), jnp.asarray(params)).block_until_ready()

    return run, ""


def ensemble(args, peer):
    ts = np.array([0.0, 1.0])
    diffrax_run, diffrax_why = diffrax_sweep()
    numbalsoda_run = numbalsoda_sweep(peer) if peer is not None else None
    print("\nEnsemble: Lorenz, rho evenly in [0, 21], t in [0, 1], final state")
    if diffrax_run is None:
        print(f"  diffrax skipped: {diffrax_why}")
    header = f"{'N':>7} {'configuration':<30}{'odecore numba':>14}{'traj/s':>11}"
    print(f"{header}  peers (time, odecore/peer)")
    for log2 in range(10, args.max_log2 + 1):
        n = 2**log2
        params = sweep_params(n)
        for label, dtype, fixed in (
            ("rk4 dt=1e-3 float64", np.float64, True),
            ("rk4 dt=1e-3 float32", np.float32, True),
            ("tsit5 rtol=atol=1e-8", np.float64, False),
            ("dopri8 rtol=atol=1e-8", np.float64, False),
        ):
            y0 = np.tile(Y0, (n, 1)).astype(dtype)
            p = params.astype(dtype)
            kwargs = (
                {"method": "rk4", "options": {"step_size": 1e-3}}
                if fixed
                else {"method": label.split()[0], "rtol": TOL, "atol": TOL}
            )

            def ours(y0=y0, p=p, kwargs=kwargs):
                return odecore.odeint(
                    lorenz, y0, ts, params=p, batch_axis=0, backend="numba", **kwargs
                )[-1]

            start = time.perf_counter()
            ours()
            first = time.perf_counter() - start
            seconds = best(ours, args.min_time)
            peers = []
            if numbalsoda_run is not None and not fixed:
                peers.append(
                    (
                        "numbalsoda-prange dop853",
                        best(lambda p=params: numbalsoda_run(Y0, p, ts), args.min_time),
                    )
                )
            if diffrax_run is not None:
                name = "diffrax vmap Tsit5" + (" dt=1e-3 (6 evals/step)" if fixed else "")
                peers.append(
                    (
                        name,
                        best(
                            lambda y0=y0, p=p, fixed=fixed: diffrax_run(y0, p, fixed), args.min_time
                        ),
                    )
                )
            if n <= 2**args.numpy_max_log2:

                def generic(y0=y0, p=p, kwargs=kwargs):
                    return odecore.odeint(
                        lorenz_returning, y0, ts, params=p, batch_axis=0, backend="numpy", **kwargs
                    )[-1]

                peers.append(("odecore numpy batched", best(generic, args.min_time)))
            text = "; ".join(f"{name} {t * 1e3:.1f} ms ({seconds / t:.3g}x)" for name, t in peers)
            note = f" [first call {first:.1f} s]" if log2 == 10 else ""
            print(f"{n:>7} {label:<30}{seconds * 1e3:>11.2f} ms{n / seconds:>11.3g}  {text}{note}")


CACHED_FIRST_CALL = """
import sys, time
sys.path.insert(0, sys.argv[1])
start = time.perf_counter()
import numpy as np, odecore
from bench_numba import LORENZ_P, Y0, lorenz
odecore.solve(lorenz, Y0, np.linspace(0.0, 100.0, 1001), params=LORENZ_P, backend="numba",
              method="dopri8", rtol=1e-8, atol=1e-8)
print(time.perf_counter() - start)
"""


def cached_first_call() -> float:
    """Seconds from a new process's start (imports included) to the end of its first
    dopri8 solve, with the kernel already in the cache: the second of two such processes
    (this one's lorenz is __main__'s, a kernel of its own)."""
    command = [sys.executable, "-c", CACHED_FIRST_CALL, os.path.dirname(os.path.abspath(__file__))]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main():
    # An empty kernel cache, so that the first call's time is the compile's.
    os.environ["ODECORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="odecore-bench-cache-")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-log2", type=int, default=14, help="largest ensemble, 2^k")
    parser.add_argument("--numpy-max-log2", type=int, default=12, help="largest NumPy batch")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing")
    args = parser.parse_args()
    print(
        "\n".join(environment_lines({"numba": numba.__version__, "odecore": odecore.__version__}))
    )
    print(f"numba threads: {numba.get_num_threads()}")
    peer, why = numbalsoda_peer()
    if peer is None:
        print(f"numbalsoda skipped: {why}")
    single(args, peer)
    print(
        f"odecore numba dopri8, first call of a new process with the kernel cached on disk "
        f"(imports included): {cached_first_call():.2f} s"
    )
    gradients(args)
    batch_gradients(args)
    ensemble(args, peer)


if __name__ == "__main__":
    main()
