"""``method="scipy_solver"``: the solve handed to ``scipy.integrate.solve_ivp`` on the CPU.

This gives NumPy and torch users scipy's solvers, its stiff ones (``Radau``, ``BDF``,
``LSODA``) among them, under torchdiffeq's spelling: ``options={"solver": "BDF"}``. The state
goes to the host as float64, ``func`` is called on arrays of the input's kind, device and
dtype, and the outputs come back as such. Gradients come from the continuous adjoint
(``adjoint="backsolve"``, as ``odeint_adjoint`` asks for), whose backward solve scipy runs
too: the augmented dynamics ``[y, a, a_theta]' = [f, -a df/dy, -a df/dtheta]`` of
``odecore.adjoint.backsolve``, with ``y`` reset to the forward output at every output time.
"""

from __future__ import annotations

import math

from odecore import _validate
from odecore._config import resolve_backend
from odecore.adjoint.backsolve import _augmented_dynamics
from odecore.adjoint.failed import FailedOutputs
from odecore.adjoint.rule import SOLVE_CAPTURED_MESSAGE
from odecore.adjoint.time_grads import finish_gradients
from odecore.backend import differentiate
from odecore.backend.structured import StateStructure, StructuredFunc, describe, is_structured
from odecore.ode.problem import check_parameters_are_known, prepare
from odecore.ode.solution import Solution, SolveError, Status

METHOD = "scipy_solver"
#: The ``solve_ivp`` methods ``options["solver"]`` may name.
SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
#: The solver torchdiffeq's scipy_solver uses when ``options`` names none.
DEFAULT_SOLVER = "LSODA"
# The options torchdiffeq passes on to solve_ivp besides the solver.
PASSED_ON = ("min_step", "max_step")
BACKENDS = ("numpy", "torch")


def scipy_solve(func, y0, t, keywords: dict) -> Solution:
    """:func:`odecore.solve` with ``method="scipy_solver"`` (``keywords`` are its own)."""
    bk = resolve_backend(keywords["backend"], {"y0": y0, "t": t, "params": keywords["params"]})
    if bk.name not in BACKENDS:
        raise ValueError(
            f"method='scipy_solver' runs scipy.integrate.solve_ivp on the CPU for NumPy and "
            f"torch arrays; the {bk.name!r} backend cannot use it. Use one of odecore's "
            f"methods (odecore.METHODS), or pass NumPy arrays"
        )
    if keywords["batch_axis"] is not None:
        raise ValueError(
            "method='scipy_solver' solves one sample at a time; drop batch_axis and call it "
            "per sample, or use one of odecore's methods, which solve batches"
        )
    if keywords["event"]:
        raise ValueError(
            "method='scipy_solver' does not locate odecore events (event=...); use one of "
            "odecore's methods (odecore.METHODS, e.g. 'dopri5'), which do, with gradients"
        )
    solver, passed_on = scipy_options(keywords["options"], "options")
    structure = None
    if is_structured(y0):
        node, found = describe(y0)
        parts = [(path, _validate.initial_state(bk, leaf, name=path)) for path, leaf in found]
        structure = StateStructure(bk.xp, node, parts, None)
        func = StructuredFunc(bk, func, structure)
        y0 = structure.flatten([leaf for _, leaf in parts])
        keywords = {
            **keywords,
            "rtol": structure.tolerance(bk, keywords["rtol"], "rtol"),
            "atol": structure.tolerance(bk, keywords["atol"], "atol"),
        }
    solution = _solve_flat(bk, func, y0, t, keywords, solver, passed_on)
    if structure is not None:
        solution.ys = structure.unflatten(solution.ys, lead=1)
    return solution


def scipy_options(options, name: str) -> tuple[str, dict]:
    """``(solver, solve_ivp keywords)`` from ``options``, checked."""
    _validate.check_dict(options or {}, name)
    options = dict(options or {})
    unknown = sorted(set(options) - {"solver", *PASSED_ON})
    if unknown:
        raise ValueError(
            f"{name} {unknown} not understood by method='scipy_solver', which takes "
            f"'solver' ({', '.join(SOLVERS)}) and {', '.join(map(repr, PASSED_ON))}"
        )
    solver = options.pop("solver", DEFAULT_SOLVER)
    if solver not in SOLVERS:
        raise ValueError(f"{name}['solver'] must be one of {', '.join(SOLVERS)}, got {solver!r}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name}[{key!r}] must be a non-negative number, got {value!r}")
    return solver, options


def _solve_flat(bk, func, y0, t, keywords, solver, passed_on) -> Solution:
    mode = _validate.adjoint_mode(keywords["adjoint"], bk)
    adjoint = _adjoint_settings(keywords, mode, solver, passed_on)
    params, adjoint_params = keywords["params"], keywords["adjoint_params"]
    _validate.call_arguments(func, keywords["throw"], adjoint_params)
    _validate.holding_values(bk, y0, "y0")
    with bk.device_scope(y0):
        if bk.owns(y0):
            t = _validate.time_array(bk, t, "t", _validate.TIMES_NEED, like=y0)
        y0, t = bk.asarray(y0), bk.asarray(t)

        def problem_of(y0_, t_, leaves):
            # The dynamics, layout and checked inputs of an ordinary solve; scipy takes the
            # steps instead of its loop.
            params_ = params if leaves is None else differentiate.with_leaves(bk, params, leaves)
            rtol, atol = keywords["rtol"], keywords["atol"]
            return prepare(bk, func, y0_, t_, params_, rtol, atol, None, None, None, leaves)

        rule = ScipyRule(bk, problem_of, solver, passed_on, keywords, adjoint)
        if mode is None or not bk.has_autodiff:
            return rule.solve(y0, t, None)
        leaves = (
            differentiate.param_leaves(bk, func, params)
            if adjoint_params is None
            else list(differentiate.distinct(adjoint_params))
        )
        wanted = {"y0": y0, "t": t, "params": params, "p": leaves}
        if not differentiate.requires_grad(bk, wanted) or t.shape[0] < 2:
            # Tensors func uses besides those known would get no gradient through scipy.
            if adjoint_params is None:
                check_parameters_are_known(bk, func, params, leaves, t, y0, None)
            return rule.solve(y0, t, leaves)
        if mode != "backsolve":
            raise ValueError(
                f"method='scipy_solver' gets gradients from the continuous adjoint only: "
                f"pass adjoint='backsolve' (or call odecore.odeint_adjoint) instead of "
                f"adjoint={mode!r}, or solve under torch.no_grad() when no gradient is needed"
            )
        if adjoint_params is None:
            check_parameters_are_known(bk, func, params, leaves, t, y0, None)
        ys, report = bk.autodiff.custom_vjp(rule)(y0, t, *leaves)
        return Solution(ys=ys, method=METHOD, **report)


def _adjoint_settings(keywords, mode, solver, passed_on) -> dict | None:
    """The backward solve's solver, tolerances and solve_ivp keywords: the forward's unless
    given."""
    method = keywords["adjoint_method"]
    given = [
        k for k in ("adjoint_rtol", "adjoint_atol", "adjoint_options") if keywords[k] is not None
    ]
    if mode != "backsolve":
        if given or method is not None:
            raise ValueError(
                f"{', '.join(given or ['adjoint_method'])} configure the backward solve of "
                f"adjoint='backsolve', and this solve uses adjoint={mode!r}; pass "
                f"adjoint='backsolve' or drop them"
            )
        return None
    if method not in (None, METHOD):
        raise ValueError(
            f"with method='scipy_solver' the backward solve runs through scipy too; "
            f"adjoint_method must be 'scipy_solver' or None, got {method!r}"
        )
    if keywords["adjoint_options"] is not None:
        solver, passed_on = scipy_options(keywords["adjoint_options"], "adjoint_options")
    return {
        "solver": solver,
        "passed_on": passed_on,
        "rtol": keywords["rtol" if keywords["adjoint_rtol"] is None else "adjoint_rtol"],
        "atol": keywords["atol" if keywords["adjoint_atol"] is None else "adjoint_atol"],
    }


def _to_host(bk, x):
    """``x`` as a float64 NumPy array on the host."""
    import array_api_compat
    import numpy as np

    return np.asarray(array_api_compat.to_device(bk.stop_gradient(x), "cpu"), dtype=np.float64)


def _host_tolerance(bk, value):
    """A tolerance as solve_ivp takes it: a number, or one value per element of the state."""
    if isinstance(value, int | float):
        return value
    value = _to_host(bk, value).reshape(-1)
    return float(value[0]) if value.size == 1 else value


def _solve_ivp(rate, t_span, z0, t_eval, solver, rtol, atol, passed_on):
    from scipy.integrate import solve_ivp

    return solve_ivp(
        rate,
        t_span,
        z0,
        method=solver,
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
        **passed_on,
    )


class ScipyRule:
    """The scipy solve as a rule (``odecore.adjoint.rule``): the forward solve and the
    backsolve, both by ``solve_ivp``."""

    second_order_message = (
        "second-order gradients are not available with method='scipy_solver': its backward "
        "pass computes first-order gradients only; use one of odecore's methods with "
        "adjoint='direct'"
    )
    captured_message = SOLVE_CAPTURED_MESSAGE

    def __init__(self, bk, problem_of, solver, passed_on, keywords, adjoint):
        self.bk = bk
        self.problem_of = problem_of
        self.solver = solver
        self.passed_on = passed_on
        self.rtol, self.atol = keywords["rtol"], keywords["atol"]
        self.throw = keywords["throw"]
        self.adjoint = adjoint

    def solve(self, y0, t, leaves) -> Solution:
        return self.forward(y0, t, *(leaves or []))[2][2]

    def forward(self, y0, t, *leaves):
        bk = self.bk
        xp = bk.xp
        problem = self.problem_of(y0, t, list(leaves) or None)
        if problem is None:  # a single output time
            solution = _solution(bk, t, xp.stack([y0]), 0, Status.SUCCESS, t[0])
            return solution.ys, solution.report(), (None, solution.ys, solution)
        dyn, lay = problem.dynamics, problem.layout
        shape, dtype = lay.shape, lay.user_dtype
        nfev, latest = [0], [float(problem.ts[0])]

        def rate(s, y):
            # solve_ivp reports only the t_eval it reached: the latest time it evaluated
            # at says how far a failed solve got.
            nfev[0] += 1
            latest[0] = max(latest[0], float(s))
            y_user = bk.asarray(y.reshape(shape), dtype=dtype, like=y0)
            s = float(s) if problem.ops.scalar else problem.ops.full(lay.batch, float(s))
            with bk.no_grad():
                f = dyn(s, lay.to_internal(xp, y_user))
            return _to_host(bk, lay.to_user(xp, f)).reshape(-1)

        # Time runs forward inside (``s = sign * t``), as in odecore's own loop.
        s_eval = _to_host(bk, problem.ts_array)
        result = _solve_ivp(
            rate,
            (s_eval[0], s_eval[-1]),
            _to_host(bk, y0).reshape(-1),
            s_eval,
            self.solver,
            _host_tolerance(bk, self.rtol),
            _host_tolerance(bk, self.atol),
            self.passed_on,
        )
        solution = self._solution(bk, y0, t, result, nfev[0], shape, dtype, dyn.sign * latest[0])
        if self.throw and not solution.success:
            raise SolveError(_failure_message(solution, self.solver, result.message), solution)
        ys = solution.ys
        return ys, solution.report(), (problem, bk.stop_gradient(ys), solution)

    def _solution(self, bk, y0, t, result, nfev, shape, dtype, t_latest):
        import numpy as np

        reached = result.y.shape[1]
        host = np.full((t.shape[0], math.prod(shape)), np.nan)
        host[:reached] = result.y.T
        ys = bk.asarray(host.reshape((t.shape[0], *shape)), dtype=dtype, like=y0)
        status = Status.SUCCESS if result.success else _status_of(result)
        t_reached = float(t[-1]) if result.success else float(t_latest)
        return _solution(bk, t, ys, nfev, status, t_reached)

    def backward(self, residuals, ys_bar, needs=None):
        problem, ys, solution = residuals
        bk = self.bk
        xp = bk.xp
        if not solution.success:
            raise SolveError(
                "the gradient of a failed method='scipy_solver' solve is not available: "
                "its outputs past the failure are NaN; see the forward's status",
                solution,
            )
        dyn, lay = problem.dynamics, problem.layout
        shape, dtype = lay.shape, lay.user_dtype
        m = math.prod(shape)
        leaves = dyn.leaves
        sizes = [math.prod(leaf.shape) for leaf in leaves]
        aug = _augmented_dynamics(bk, dyn, shape, m, leaves, sizes)
        like = ys

        def rate(t, z):
            t_user = bk.asarray(t, dtype=dtype, like=like)
            return _to_host(bk, aug(t_user, bk.asarray(z, dtype=dtype, like=like)))

        t_user = _to_host(bk, problem.ts_array * dyn.sign)
        settings = self.adjoint
        a = xp.zeros(shape, dtype=dtype)
        a_theta = _to_host(bk, xp.zeros((sum(sizes),), dtype=dtype))
        for i in range(ys.shape[0] - 1, 0, -1):
            a = a + ys_bar[i]
            z0 = _to_host(bk, xp.concat([xp.reshape(ys[i], (-1,)), xp.reshape(a, (-1,))]))
            result = _solve_ivp(
                rate,
                (t_user[i], t_user[i - 1]),
                _joined(z0, a_theta),
                None,
                settings["solver"],
                _host_tolerance(bk, settings["rtol"]),
                _host_tolerance(bk, settings["atol"]),
                settings["passed_on"],
            )
            if not result.success:
                raise SolveError(
                    f"odecore: the backward method='scipy_solver' solve failed between "
                    f"t={t_user[i]:.17g} and t={t_user[i - 1]:.17g}; scipy: {result.message}"
                )
            z = result.y[:, -1]
            a = bk.asarray(z[m : 2 * m].reshape(shape), dtype=dtype, like=like)
            a_theta = z[2 * m :]
        leaves_bar, start = [], 0
        for leaf, size in zip(leaves, sizes, strict=True):
            part = a_theta[start : start + size].reshape(leaf.shape)
            leaves_bar.append(bk.asarray(part, dtype=leaf.dtype, like=leaf))
            start += size
        want_t = needs is None or bool(needs[1])
        failed = FailedOutputs(bk, lay, ys)
        y0_bar, t_bar, leaves_bar = finish_gradients(
            problem, ys, ys_bar, a, leaves_bar, want_t, failed
        )
        return (y0_bar, t_bar, *leaves_bar)

    @staticmethod
    def rereads(primals, out):
        # The outputs the backward solve restarts from and the parameters of its VJPs.
        return [out, *primals[2:]]

    def captured(self):
        return []

    @staticmethod
    def residual_arrays(residuals):
        raise NotImplementedError("method='scipy_solver' does not run under tracing")

    def from_arrays(self, primals, arrays):
        raise NotImplementedError("method='scipy_solver' does not run under tracing")


def _joined(a, b):
    import numpy as np

    return np.concatenate([a, b])


def _status_of(result) -> Status:
    """odecore's status for a failed solve_ivp: too small a step is an underflow, a
    non-finite state is one; scipy's message says which."""
    import numpy as np

    if result.y.size and not np.all(np.isfinite(result.y)):
        return Status.NONFINITE_STATE
    return Status.DT_UNDERFLOW


def _failure_message(solution, solver, scipy_message) -> str:
    return (
        f"odecore: the scipy_solver ({solver}) solve failed at t={solution.t_reached:.17g}: "
        f"{solution.message}. scipy: {scipy_message} Statistics: nfev={solution.stats['nfev']}."
    )


def _solution(bk, t, ys, nfev, status, t_reached) -> Solution:
    # solve_ivp reports evaluations, not steps: the step counts are not known.
    stats = {"nfev": nfev}
    return Solution(
        ts=t, ys=ys, stats=stats, status=int(status), t_reached=t_reached, method=METHOD
    )
