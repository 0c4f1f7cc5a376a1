"""odecore's fixed point against torchdeq on one DEQ layer, on one CPU thread.

    python benchmarks/bench_deq.py            # about two minutes
    python benchmarks/bench_deq.py --quick    # a few seconds

The layer is ``z = tanh(z W^T + x)`` (hidden width 128, a batch of 256, float32), with ``W``
scaled to spectral norm 0.9 so that plain iteration would be slow and Anderson has work to
do. Both libraries run Anderson mixing with memory 6 and regularisation 1e-4 to an absolute
residual of 1e-4 per sample, at most 60 iterations, and the implicit backward with Anderson
to the same tolerance.

Printed, odecore against torchdeq (ratios odecore / torchdeq; below 1 means odecore is
faster or needs fewer iterations): the forward solve without autograd, and the forward plus
implicit backward of ``sum(z * c)``, each the best of as many calls as fill --min-time
seconds, the two libraries' calls alternating; the error of each result against the
reference; the iterations each reports; and a summary table of the ratios with the errors.
The summary also has both libraries' Broyden forward at tol 1e-4 with a memory of 6 terms
(torchdeq's ``broyden_solver`` with ``LBFGS_thres=6`` overwrites its oldest term, odecore's
restarts from -I when its terms are used up).

The same tolerance does not give the same error: the libraries stop on different iterates
(torchdeq keeps each sample's best), so the run repeats both at the tolerances 1e-3 to 1e-6
(--quick: 1e-3 to 1e-5) and also compares time at equal error, as bench_numpy.py does: each
library's log(time) is interpolated along its log(error) curve at every error the other
reached (never extrapolated).

The reference is the same layer in float64: the fixed point by plain iteration to a residual
of 1e-12 per sample, and the implicit gradient by a direct linear solve per sample. odecore's
own float64 Anderson solve to 1e-12 is printed beside it, to show how tight the reference
is. Errors are max |result - reference| / max |reference|, for z* or the worst of the
gradients of W and x. This is a report, not a test.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from _common import (
    alternating_best_times,
    environment_lines,
    equal_error_ratios,
    geometric_mean,
    print_summary,
    relative_error,
)

import odecore

try:
    from torchdeq import get_deq
    from torchdeq.solver import anderson_solver, broyden_solver
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench_deq.py compares with torchdeq: pip install torchdeq")

HIDDEN, BATCH = 128, 256
TOL, MAX_ITER, MEMORY, LAM = 1e-4, 60, 6, 1e-4
SWEEP = (1e-3, 1e-4, 1e-5, 1e-6)
REFERENCE_TOL, REFERENCE_MAX_ITER = 1e-12, 1000


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


# --------------------------------------------------------------------------------------------
# The calls being compared


def odecore_settings(tol):
    """The settings both odecore calls share, matching torchdeq's below."""
    return {
        "solver": "anderson",
        "m": MEMORY,
        "lam": LAM,
        "tol": tol,
        "max_iter": MAX_ITER,
        "batch_axis": 0,
    }


def odecore_forward(W, x, tol):
    with torch.no_grad():
        return odecore.solve_fixed_point(
            layer, torch.zeros_like(x), (W, x), **odecore_settings(tol)
        )


def odecore_gradient(W, x, c, tol):
    sol = odecore.solve_fixed_point(
        layer,
        torch.zeros_like(x),
        (W, x),
        backward="implicit",
        backward_solver="anderson",
        **odecore_settings(tol),
    )
    W.grad = x.grad = None
    (sol.z * c).sum().backward()
    return sol, W.grad.clone(), x.grad.clone()


def torchdeq_forward(W, x, tol):
    with torch.no_grad():
        return anderson_solver(
            lambda z: layer(z, (W, x)),
            torch.zeros_like(x),
            max_iter=MAX_ITER,
            tol=tol,
            stop_mode="abs",
            m=MEMORY,
            lam=LAM,
        )


def odecore_broyden_forward(W, x, tol):
    with torch.no_grad():
        settings = {**odecore_settings(tol), "solver": "broyden"}
        del settings["lam"]
        return odecore.solve_fixed_point(layer, torch.zeros_like(x), (W, x), **settings)


def torchdeq_broyden_forward(W, x, tol):
    # LBFGS_thres: torchdeq's memory of low-rank terms (it overwrites the oldest; odecore
    # restarts from -I when its m terms are used up).
    with torch.no_grad():
        return broyden_solver(
            lambda z: layer(z, (W, x)),
            torch.zeros_like(x),
            max_iter=MAX_ITER,
            tol=tol,
            stop_mode="abs",
            LBFGS_thres=MEMORY,
        )


def torchdeq_layer(tol):
    return get_deq(
        f_solver="anderson",
        b_solver="anderson",
        f_max_iter=MAX_ITER,
        b_max_iter=MAX_ITER,
        f_tol=tol,
        b_tol=tol,
        f_stop_mode="abs",
        b_stop_mode="abs",
        ift=True,
    )


def torchdeq_gradient(deq, W, x, c):
    z_out, info = deq(lambda z: layer(z, (W, x)), torch.zeros_like(x))
    W.grad = x.grad = None
    (z_out[-1] * c).sum().backward()
    return z_out[-1], info, W.grad.clone(), x.grad.clone()


# --------------------------------------------------------------------------------------------
# The reference


def reference(W, x, c):
    """``(z*, dL/dW, dL/dx)`` for ``L = sum(z* c)``, in float64: plain iteration, a contraction
    since |W|_2 = 0.9 and |tanh'| <= 1, until every sample's residual is below 1e-12; then
    the implicit gradient by a direct solve per sample. With ``s = 1 - z*^2`` the Jacobian of
    the layer in z is ``diag(s) W``, and ``u (I - diag(s) W) = c`` gives
    ``dL/dx = u s`` and ``dL/dW = (u s)^T z*``."""
    W, x, c = (a.detach().double() for a in (W, x, c))
    z = torch.zeros_like(x)
    for _ in range(REFERENCE_MAX_ITER):
        z_next = torch.tanh(z @ W.T + x)
        converged = bool((z_next - z).norm(dim=1).max() <= REFERENCE_TOL)
        z = z_next
        if converged:
            break
    else:
        raise RuntimeError("the reference fixed point did not converge")
    s = 1.0 - z**2
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    system = eye - W.T[None] * s[:, None, :]  # (I - diag(s) W)^T, per sample
    u = torch.linalg.solve(system, c[..., None])[..., 0]
    return z, (u * s).T @ z, u * s


def reference_check(W, x, c):
    """odecore's own tight solve in float64 (Anderson to 1e-12, implicit backward to 1e-12):
    how far it is from the reference says how tight the reference is."""
    W, x = (a.detach().double().requires_grad_() for a in (W, x))
    sol = odecore.solve_fixed_point(
        layer,
        torch.zeros_like(x),
        (W, x),
        solver="anderson",
        tol=REFERENCE_TOL,
        max_iter=REFERENCE_MAX_ITER,
        backward_tol=REFERENCE_TOL,
        batch_axis=0,
    )
    (sol.z * c.double()).sum().backward()
    return sol.z.detach(), W.grad, x.grad


def error(values, references) -> float:
    return relative_error(
        [v.detach().numpy() for v in values], [r.detach().numpy() for r in references]
    )


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    """Both libraries at one tolerance: seconds and errors, (odecore, torchdeq) each."""

    tol: float
    forward: tuple[float, float]
    forward_error: tuple[float, float]
    gradient: tuple[float, float]
    gradient_error: tuple[float, float]
    iterations: tuple[float, float]  # forward, mean over the samples
    details: dict


def measure(tol, W, x, c, reference_values, min_time, repeats) -> Measurement:
    z_ref, gW_ref, gx_ref = reference_values
    deq = torchdeq_layer(tol)
    sol = odecore_forward(W, x, tol)
    z_peer, _, info = torchdeq_forward(W, x, tol)
    sol_g, gW, gx = odecore_gradient(W, x, c, tol)
    _, _, gW_peer, gx_peer = torchdeq_gradient(deq, W, x, c)
    forward = alternating_best_times(
        [lambda: odecore_forward(W, x, tol), lambda: torchdeq_forward(W, x, tol)],
        min_time,
        repeats,
    )
    gradient = alternating_best_times(
        [lambda: odecore_gradient(W, x, c, tol), lambda: torchdeq_gradient(deq, W, x, c)],
        min_time,
        repeats,
    )
    g_ref = [gW_ref, gx_ref]
    return Measurement(
        tol,
        tuple(forward),
        (error([sol.z], [z_ref]), error([z_peer], [z_ref])),
        tuple(gradient),
        (error([gW, gx], g_ref), error([gW_peer, gx_peer], g_ref)),
        (float(sol.iterations.double().mean()), float(info["nstep"].double().mean())),
        {
            "iterations_max": (int(sol.iterations.max()), int(info["nstep"].max())),
            "nfev": int(sol.stats["nfev"]),
            "backward_iterations": float(sol_g.stats["backward_iterations"].double().mean()),
            "converged": int((sol.status == 0).sum()),
        },
    )


def measure_broyden(W, x, z_ref, min_time, repeats):
    """Both libraries' Broyden forward at :data:`TOL`: ``(seconds, errors, iterations)``,
    each an (odecore, torchdeq) pair."""
    sol = odecore_broyden_forward(W, x, TOL)
    z_peer, _, info = torchdeq_broyden_forward(W, x, TOL)
    times = alternating_best_times(
        [lambda: odecore_broyden_forward(W, x, TOL), lambda: torchdeq_broyden_forward(W, x, TOL)],
        min_time,
        repeats,
    )
    errors = (error([sol.z], [z_ref]), error([z_peer], [z_ref]))
    iterations = (float(sol.iterations.double().mean()), float(info["nstep"].double().mean()))
    return tuple(times), errors, iterations


def equal_error(curve) -> list[tuple[float, float]]:
    """``[(error, time odecore / torchdeq)]`` where the two work-precision curves overlap;
    ``curve`` lists ``((seconds odecore, torchdeq), (error odecore, torchdeq))`` by tolerance."""
    ours = ([e[0] for _, e in curve], [t[0] for t, _ in curve])
    peer = ([e[1] for _, e in curve], [t[1] for t, _ in curve])
    matched = equal_error_ratios(*ours, *peer)
    matched += [(e, 1.0 / r) for e, r in equal_error_ratios(*peer, *ours)]
    return sorted(matched, reverse=True)


def describe(matched) -> str:
    if not matched:
        return "no overlap"
    ratios = [r for _, r in matched]
    return (
        f"{geometric_mean(ratios):.2f} (geometric mean of {len(ratios)}; {min(ratios):.2f} to "
        f"{max(ratios):.2f} over errors {min(e for e, _ in matched):.0e} to "
        f"{max(e for e, _ in matched):.0e})"
    )


# --------------------------------------------------------------------------------------------
# Report


def print_headline(m: Measurement) -> None:
    (t_fwd, t_fwd_peer), (t_grad, t_grad_peer) = m.forward, m.gradient
    (iters, iters_peer), d = m.iterations, m.details
    print(f"at tol {m.tol:g}:")
    print(f"{'':34}{'odecore':>12}{'torchdeq':>12}{'ratio':>9}")
    print(
        f"{'forward time (ms)':34}{t_fwd * 1e3:12.2f}{t_fwd_peer * 1e3:12.2f}"
        f"{t_fwd / t_fwd_peer:9.2f}"
    )
    print(f"{'  error of z*':34}{m.forward_error[0]:12.1e}{m.forward_error[1]:12.1e}")
    print(
        f"{'forward + implicit backward (ms)':34}{t_grad * 1e3:12.2f}"
        f"{t_grad_peer * 1e3:12.2f}{t_grad / t_grad_peer:9.2f}"
    )
    print(f"{'  error of the gradients':34}{m.gradient_error[0]:12.1e}{m.gradient_error[1]:12.1e}")
    bwd, bwd_peer = t_grad - t_fwd, t_grad_peer - t_fwd_peer
    print(
        f"{'backward alone (difference, ms)':34}{bwd * 1e3:12.2f}{bwd_peer * 1e3:12.2f}"
        f"{bwd / bwd_peer:9.2f}"
    )
    print(
        f"{'forward iterations, mean':34}{iters:12.1f}{iters_peer:12.1f}{iters / iters_peer:9.2f}"
    )
    print(f"{'forward iterations, max':34}{d['iterations_max'][0]:12d}{d['iterations_max'][1]:12d}")
    print(f"{'forward f calls (whole batch)':34}{d['nfev']:12d}")
    print(f"{'backward iterations, mean':34}{d['backward_iterations']:12.1f}{'n/a':>12}")
    print(f"{'odecore converged samples':34}{d['converged']:12d}")
    print(
        "(error: max |result - reference| / max |reference|, the worst of z* or of the "
        "gradients of W and x)"
    )


def print_sweep(measurements) -> None:
    head = (
        f"{'tol':>6}  {'forward ms od':>13} {'error':>8} {'td':>8} {'error':>8}  "
        f"{'grad ms od':>10} {'error':>8} {'td':>8} {'error':>8}  {'iterations od/td':>16}"
    )
    print(head)
    print("-" * len(head))
    for m in measurements:
        print(
            f"{m.tol:>6.0e}  {m.forward[0] * 1e3:>13.2f} {m.forward_error[0]:>8.1e} "
            f"{m.forward[1] * 1e3:>8.2f} {m.forward_error[1]:>8.1e}  "
            f"{m.gradient[0] * 1e3:>10.2f} {m.gradient_error[0]:>8.1e} "
            f"{m.gradient[1] * 1e3:>8.2f} {m.gradient_error[1]:>8.1e}  "
            f"{m.iterations[0]:>9.1f} / {m.iterations[1]:.1f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings, three tolerances")
    parser.add_argument("--min-time", type=float, default=None)
    args = parser.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 2.0)
    repeats = 2 if args.quick else 5
    sweep = SWEEP[:-1] if args.quick else SWEEP
    torch.set_num_threads(1)
    from importlib.metadata import version

    for line in environment_lines({"torch": torch.__version__, "torchdeq": version("torchdeq")}):
        print(line)
    print(f"layer: tanh(z W^T + x), width {HIDDEN}, batch {BATCH}, float32, |W|_2 = 0.9")
    print(f"Anderson m={MEMORY} lam={LAM}, abs tol {TOL}, max_iter {MAX_ITER}; one thread")

    W, x, c = make_layer()
    reference_values = reference(W, x, c)
    check = reference_check(W, x, c)
    print(
        f"reference: float64, plain iteration to a residual of {REFERENCE_TOL:g} per sample, "
        "gradient by a direct"
    )
    print(
        f"  solve per sample; odecore's Anderson to {REFERENCE_TOL:g} (implicit backward to "
        f"{REFERENCE_TOL:g}) differs from it by"
    )
    print(
        f"  {error(check[:1], reference_values[:1]):.1e} (z*) and "
        f"{error(check[1:], reference_values[1:]):.1e} (gradients)\n"
    )

    measurements = [measure(tol, W, x, c, reference_values, min_time, repeats) for tol in sweep]
    headline = next(m for m in measurements if m.tol == TOL)
    print_headline(headline)
    print()
    print("at each tolerance (od: odecore, td: torchdeq; errors against the reference):")
    print_sweep(measurements)
    forward_matched = equal_error([(m.forward, m.forward_error) for m in measurements])
    gradient_matched = equal_error([(m.gradient, m.gradient_error) for m in measurements])
    print("time at equal error, odecore / torchdeq, where the curves overlap:")
    print(f"  forward                      {describe(forward_matched)}")
    print(f"  forward + implicit backward  {describe(gradient_matched)}")
    print()
    rows = [
        (f"forward, tol {TOL:g}", headline.forward[0], headline.forward_error[0])
        + (headline.forward[1], headline.forward_error[1], ""),
        (f"forward + implicit backward, tol {TOL:g}", headline.gradient[0])
        + (headline.gradient_error[0], headline.gradient[1], headline.gradient_error[1], ""),
    ]
    b_times, b_errors, b_iterations = measure_broyden(W, x, reference_values[0], min_time, repeats)
    print(
        f"Broyden forward at tol {TOL:g}, memory {MEMORY}: odecore {b_times[0] * 1e3:.2f} ms "
        f"(error {b_errors[0]:.1e}, {b_iterations[0]:.1f} iterations), torchdeq "
        f"{b_times[1] * 1e3:.2f} ms (error {b_errors[1]:.1e}, {b_iterations[1]:.1f} iterations)"
    )
    print()
    rows.append(
        (f"Broyden forward, tol {TOL:g}", b_times[0], b_errors[0], b_times[1], b_errors[1], "")
    )
    print_summary("torchdeq", rows)
    for name, matched in (("forward", forward_matched), ("forward + backward", gradient_matched)):
        print(f"at equal error, {name}: {describe(matched)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
