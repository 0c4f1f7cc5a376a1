"""odecore on a CUDA GPU: the ensemble kernel, the generic CuPy solve, and a neural ODE, each
against torchdiffeq on torch CUDA on the same device.

1. **ensemble**: the DiffEqGPU Lorenz ensemble (Utkarsh et al. 2024): ``rho = linspace(0,
   21, N)``, ``sigma = 10``, ``beta = 8/3``, ``y0 = (1, 0, 0)``, ``t`` in [0, 1], float32, the
   end state only; tsit5 fixed (dt = 1e-3, 1000 steps) and adaptive (rtol = atol = 1e-8).
   odecore's GPU ensemble kernel (``odecore.adapters.cuda_ensemble``: one thread per
   trajectory, each taking its own steps) with each place for its work rows
   (``cuda_ensemble.SCRATCH``: "global", "interleaved", "local"). ``kernel`` times the
   launch on arrays that already live on the device (the DiffEqGPU setting); ``end-to-end``
   times ``odecore.solve`` from NumPy arrays to NumPy arrays. Printed beside them: trajectory-steps
   per second, the published V100 figures at N = 2^23 and the difference to the CPU kernel
   (backend="numba") on the first 2^12 trajectories.
2. **peers**: torchdiffeq's rk4 (fixed, dt = 1e-3) and dopri5 (adaptive) on one batched
   (N, 3) tensor, and odecore's generic solve on CuPy arrays (``batch_axis=0``: each sample
   steps on its own), on the same ensemble. torch takes one step size for the whole batch.
3. **node**: a neural ODE, ``dy/dt = tanh(y W1 + b1) W2 + b2``, batch 4096, state 64, width
   256, float32, dopri5 at rtol = atol = 1e-5 on t in [0, 1]: the forward solve, and the
   forward with the backsolve (continuous adjoint) gradient of ``sum(y(1)**2)`` with respect
   to y0 and the weights; odecore on CuPy (the dynamics' own VJP) against torchdiffeq's
   ``odeint_adjoint`` on torch CUDA. Evaluations are printed beside the times.

Times are the best of ``--repeat`` runs (fewer once a case has taken 3 s), each ending with
a device synchronisation, after a warm-up run (compilation). A part whose requirements are
missing says which and is skipped.

    python benchmarks/bench_gpu.py                               every part, sizes 2^10 ... 2^23
    python benchmarks/bench_gpu.py --parts ensemble --sizes 10 23 --repeat 10
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_gpu.py --parts ensemble --sizes 3 --t1 0.01
        (the ensemble part in numba-cuda's simulator: a check of the script, not a timing)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
from _common import environment_lines

import odecore

SIGMA, BETA = 10.0, 8.0 / 3.0
FIXED_DT = 1e-3
# DiffEqGPU's paper (Utkarsh et al. 2024), Lorenz ensemble on a V100 at N = 2^23, ms.
PUBLISHED_V100 = {
    "fixed": {"DiffEqGPU": 145.0, "MPGOS": 94.0},
    "adaptive": {"DiffEqGPU": 69.5, "MPGOS": 48.8},
}
CPU_CHECK_ROWS = 2**12


def best_time(run, sync, repeat: int, budget: float = 3.0) -> tuple[float, object]:
    """The best of ``repeat`` timed runs after a warm-up (compilation, allocator), stopping
    early once the timed runs have taken ``budget`` seconds: a slow case gets fewer runs."""
    result = run()
    sync()
    best, spent = float("inf"), 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        sync()
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if spent > budget:
            break
    return best, result


# --------------------------------------------------------------------------------------------
# 1. The ensemble kernel


def lorenz_in_place(t, y, dy, p):
    dy[0] = p[0] * (y[1] - y[0])
    dy[1] = y[0] * (p[1] - y[2]) - y[1]
    dy[2] = y[0] * y[1] - p[2] * y[2]


def ensemble_inputs(n: int):
    rho = np.linspace(0.0, 21.0, n, dtype=np.float32)
    params = np.stack([np.full(n, SIGMA), rho, np.full(n, BETA)], axis=1).astype(np.float32)
    y0 = np.tile(np.array([1.0, 0.0, 0.0], dtype=np.float32), (n, 1))
    return y0, params


def ensemble_settings(adaptive: bool) -> dict:
    if adaptive:
        return {"method": "tsit5", "rtol": 1e-8, "atol": 1e-8}
    # tsit5 at a fixed step, as DiffEqGPU runs it (adaptive=false): no error estimate.
    return {"method": "tsit5", "options": {"step_size": FIXED_DT}}


def ensemble_missing() -> list[str]:
    try:
        from numba import cuda
    except ImportError:
        return ["numba not installed (pip install 'odecore[numba]')"]
    if not cuda.is_available():
        return ["numba-cuda finds no CUDA device (NUMBA_ENABLE_CUDASIM=1 runs the simulator)"]
    return []


def run_ensemble(sizes, repeat: int, t1: float) -> None:
    from numba import cuda
    from odecore.adapters import cuda_ensemble

    print(
        f"{'case':<9} {'scratch':<11} {'N':>9} {'kernel':>10} {'end-to-end':>11} "
        f"{'traj-steps/s':>13} {'steps':>6} {'vs CPU kernel':>13}"
    )
    t = np.array([0.0, t1], dtype=np.float32)
    for adaptive in (False, True):
        case = "adaptive" if adaptive else "fixed"
        settings = ensemble_settings(adaptive)
        best: dict[str, float] = {}
        for log_n in sizes:
            n = 2**log_n
            y0, params = ensemble_inputs(n)
            for scratch in cuda_ensemble.SCRATCH:
                backend = cuda_ensemble.CudaEnsembleBackend(scratch)
                seen = capture_problem(backend)
                try:
                    # The first solve compiles; the second is timed from NumPy to NumPy.
                    for _ in range(2):
                        start = time.perf_counter()
                        odecore.solve(
                            lorenz_in_place, y0, t, params=params, batch_axis=0,
                            backend=backend, **settings,
                        )  # fmt: skip
                        end_to_end = time.perf_counter() - start
                    launch = cuda_ensemble.Launch(seen["problem"], seen["options"], scratch)
                    kernel_s, _ = best_time(launch.run, cuda.synchronize, repeat)
                    sol = launch.result().solution
                except Exception as exc:  # report the case and go on with the others
                    print(f"{case:<9} {scratch:<11} {n:>9} failed: {type(exc).__name__}: {exc}")
                    continue
                steps = int(np.max(sol.stats["naccept"]))
                rate = float(np.sum(sol.stats["naccept"])) / kernel_s
                check = cpu_difference(sol, y0, t, params, settings)
                print(
                    f"{case:<9} {scratch:<11} {n:>9} {kernel_s * 1e3:>8.2f}ms "
                    f"{end_to_end * 1e3:>9.1f}ms {rate:>13.3e} {steps:>6} {check:>13}"
                )
                sys.stdout.flush()
                best[scratch] = kernel_s
            if n == 2**23 and best:
                fastest = min(best.values()) * 1e3
                peers = ", ".join(
                    f"{name} {ms:g} ms ({fastest / ms:.2f}x)"
                    for name, ms in PUBLISHED_V100[case].items()
                )
                print(f"{'':<9} published V100 at N = 2^23: {peers}")


def capture_problem(backend) -> dict:
    """A dict that receives the prepared problem and options of ``backend``'s next batch
    solve: the arrays a :class:`~odecore.adapters.cuda_ensemble.Launch` puts on the device."""
    seen = {}
    solve = backend.kernels.solve

    def capturing(problem, options, *args, **kwargs):
        seen["problem"], seen["options"] = problem, options
        return solve(problem, options, *args, **kwargs)

    backend.kernels = replace(backend.kernels, solve=capturing)
    return seen


def cpu_difference(sol, y0, t, params, settings) -> str:
    """The largest relative difference of the end states to the CPU kernel's, on the first
    rows (the CPU kernel takes the same steps; the GPU fuses multiply-adds)."""
    rows = min(len(y0), CPU_CHECK_ROWS)
    cpu = odecore.solve(
        lorenz_in_place, y0[:rows], t, params=params[:rows], batch_axis=0, backend="numba",
        **settings,
    )  # fmt: skip
    gpu_end, cpu_end = np.asarray(sol.ys[-1, :rows]), np.asarray(cpu.ys[-1])
    same_steps = np.array_equal(sol.stats["naccept"][:rows], cpu.stats["naccept"])
    diff = np.max(np.abs(gpu_end - cpu_end)) / np.max(np.abs(cpu_end))
    return f"{diff:.1e}{'' if same_steps else ' (steps differ)'}"


# --------------------------------------------------------------------------------------------
# 2. The peers: torchdiffeq batched, and odecore's generic solve on CuPy


def peers_missing() -> list[str]:
    why = []
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            why.append("no CUDA device (cupy sees none)")
    except ImportError:
        why.append("cupy not installed (pip install 'odecore[cupy]')")
    except Exception as exc:  # the CUDA runtime's own error where there is no driver
        why.append(f"no CUDA device ({type(exc).__name__}: {exc})")
    try:
        import torch

        if not torch.cuda.is_available():
            why.append("torch sees no CUDA device (a CPU build of torch, or no GPU)")
    except ImportError:
        why.append("torch not installed")
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        why.append("torchdiffeq not installed")
    return why


def lorenz_batched(xp, rho):
    stack = xp.stack

    def f(t, y):
        x, v, z = y[:, 0], y[:, 1], y[:, 2]
        return stack([SIGMA * (v - x), x * (rho - z) - v, x * v - BETA * z], 1)

    return f


def peer_settings(adaptive: bool, method_fixed: str) -> dict:
    if adaptive:
        return {"method": "dopri5", "rtol": 1e-8, "atol": 1e-8}
    return {"method": method_fixed, "options": {"step_size": FIXED_DT}}


def solve_cupy(n: int, adaptive: bool, repeat: int, t1: float):
    import cupy

    rho = cupy.linspace(0, 21, n, dtype=cupy.float32)
    y0 = cupy.asarray(ensemble_inputs(n)[0])
    t = cupy.asarray([0.0, t1], dtype=cupy.float32)
    f = lorenz_batched(cupy, rho)
    settings = ensemble_settings(adaptive)

    def run():
        return odecore.solve(f, y0, t, batch_axis=0, **settings)

    seconds, sol = best_time(run, cupy.cuda.Device().synchronize, repeat)
    return seconds, cupy.asnumpy(sol.ys[-1])


def solve_torch(n: int, adaptive: bool, repeat: int, t1: float, device="cuda"):
    import torch
    import torchdiffeq

    rho = torch.linspace(0, 21, n, dtype=torch.float32, device=device)
    y0 = torch.as_tensor(ensemble_inputs(n)[0], device=device)
    t = torch.tensor([0.0, t1], dtype=torch.float32, device=device)
    f = lorenz_batched(torch, rho)
    # torchdiffeq has no tsit5 with a fixed step; rk4 is its fixed-step method of choice.
    settings = peer_settings(adaptive, "rk4")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            return torchdiffeq.odeint(f, y0, t, **settings)

    seconds, ys = best_time(run, sync, repeat)
    return seconds, ys[-1].cpu().numpy()


def run_peers(sizes, repeat: int, t1: float) -> None:
    print(
        f"{'case':<9} {'N':>9} {'odecore cupy':>13} {'torchdiffeq':>12} "
        f"{'torch/cupy':>10} {'max |diff|':>10}"
    )
    for adaptive in (False, True):
        case = "adaptive" if adaptive else "fixed"
        # The generic solve and torch take a handful of kernels per stage: seconds per solve
        # at the largest sizes, minutes adaptive (torch steps the whole batch at the pace of
        # its hardest sample).
        for log_n in [s for s in sizes if s <= (23 if not adaptive else 16)]:
            n = 2**log_n
            row = f"{case:<9} {n:>9}"
            results = {}
            for name, solve in (("cupy", solve_cupy), ("torch", solve_torch)):
                try:
                    results[name] = solve(n, adaptive, repeat, t1)
                except Exception as exc:  # report the case and go on with the others
                    results[name] = None
                    print(f"{row} {name} failed: {type(exc).__name__}: {exc}")
            (c_s, c_end), (t_s, t_end) = (results[k] or (float("nan"), None) for k in results)
            diff = (
                float(np.max(np.abs(c_end - t_end)))
                if c_end is not None and t_end is not None
                else float("nan")
            )
            print(
                f"{row} {c_s * 1e3:>11.1f}ms {t_s * 1e3:>10.1f}ms {t_s / c_s:>10.2f} {diff:>10.2e}"
            )
            sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# 3. A neural ODE


NODE_BATCH, NODE_STATE, NODE_WIDTH = 4096, 64, 256
NODE_TOL = 1e-5


def node_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    d, h = NODE_STATE, NODE_WIDTH
    return {
        "w1": (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "w2": (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "y0": rng.standard_normal((NODE_BATCH, d)).astype(np.float32),
    }


class CupyMLP:
    """``dy/dt = tanh(y W1 + b1) W2 + b2`` with its VJP; ``params`` is one flat array."""

    def __init__(self, xp):
        self.xp = xp
        d, h = NODE_STATE, NODE_WIDTH
        self.shapes = [("w1", (d, h)), ("b1", (h,)), ("w2", (h, d)), ("b2", (d,))]
        self.nfev = 0

    def flat(self, weights):
        return self.xp.concatenate([self.xp.asarray(weights[k]).ravel() for k, _ in self.shapes])

    def unpack(self, p):
        out, start = [], 0
        for _, shape in self.shapes:
            size = int(np.prod(shape))
            out.append(p[start : start + size].reshape(shape))
            start += size
        return out

    def __call__(self, t, y, p):
        self.nfev += 1
        w1, b1, w2, b2 = self.unpack(p)
        return self.xp.tanh(y @ w1 + b1) @ w2 + b2

    def vjp(self, t, y, p, cotangent):
        self.nfev += 1
        w1, b1, w2, _ = self.unpack(p)
        hidden = self.xp.tanh(y @ w1 + b1)
        pre_bar = (cotangent @ w2.T) * (1 - hidden * hidden)
        parts = [y.T @ pre_bar, pre_bar.sum(axis=0), hidden.T @ cotangent, cotangent.sum(axis=0)]
        return pre_bar @ w1.T, self.xp.concatenate([q.ravel() for q in parts])


def measure_node(forward, gradient, sync, repeat: int, counter, to_numpy) -> dict:
    """Times of ``forward() -> ys`` and ``gradient() -> (ys, y0_bar, w1_bar)``, the
    evaluations of one call of each (``counter.nfev``), and the results as NumPy arrays."""
    forward_s, ys = best_time(forward, sync, repeat)
    counter.nfev = 0
    forward()
    forward_nfev = counter.nfev
    gradient_s, (_, y0_bar, w1_bar) = best_time(gradient, sync, repeat)
    counter.nfev = 0
    gradient()
    return {
        "forward": forward_s,
        "forward nfev": forward_nfev,
        "gradient": gradient_s,
        "gradient nfev": counter.nfev,
        "end": to_numpy(ys[-1]),
        "y0_bar": to_numpy(y0_bar),
        "w1_bar": to_numpy(w1_bar),
    }


def node_cupy(weights, repeat: int):
    import cupy

    f = CupyMLP(cupy)
    p = f.flat(weights)
    y0 = cupy.asarray(weights["y0"])
    t = cupy.asarray([0.0, 1.0], dtype=cupy.float32)
    sync = cupy.cuda.Device().synchronize
    settings = {"method": "dopri5", "rtol": NODE_TOL, "atol": NODE_TOL}

    def forward():
        return odecore.odeint(f, y0, t, params=p, **settings)

    def gradient():
        ys, pullback = odecore.vjp_odeint(f, y0, t, p, adjoint="backsolve", **settings)
        cotangent = cupy.zeros_like(ys)
        cotangent[-1] = 2 * ys[-1]
        y0_bar, p_bar, _ = pullback(cotangent)
        return ys, y0_bar, f.unpack(p_bar)[0]

    return measure_node(forward, gradient, sync, repeat, f, cupy.asnumpy)


def node_torch(weights, repeat: int, device="cuda"):
    import torch
    import torchdiffeq

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1, self.w2, self.b2 = (
                torch.nn.Parameter(torch.as_tensor(weights[k], device=device))
                for k in ("w1", "b1", "w2", "b2")
            )
            self.nfev = 0

        def forward(self, t, y):
            self.nfev += 1
            return torch.tanh(y @ self.w1 + self.b1) @ self.w2 + self.b2

    f = MLP()
    y0 = torch.as_tensor(weights["y0"], device=device)
    t = torch.tensor([0.0, 1.0], dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    settings = {"method": "dopri5", "rtol": NODE_TOL, "atol": NODE_TOL}

    def forward():
        with torch.no_grad():
            return torchdiffeq.odeint(f, y0, t, **settings)

    def gradient():
        y0_leaf = y0.clone().requires_grad_(True)
        f.zero_grad(set_to_none=True)
        ys = torchdiffeq.odeint_adjoint(f, y0_leaf, t, **settings)
        (ys[-1] ** 2).sum().backward()
        return ys, y0_leaf.grad, f.w1.grad

    return measure_node(forward, gradient, sync, repeat, f, lambda x: x.detach().cpu().numpy())


def run_node(repeat: int) -> None:
    weights = node_weights()
    results = {}
    for name, run in (("odecore cupy", node_cupy), ("torchdiffeq", node_torch)):
        try:
            results[name] = run(weights, repeat)
        except Exception as exc:  # report the side and go on
            print(f"node {name} failed: {type(exc).__name__}: {exc}")
    print(f"{'node':<13} {'forward':>10} {'nfev':>5} {'fwd+backsolve':>14} {'nfev':>5}")
    for name, r in results.items():
        print(
            f"{name:<13} {r['forward'] * 1e3:>8.1f}ms {r['forward nfev']:>5} "
            f"{r['gradient'] * 1e3:>12.1f}ms {r['gradient nfev']:>5}"
        )
    if len(results) == 2:
        ours, theirs = results["odecore cupy"], results["torchdiffeq"]

        def rel(key):
            return np.max(np.abs(ours[key] - theirs[key])) / np.max(np.abs(theirs[key]))

        print(
            f"ratio odecore/torch: forward {ours['forward'] / theirs['forward']:.2f}x, "
            f"gradient {ours['gradient'] / theirs['gradient']:.2f}x; relative differences: "
            f"y(1) {rel('end'):.1e}, y0_bar {rel('y0_bar'):.1e}, W1_bar {rel('w1_bar'):.1e}"
        )


# --------------------------------------------------------------------------------------------


PARTS = {
    "ensemble": (ensemble_missing, lambda a: run_ensemble(a.sizes, a.repeat, a.t1)),
    "peers": (peers_missing, lambda a: run_peers(a.peer_sizes, a.peer_repeat, a.t1)),
    "node": (peers_missing, lambda a: run_node(a.peer_repeat)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10, 14, 18, 20, 22, 23],
        help="log2 of the ensemble sizes",
    )
    parser.add_argument(
        "--peer-sizes", type=int, nargs="+", default=[10, 14, 18, 20], help="log2, peers"
    )
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (best kept)")
    parser.add_argument("--peer-repeat", type=int, default=3, help="timed runs of the peers")
    parser.add_argument("--t1", type=float, default=1.0, help="end time (shorter: a smoke run)")
    args = parser.parse_args(argv)
    # The DiffEqGPU benchmark asks float32 for rtol 1e-8, below its unit roundoff; odecore
    # warns about that on every solve (PrecisionWarning), and the comparison keeps the setting.
    warnings.simplefilter("ignore", odecore.PrecisionWarning)

    extra = {}
    try:
        import cupy

        extra["cupy"] = cupy.__version__
    except ImportError:
        pass
    try:
        import torch

        extra["torch"] = torch.__version__
        if torch.cuda.is_available():
            extra["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    print("\n".join(environment_lines(extra)))
    for name in args.parts:
        missing, run = PARTS[name]
        print(f"\n== {name}")
        why = missing()
        if why:
            print(f"bench_gpu {name}: skipped, nothing to measure here: " + "; ".join(why))
            continue
        run(args)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
