"""odecore's fixed point against torchdeq on one DEQ layer, on one CPU thread.

    python benchmarks/bench_deq.py            # about a minute
    python benchmarks/bench_deq.py --quick    # a few seconds

The layer is ``z = tanh(z W^T + x)`` (hidden width 128, a batch of 256, float32), with ``W``
scaled to spectral norm 0.9 so that plain iteration would be slow and Anderson has work to
do. Both libraries run Anderson mixing with memory 6 and regularisation 1e-4 to an absolute
residual of 1e-4 per sample, at most 60 iterations, and the implicit backward with Anderson
to the same tolerance.

Printed, odecore against torchdeq (ratios odecore / torchdeq; below 1 means odecore is
faster or needs fewer iterations): the forward solve without autograd, and the forward plus
implicit backward of ``sum(z * c)``, each the best of as many calls as fill --min-time
seconds, the two libraries alternating; the iterations each reports; and the largest
difference between their fixed points and gradients. This is a report, not a test.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import best_time, environment_lines

import odecore

HIDDEN, BATCH = 128, 256
TOL, MAX_ITER, MEMORY, LAM = 1e-4, 60, 6, 1e-4


def make_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(HIDDEN, HIDDEN, generator=g)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(BATCH, HIDDEN, generator=g)
    c = torch.randn(BATCH, HIDDEN, generator=g)
    return W.requires_grad_(), x.requires_grad_(), c


def layer(z, params):
    W, x = params
    return torch.tanh(z @ W.T + x)


# The forward settings both odecore calls share, matching torchdeq's below.
ODECORE_FORWARD = {
    "solver": "anderson",
    "m": MEMORY,
    "lam": LAM,
    "tol": TOL,
    "max_iter": MAX_ITER,
    "batch_axis": 0,
}


def odecore_forward(W, x):
    with torch.no_grad():
        return odecore.solve_fixed_point(layer, torch.zeros_like(x), (W, x), **ODECORE_FORWARD)


def odecore_gradient(W, x, c):
    sol = odecore.solve_fixed_point(
        layer,
        torch.zeros_like(x),
        (W, x),
        backward="implicit",
        backward_solver="anderson",
        **ODECORE_FORWARD,
    )
    W.grad = x.grad = None
    (sol.z * c).sum().backward()
    return sol, W.grad.clone(), x.grad.clone()


def torchdeq_forward(W, x):
    from torchdeq.solver import anderson_solver

    with torch.no_grad():
        return anderson_solver(
            lambda z: layer(z, (W, x)),
            torch.zeros_like(x),
            max_iter=MAX_ITER,
            tol=TOL,
            stop_mode="abs",
            m=MEMORY,
            lam=LAM,
        )


def torchdeq_gradient(deq, W, x, c):
    z_out, info = deq(lambda z: layer(z, (W, x)), torch.zeros_like(x))
    W.grad = x.grad = None
    (z_out[-1] * c).sum().backward()
    return z_out[-1], info, W.grad.clone(), x.grad.clone()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings")
    parser.add_argument("--min-time", type=float, default=None)
    args = parser.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 3.0)
    repeats = 2 if args.quick else 5
    torch.set_num_threads(1)
    try:
        from importlib.metadata import version

        from torchdeq import get_deq
    except ImportError:
        print("bench_deq needs torchdeq: pip install torchdeq")
        return 1
    for line in environment_lines({"torch": torch.__version__, "torchdeq": version("torchdeq")}):
        print(line)
    print(f"layer: tanh(z W^T + x), width {HIDDEN}, batch {BATCH}, float32, |W|_2 = 0.9")
    print(f"Anderson m={MEMORY} lam={LAM}, abs tol {TOL}, max_iter {MAX_ITER}; one thread\n")

    W, x, c = make_layer()
    deq = get_deq(
        f_solver="anderson",
        b_solver="anderson",
        f_max_iter=MAX_ITER,
        b_max_iter=MAX_ITER,
        f_tol=TOL,
        b_tol=TOL,
        f_stop_mode="abs",
        b_stop_mode="abs",
        ift=True,
    )

    # Results and iterations, from one call each.
    sol = odecore_forward(W, x)
    z_ref, _, info = torchdeq_forward(W, x)
    sol_g, gW, gx = odecore_gradient(W, x, c)
    _, _, gW_ref, gx_ref = torchdeq_gradient(deq, W, x, c)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    # Timings, alternating between the libraries.
    t_fwd = best_time(lambda: odecore_forward(W, x), min_time, repeats)[0]
    t_fwd_ref = best_time(lambda: torchdeq_forward(W, x), min_time, repeats)[0]
    t_grad = best_time(lambda: odecore_gradient(W, x, c), min_time, repeats)[0]
    t_grad_ref = best_time(lambda: torchdeq_gradient(deq, W, x, c), min_time, repeats)[0]
    t_fwd2 = best_time(lambda: odecore_forward(W, x), min_time, repeats)[0]
    t_fwd_ref2 = best_time(lambda: torchdeq_forward(W, x), min_time, repeats)[0]
    t_fwd, t_fwd_ref = min(t_fwd, t_fwd2), min(t_fwd_ref, t_fwd_ref2)

    iters = float(sol.iterations.double().mean())
    iters_max = int(sol.iterations.max())
    ref_steps = info["nstep"].double()
    back_iters = float(sol_g.stats["backward_iterations"].double().mean())
    print(f"{'':34}{'odecore':>12}{'torchdeq':>12}{'ratio':>9}")
    print(
        f"{'forward time (ms)':34}{t_fwd * 1e3:12.2f}{t_fwd_ref * 1e3:12.2f}"
        f"{t_fwd / t_fwd_ref:9.2f}"
    )
    print(
        f"{'forward + implicit backward (ms)':34}{t_grad * 1e3:12.2f}"
        f"{t_grad_ref * 1e3:12.2f}{t_grad / t_grad_ref:9.2f}"
    )
    bwd, bwd_ref = t_grad - t_fwd, t_grad_ref - t_fwd_ref
    print(
        f"{'  backward alone (difference, ms)':34}{bwd * 1e3:12.2f}{bwd_ref * 1e3:12.2f}"
        f"{bwd / bwd_ref:9.2f}"
    )
    print(
        f"{'forward iterations, mean':34}{iters:12.1f}{float(ref_steps.mean()):12.1f}"
        f"{iters / float(ref_steps.mean()):9.2f}"
    )
    print(f"{'forward iterations, max':34}{iters_max:12d}{int(ref_steps.max()):12d}")
    print(f"{'forward f calls (whole batch)':34}{int(sol.stats['nfev']):12d}{'':>12}")
    print(f"{'backward iterations, mean':34}{back_iters:12.1f}{'n/a':>12}")
    print(f"{'odecore converged samples':34}{int((sol.status == 0).sum()):12d}")
    print(f"\nmax |z - z_torchdeq| / max |z_torchdeq|: {rel(sol.z, z_ref):.1e}")
    print(f"max relative gradient difference: W {rel(gW, gW_ref):.1e}, x {rel(gx, gx_ref):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
