"""Log-densities and samples of a continuous normalizing flow.

Direction and sign. The velocity ``f`` carries a data point ``x`` at time ``t0 = t[0]`` to a
latent point ``z = z(t1)`` at ``t1 = t[1]``, where the density is the base density (a standard
normal by default). Along a trajectory of ``z' = f(t, z)`` the density ``p_t`` of the
transported distribution obeys the instantaneous change of variables (Chen et al. 2018,
"Neural Ordinary Differential Equations", theorem 1), which follows from the continuity
equation ``dp/dt + div(p f) = 0``:

    d/dt log p_t(z(t)) = -tr(df/dz (t, z(t))).

Integrating from ``t0`` to ``t1`` with ``p_t1 = base`` gives

    log p(x) = log p_t0(x) = log base(z(t1)) + integral_{t0}^{t1} tr(df/dz) dt,

which is what :func:`log_prob` returns: the flow solves ``delta_logp' = tr(df/dz)`` from zero
beside ``z`` (``odecore.cnf.dynamics``). For ``f = A z`` over ``[0, T]`` this is
``log N(e^{AT} x) + T tr(A)``. :func:`sample` runs the same flow backward, from base samples
at ``t1`` to data at ``t0``.

Probes. With ``trace="hutchinson"`` the probes are drawn once per solve, one per sample, and
reused at every evaluation of the dynamics and in the backward solve of the adjoint: the
solver then integrates one smooth ODE (probes redrawn per evaluation make every step's error
estimate noise, and adaptive steps collapse). They come from ``seed`` (an int), ``generator``
(a ``numpy.random.Generator``, or a ``torch.Generator`` on torch), ``key`` (a JAX PRNG key),
or are given as ``eps``: the same source gives the same probes.

Error control. The log-density and regulariser parts are integrals of the state: nothing in
the state depends on them, and their error does not grow. By default
(``error_control="state"``) the step size is controlled on ``z`` alone through a partitioned
norm (``odecore.control.norms.largest_part_rms``), as RNODE does with tolerances of 1e20 on
them; ``error_control="all"`` controls every part (the largest RMS of any part).
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np

from odecore import _validate
from odecore._config import resolve_backend
from odecore._dynamics import explain_call
from odecore.backend import differentiate
from odecore.backend.parameters import refuse_hidden_parameters
from odecore.backend.tree import leaves as tree_leaves
from odecore.cnf.checks import (
    batch_state,
    check_batch_axis,
    check_error_control,
    check_event_shape,
    check_noise,
    check_parameter_dtype,
    check_regularizers,
    check_samples_separate,
    check_trace,
    check_velocity,
    floating_dtypes,
    probes,
    random_source,
    time_value,
)
from odecore.cnf.divergence import row_dot
from odecore.cnf.dynamics import AugmentedDynamics
from odecore.control.norms import largest_part_rms
from odecore.ode.api import solve, vjp_odeint

_LOG_2PI = math.log(2.0 * math.pi)


class FlowSolution(NamedTuple):
    """What [`solve_log_prob`][odecore.cnf.solve_log_prob] returns.

    Attributes
    ----------
    log_prob : array of shape (B,)
        ``log p(x)`` per sample.
    z : array of shape (B, *event_shape)
        The latent points at ``t[1]``.
    regularizers : dict
        The requested regularisers, name -> (B,).
    solution : Solution
        The ODE solve's [`Solution`][odecore.Solution] (statistics and status).
    probes : array or None
        The Hutchinson probes it used; None for the exact trace.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJPs NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    ...     def vjp_of_vjp(self, t, z, M, u, w):
    ...         return np.zeros_like(z), u.T @ w
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> result = cnf.solve_log_prob(LinearFlow(), x, (0.0, 1.0), M)
    >>> result.log_prob.shape, result.solution.success
    ((2,), True)
    """

    log_prob: Any
    z: Any
    regularizers: dict
    solution: Any
    probes: Any


def standard_normal_log_prob(xp: Any, z: Any) -> Any:
    """``log N(z; 0, I)`` per sample: ``-(||z||^2 + D log 2 pi) / 2``.

    The default base density of [`log_prob`][odecore.cnf.log_prob].

    Parameters
    ----------
    xp : module
        The array namespace of ``z`` (``numpy``, or ``odecore.get_backend(name).xp``).
    z : array of shape (B, *event_shape)
        The points, samples along the first axis.

    Returns
    -------
    array of shape (B,)
        The log-density of each sample.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> log_p = cnf.standard_normal_log_prob(np, np.zeros((1, 2)))
    >>> bool(np.isclose(log_p[0], -np.log(2 * np.pi)))
    True
    """
    flat = xp.reshape(z, (z.shape[0], -1))
    return -0.5 * (row_dot(xp, flat, flat) + flat.shape[1] * _LOG_2PI)


def solve_log_prob(
    f: Callable[..., Any],
    x: Any,
    t: Any = (0.0, 1.0),
    params: Any = None,
    *,
    trace: Literal["exact", "hutchinson"] = "exact",
    noise: Literal["rademacher", "gaussian"] = "rademacher",
    eps: Any = None,
    seed: int | None = None,
    key: Any = None,
    generator: Any = None,
    base: Callable[[Any], Any] | None = None,
    regularizers: tuple[str, ...] = (),
    error_control: Literal["state", "all"] = "state",
    **solve_kwargs: Any,
) -> FlowSolution:
    """[`log_prob`][odecore.cnf.log_prob] with everything the solve reports.

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``, ``z`` of shape (B, *event_shape);
        samples must not interact (checked: a velocity that mixes them raises). ``t`` is a
        0-d array, or one time per sample (B,) with ``batch_axis=0``. On NumPy ``f`` brings
        ``vjp`` (and ``vjp_of_vjp`` for gradients, see
        [`vjp_log_prob`][odecore.cnf.vjp_log_prob]).
    x : array of shape (B, *event_shape)
        Data points, samples along the first axis.
    t : pair of times, default (0.0, 1.0)
        ``(t0, t1)``: data at ``t0``, base at ``t1``.
    params : pytree of arrays, optional
        The velocity's parameters, passed as its third argument; gradients reach them.
    trace : {"exact", "hutchinson"}, default "exact"
        Exact: D vector-Jacobian products per evaluation. Hutchinson: one, with one probe
        per sample, an unbiased estimate.
    noise : {"rademacher", "gaussian"}, default "rademacher"
        The probes' distribution. Rademacher has the smaller variance,
        ``2(||S||_F^2 - sum S_ii^2)`` against ``2 ||S||_F^2`` with ``S = (J + J^T)/2``.
    eps, seed, key, generator : optional
        The probes, given, or the source they are drawn from (at most one), as for
        [`log_prob`][odecore.cnf.log_prob].
    base : callable, optional
        ``base(z) -> (B,)`` log-density at ``t1``; the standard normal by default.
    regularizers : tuple of {"kinetic", "jacobian_frobenius"}, default ()
        RNODE's regularisers, as for [`log_prob`][odecore.cnf.log_prob].
    error_control : {"state", "all"}, default "state"
        Whether the step size is controlled on ``z`` alone or on every part.
    **solve_kwargs
        The arguments of [`odecore.solve`][odecore.solve].

    Returns
    -------
    FlowSolution
        ``log_prob``, the latent ``z``, the ``regularizers``, the ODE ``solution`` and the
        ``probes``.

    Raises
    ------
    TypeError
        ``f`` is not callable, ``x`` is not a real floating array, a time of ``t`` is not a
        real number, ``eps`` does not hold real numbers, ``regularizers`` is not a tuple of
        names, ``seed`` is not an int, ``key`` is an int or a generator, ``x``'s dtype is none
        of the parameters' on torch, or an argument of the solve has the wrong type.
    ValueError
        ``trace``, ``noise``, ``error_control`` or a regulariser's name is unknown, ``x`` has
        no samples along its first axis or (without ``batch_axis=0``) holds NaN or inf, the
        probes are missing for ``"hutchinson"`` (or given for ``"exact"``), not shaped like
        ``x`` or not finite, more than one source of probes is given, or an argument of the
        solve has a wrong value.
    SolveError
        The solve failed (with the default ``throw=True``).

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJPs NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    ...     def vjp_of_vjp(self, t, z, M, u, w):
    ...         return np.zeros_like(z), u.T @ w
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> result = cnf.solve_log_prob(LinearFlow(), x, (0.0, 1.0), M, regularizers=("kinetic",))
    >>> result.solution.success, result.z.shape, sorted(result.regularizers), result.probes
    (True, (2, 2), ['kinetic'], None)
    """
    settings = _settings(trace, noise, eps, seed, key, generator, regularizers, error_control)
    bk, aug, s0, t, flow, options, extra = _setup(f, x, t, params, settings, solve_kwargs)
    base_log_prob_of = _base(bk, base)
    solution = solve(flow.func, s0, t, params=flow.params, options=options, **extra, **solve_kwargs)
    z, delta_logp, regs = aug.split(bk.xp, solution.ys[-1])
    base_log_prob = base_log_prob_of(z)
    return FlowSolution(base_log_prob + delta_logp, z, regs, solution, aug.eps)


def log_prob(
    f: Callable[..., Any],
    x: Any,
    t: Any = (0.0, 1.0),
    params: Any = None,
    *,
    trace: Literal["exact", "hutchinson"] = "exact",
    noise: Literal["rademacher", "gaussian"] = "rademacher",
    eps: Any = None,
    seed: int | None = None,
    key: Any = None,
    generator: Any = None,
    base: Callable[[Any], Any] | None = None,
    regularizers: tuple[str, ...] = (),
    error_control: Literal["state", "all"] = "state",
    **solve_kwargs: Any,
) -> Any:
    """``log p(x)`` under the flow ``z' = f(t, z[, params])``, per sample.

    ``log p(x) = log base(z(t1)) + integral_{t0}^{t1} tr(df/dz) dt`` with ``z(t0) = x``: the
    instantaneous change of variables (Chen et al. 2018), integrated beside ``z``. With
    ``trace="hutchinson"`` the probes are drawn once per solve, one per sample, and reused at
    every evaluation and in the backward solve, so the solver integrates one smooth ODE. The
    log-density and regulariser parts are left out of the step-size control unless
    ``error_control="all"``.

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``, ``z`` of shape (B, *event_shape);
        samples must not interact (checked: a velocity that mixes them raises). ``t`` is a
        0-d array, or one time per sample (B,) with ``batch_axis=0``. On NumPy ``f`` brings
        ``vjp`` (and ``vjp_of_vjp`` for gradients, see
        [`vjp_log_prob`][odecore.cnf.vjp_log_prob]).
    x : array of shape (B, *event_shape)
        Data points, samples along the first axis.
    t : pair of times, default (0.0, 1.0)
        ``(t0, t1)``: data at ``t0``, base at ``t1``.
    params : pytree of arrays, optional
        The velocity's parameters, passed as its third argument; gradients reach them.
    trace : {"exact", "hutchinson"}, default "exact"
        Exact: D vector-Jacobian products per evaluation. Hutchinson: one, with one probe
        per sample, an unbiased estimate.
    noise : {"rademacher", "gaussian"}, default "rademacher"
        The probes' distribution. Rademacher has the smaller variance,
        ``2(||S||_F^2 - sum S_ii^2)`` against ``2 ||S||_F^2`` with ``S = (J + J^T)/2``.
    eps : array shaped like x, optional
        The Hutchinson probes, given.
    seed, key, generator : optional
        Where the probes are drawn from: an int seed, a JAX PRNG key, or a
        ``numpy.random.Generator`` (a ``torch.Generator`` on torch). At most one of ``eps``,
        ``seed``, ``key`` and ``generator``; the same source gives the same probes.
    base : callable, optional
        ``base(z) -> (B,)`` log-density at ``t1``; the standard normal by default.
    regularizers : tuple of {"kinetic", "jacobian_frobenius"}, default ()
        RNODE's regularisers, returned per sample after the log-density:
        ``integral ||f||^2 dt`` and ``integral ||eps^T df/dz||^2 dt`` (the exact
        ``||df/dz||_F^2`` with the exact trace), summed over the components of a sample,
        neither halved nor divided by D.
    error_control : {"state", "all"}, default "state"
        Whether the step size is controlled on ``z`` alone or on every part.
    **solve_kwargs
        The arguments of [`odecore.solve`][odecore.solve]: ``rtol``, ``atol``, ``method``,
        ``options``, ``adjoint``, ``backend``, ``batch_axis`` (None: one solve for the batch;
        0: each sample steps on its own), ...

    Returns
    -------
    log_prob : array of shape (B,)
        ``log p(x)`` per sample.
    regularizers : dict
        Only when regularisers are asked for (then a pair is returned): name -> (B,).

    Raises
    ------
    TypeError
        ``f`` is not callable, ``x`` is not a real floating array, a time of ``t`` is not a
        real number, ``eps`` does not hold real numbers, ``regularizers`` is not a tuple of
        names, ``seed`` is not an int, ``key`` is an int or a generator, ``x``'s dtype is none
        of the parameters' on torch, or an argument of the solve has the wrong type.
    ValueError
        ``trace``, ``noise``, ``error_control`` or a regulariser's name is unknown, ``x`` has
        no samples along its first axis or (without ``batch_axis=0``) holds NaN or inf, the
        probes are missing for ``"hutchinson"`` (or given for ``"exact"``), not shaped like
        ``x`` or not finite, more than one source of probes is given, or an argument of the
        solve has a wrong value.
    SolveError
        The solve failed (with the default ``throw=True``).

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJPs NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    ...     def vjp_of_vjp(self, t, z, M, u, w):
    ...         return np.zeros_like(z), u.T @ w
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> log_p = cnf.log_prob(LinearFlow(), x, (0.0, 1.0), M, rtol=1e-10, atol=1e-12)
    >>> import scipy.linalg
    >>> z = x @ scipy.linalg.expm(M).T  # log p(x) = log N(e^M x) + tr M
    >>> reference = -0.5 * (z**2).sum(1) - np.log(2 * np.pi) + np.trace(M)
    >>> bool(np.allclose(log_p, reference, atol=1e-8))
    True
    """
    result = solve_log_prob(
        f,
        x,
        t,
        params,
        trace=trace,
        noise=noise,
        eps=eps,
        seed=seed,
        key=key,
        generator=generator,
        base=base,
        regularizers=regularizers,
        error_control=error_control,
        **solve_kwargs,
    )
    return (result.log_prob, result.regularizers) if regularizers else result.log_prob


def vjp_log_prob(
    f: Callable[..., Any],
    x: Any,
    t: Any = (0.0, 1.0),
    params: Any = None,
    *,
    trace: Literal["exact", "hutchinson"] = "exact",
    noise: Literal["rademacher", "gaussian"] = "rademacher",
    eps: Any = None,
    seed: int | None = None,
    generator: Any = None,
    regularizers: tuple[str, ...] = (),
    error_control: Literal["state", "all"] = "state",
    adjoint: Any = "checkpoint",
    **solve_kwargs: Any,
) -> tuple[Any, dict[str, Any], Callable[..., Any]]:
    """[`log_prob`][odecore.cnf.log_prob] with a pullback, for backends without autodiff (NumPy).

    The base is the standard normal. ``f`` brings ``vjp(t, z, params, u) -> (u^T df/dz,
    u^T df/dparams)`` and ``vjp_of_vjp(t, z, params, u, w) -> (z_bar, params_bar)``, the
    gradient of ``sum(w * vjp(t, z, params, u)[0])`` with respect to ``z`` and ``params`` (the
    divergence's own gradient needs second derivatives of ``f``).

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``, ``z`` of shape (B, *event_shape);
        samples must not interact (checked: a velocity that mixes them raises). ``t`` is a
        0-d array, or one time per sample (B,) with ``batch_axis=0``. On NumPy ``f`` brings
        ``vjp`` (and ``vjp_of_vjp`` for gradients, see
        [`vjp_log_prob`][odecore.cnf.vjp_log_prob]).
    x : array of shape (B, *event_shape)
        Data points, samples along the first axis.
    t : pair of times, default (0.0, 1.0)
        ``(t0, t1)``: data at ``t0``, base at ``t1``.
    params : pytree of arrays, optional
        The velocity's parameters, passed as its third argument; gradients reach them.
    trace : {"exact", "hutchinson"}, default "exact"
        Exact: D vector-Jacobian products per evaluation. Hutchinson: one, with one probe
        per sample, an unbiased estimate.
    noise : {"rademacher", "gaussian"}, default "rademacher"
        The probes' distribution. Rademacher has the smaller variance,
        ``2(||S||_F^2 - sum S_ii^2)`` against ``2 ||S||_F^2`` with ``S = (J + J^T)/2``.
    eps : array shaped like x, optional
        The Hutchinson probes, given.
    seed, generator : optional
        An int seed or a ``numpy.random.Generator`` to draw the probes from (at most one of
        ``eps``, ``seed`` and ``generator``).
    regularizers : tuple of {"kinetic", "jacobian_frobenius"}, default ()
        RNODE's regularisers, as for [`log_prob`][odecore.cnf.log_prob].
    error_control : {"state", "all"}, default "state"
        Whether the step size is controlled on ``z`` alone or on every part.
    adjoint : {"checkpoint", "backsolve"}, default "checkpoint"
        As in [`odecore.vjp_odeint`][odecore.vjp_odeint].
    **solve_kwargs
        ``rtol``, ``atol``, ``method``, ``options``, ``batch_axis``, ``backend``, as for
        [`odecore.vjp_odeint`][odecore.vjp_odeint].

    Returns
    -------
    log_prob : array of shape (B,)
        ``log p(x)`` per sample.
    regularizers : dict
        name -> (B,), for the regularisers asked for.
    pullback : callable
        ``pullback(log_prob_bar, regularizers_bar=None) -> (x_bar, params_bar)``,
        ``regularizers_bar`` a dict like ``regularizers``. It raises ``ValueError`` for a
        ``log_prob_bar`` not of shape (B,) or a regulariser the solve did not compute.

    Raises
    ------
    TypeError
        ``f`` has no ``vjp`` or ``vjp_of_vjp`` method, ``regularizers`` is not a tuple of
        names, ``seed`` is not an int, or an argument of the solve has the wrong type.
    ValueError
        ``trace``, ``noise``, ``error_control`` or a regulariser's name is unknown, ``x`` is
        not a real floating array with samples along its first axis, the probes are missing
        for ``"hutchinson"`` (or given for ``"exact"``) or not shaped like ``x``, more than one
        source of probes is given, or an argument of the solve has a wrong value.
    SolveError
        The solve failed (with the default ``throw=True``).

    Examples
    --------
    ``d log p(x) / dx = -(e^M)^T e^M x`` for the linear flow:

    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJPs NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    ...     def vjp_of_vjp(self, t, z, M, u, w):
    ...         return np.zeros_like(z), u.T @ w
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> log_p, regs, pullback = cnf.vjp_log_prob(LinearFlow(), x, (0.0, 1.0), M,
    ...                                          rtol=1e-10, atol=1e-12)
    >>> x_bar, M_bar = pullback(np.ones(2))
    >>> import scipy.linalg
    >>> z = x @ scipy.linalg.expm(M).T  # log p(x) = log N(e^M x) + tr M
    >>> reference = -0.5 * (z**2).sum(1) - np.log(2 * np.pi) + np.trace(M)
    >>> bool(np.allclose(x_bar, -z @ scipy.linalg.expm(M), atol=1e-7))
    True
    """
    if "key" in solve_kwargs:
        raise TypeError(
            "key is a JAX random key, and vjp_log_prob serves NumPy and Numba: give the probes "
            "by seed= (an int), generator= (a numpy.random.Generator) or eps="
        )
    settings = _settings(trace, noise, eps, seed, None, generator, regularizers, error_control)
    bk, aug, s0, t, _, options, extra = _setup(f, x, t, params, settings, solve_kwargs)
    xp = bk.xp
    ys, pull = vjp_odeint(aug, s0, t, params, adjoint=adjoint, options=options, **solve_kwargs)
    z, delta_logp, regs = aug.split(xp, ys[-1])
    batch, size = s0.shape[0], aug.size

    def pullback(log_prob_bar, regularizers_bar=None):
        log_prob_bar = bk.asarray(log_prob_bar, dtype=s0.dtype)
        if tuple(log_prob_bar.shape) != (batch,):
            raise ValueError(
                f"log_prob_bar must have shape ({batch},), one value per sample, got "
                f"{tuple(log_prob_bar.shape)}"
            )
        regularizers_bar = dict(regularizers_bar or {})
        unknown = set(regularizers_bar) - set(aug.regularizers)
        if unknown:
            raise ValueError(
                f"regularizers_bar names {sorted(unknown)}, which this solve did not compute "
                f"(regularizers={aug.regularizers!r})"
            )
        # d log N(z)/dz = -z
        columns = [-log_prob_bar[:, None] * xp.reshape(z, (batch, size)), log_prob_bar[:, None]]
        for name in aug.regularizers:
            value = regularizers_bar.get(name)
            value = xp.zeros((batch,), dtype=s0.dtype) if value is None else bk.asarray(value)
            columns.append(xp.reshape(value, (batch, 1)))
        last = xp.concat(columns, axis=1)
        ys_bar = xp.stack([xp.zeros_like(last)] * (ys.shape[0] - 1) + [last])
        s0_bar, params_bar, _ = pull(ys_bar)
        return xp.reshape(s0_bar[:, :size], (batch, *aug.event_shape)), params_bar

    return standard_normal_log_prob(xp, z) + delta_logp, regs, pullback


def sample(
    f: Callable[..., Any],
    n: int,
    event_shape: int | tuple[int, ...],
    t: Any = (0.0, 1.0),
    params: Any = None,
    *,
    z: Any = None,
    seed: int | None = None,
    key: Any = None,
    generator: Any = None,
    dtype: Any = None,
    **solve_kwargs: Any,
) -> Any:
    """``n`` samples of the flow's data distribution.

    Standard normal draws at ``t[1]`` (or the given base points ``z``) are carried back to
    ``t[0]`` by ``z' = f(t, z[, params])``.

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``.
    n : int
        How many samples.
    event_shape : int or tuple of int
        One sample's shape.
    t : pair of times, default (0.0, 1.0)
        ``(t0, t1)``: data at ``t0``, base at ``t1``.
    params : pytree of arrays, optional
        The velocity's parameters.
    z : array of shape (n, *event_shape), optional
        The base points, instead of random draws.
    seed, key, generator : optional
        Where the draws come from: an int seed, a JAX PRNG key, or a ``numpy.random.Generator``
        (a ``torch.Generator`` on torch); at most one of ``z``, ``seed``, ``key``,
        ``generator``.
    dtype : optional
        The draws' dtype; by default that of ``z``, else of the parameters, else float64.
    **solve_kwargs
        The arguments of [`odecore.solve`][odecore.solve]; the backend follows ``z``,
        ``params`` or the parameters of an ``nn.Module`` ``f``, else name it
        (``backend="torch"``).

    Returns
    -------
    array of shape (n, *event_shape)
        The samples at ``t[0]``.

    Raises
    ------
    TypeError
        ``f`` is not callable, ``z`` is not a real floating array, ``dtype`` is not a real
        floating dtype, ``seed`` is not an int, ``key`` is an int or a generator, the draws'
        dtype (``z``'s or ``dtype``) is none of the parameters' on torch, or an argument of the
        solve has the wrong type.
    ValueError
        ``n`` is not a positive int, ``event_shape`` is not a positive int or tuple of them,
        ``z`` is not of shape (n, *event_shape) or (without ``batch_axis=0``) holds NaN or
        inf, ``batch_axis`` is not None or 0, more than one source of draws is given, or an
        argument of the solve has a wrong value.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJPs NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    ...     def vjp_of_vjp(self, t, z, M, u, w):
    ...         return np.zeros_like(z), u.T @ w
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> cnf.sample(LinearFlow(), 3, 2, params=M, seed=0).shape
    (3, 2)
    >>> base = np.array([[1.0, 0.0]])
    >>> data = cnf.sample(LinearFlow(), 1, 2, params=M, z=base, rtol=1e-10, atol=1e-12)
    >>> import scipy.linalg
    >>> bool(np.allclose(data, base @ scipy.linalg.expm(-M).T))  # the flow run backward
    True
    """
    check_velocity(f)
    event_shape = check_event_shape(event_shape)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, the number of samples, got {n!r}")
    batch_axis = solve_kwargs.get("batch_axis")
    check_batch_axis(batch_axis)
    name, source = random_source("base points", z=z, seed=seed, key=key, generator=generator)
    bk = _flow_backend(
        solve_kwargs, {"z": z, "t": t, "params": params, "f's parameters": _own_arrays(f)}
    )
    leaves = differentiate.param_leaves(bk, f, params)
    if name != "z":
        if dtype is None:
            dtype = next(iter(floating_dtypes(bk, leaves)), bk.xp.float64)
        dtype = _draw_dtype(bk, dtype)
        check_parameter_dtype(
            bk, dtype, leaves, "the draws' dtype (dtype=)", "Pass dtype={params} or leave it out"
        )
        z = bk.random_normal(_random_generator(source), (int(n), *event_shape), dtype, None)
    else:
        z = batch_state(bk, z, "z", finite=batch_axis is None, dtype=dtype)
        if tuple(z.shape) != (int(n), *event_shape):
            raise ValueError(
                f"z must have shape (n, *event_shape) = {(int(n), *event_shape)}, got "
                f"{tuple(z.shape)}"
            )
        check_parameter_dtype(
            bk, z.dtype, leaves, "z's dtype", "Give z as {params} (z.to({params}))"
        )
    t0, t1 = _time_pair(bk, t)
    reverse = bk.xp.stack([t1, t0])
    # The solve would call f its func(t, y); the flow's documentation calls it f(t, x).
    explain_call(f, params is not None, None, name="f", state="x")
    return solve(f, z, reverse, params=params, **solve_kwargs).ys[-1]


class _Settings(NamedTuple):
    """A log-density solve's own arguments, checked: the trace, the probes' distribution,
    the probes given (``eps``) or where they are drawn from (``source``: a seed, key or
    generator, or None for a fresh NumPy generator), the regularisers and the error control."""

    trace: str
    noise: str
    eps: Any
    source: Any
    regularizers: tuple
    error_control: str


def _settings(trace, noise, eps, seed, key, generator, regularizers, error_control) -> _Settings:
    check_trace(trace, "trace")
    check_noise(noise)
    check_error_control(error_control)
    regularizers = check_regularizers(regularizers)
    name, source = random_source("probes", eps=eps, seed=seed, key=key, generator=generator)
    if trace == "exact" and name is not None:
        raise ValueError(f"{name} is for trace='hutchinson'; the exact trace draws no probes")
    if trace == "exact" and noise != "rademacher":
        # The default is no choice of the caller's; another noise asked for would be ignored.
        raise ValueError(
            f"noise={noise!r} is for trace='hutchinson'; the exact trace draws no probes"
        )
    if name == "eps" and noise != "rademacher":
        # Given probes are used as they are: the noise asked for would draw nothing.
        raise ValueError(
            f"noise={noise!r} chooses how probes are drawn, and eps gives them: draw eps "
            f"from that distribution yourself, or pass seed=, key= or generator= instead of eps"
        )
    source = None if name == "eps" else source
    return _Settings(trace, noise, eps, source, regularizers, error_control)


def _setup(f, x, t, params, settings: _Settings, solve_kwargs):
    """The checked inputs of a log-density solve: ``(backend, augmented dynamics, initial
    state, times, options, extra solve arguments)``; ``solve_kwargs`` names the backend the
    solve runs on."""
    check_velocity(f)
    batch_axis = solve_kwargs.get("batch_axis")
    check_batch_axis(batch_axis)
    bk = _flow_backend(solve_kwargs, {"x": x, "t": t, "params": params})
    xp = bk.xp
    # A batch's samples are left to the solve's statuses, as a batched ODE's are.
    x = batch_state(bk, x, "x", finite=batch_axis is None)
    leaves = differentiate.param_leaves(bk, f, params)
    check_parameter_dtype(bk, x.dtype, leaves, "x's dtype", "Give x as {params} (x.to({params}))")
    t = _time_array(bk, t)
    check_samples_separate(bk, f, t, x, params, per_sample_time=batch_axis == 0)
    eps = _probes(bk, settings, x)
    wanted = differentiate.requires_grad(bk, {"x": x, "t": t, "params": params, "f": leaves})
    aug = AugmentedDynamics(f, x.shape[1:], settings.trace, eps, settings.regularizers, bk, wanted)
    s0 = aug.initial_state(xp, x)
    options = dict(_options(solve_kwargs.pop("options", None)))
    kept = None
    if _eager_on_tracing_backend(bk, x, t, params, eps):
        kept = _kept_flow(bk, f, aug, x.shape[0], batch_axis, settings.error_control)
    if kept is None:
        flow = _Solved(aug, params)
        norm = _norm(bk, aug, x.shape[0], batch_axis, settings.error_control)
    else:
        flow, norm = _Solved(kept[0], (params, eps)), kept[1]
    if settings.error_control == "all" and "norm" in options:
        # The default is no choice of the caller's; "all" asked for would be ignored.
        raise ValueError(
            "error_control='all' builds the solve's error norm, and options['norm'] gives "
            "one: leave error_control out, or measure every part in your norm"
        )
    if _adaptive(solve_kwargs.get("method"), options):
        # A fixed-step method has no error norm, and refuses the option.
        options.setdefault("norm", norm)
    elif settings.error_control == "all":
        raise ValueError(
            f"error_control='all' chooses what the step-size control measures, and "
            f"method={solve_kwargs.get('method')!r} takes fixed steps: leave error_control "
            f"out, or use an adaptive method"
        )
    extra = _parameter_arguments(bk, f, params, t, x, solve_kwargs)
    return bk, aug, s0, t, flow, options, extra


def _adaptive(method, options) -> bool:
    """Whether ``method`` with ``options`` steps adaptively; an unknown method is left to the
    solve, whose error names the valid ones."""
    try:
        return _validate.tableau(method, options).adaptive
    except ValueError:
        return True


class _Solved(NamedTuple):
    """What the solve integrates: the dynamics and the parameters it is called with."""

    func: Any
    params: Any


def _eager_on_tracing_backend(bk, x, t, params, eps) -> bool:
    """Whether the solve is an eager call on a tracing backend (JAX outside ``jit``), which
    runs through a compiled program kept per dynamics object (``Tracing.compiled_solve``)."""
    if bk.tracing is None:
        return False
    return not any(bk.is_traced(leaf) for _, leaf in tree_leaves((x, t, params, eps)))


class _ProbesAsArgument:
    """A flow's augmented dynamics called as ``g(t, s, (params, eps))``: the probes are an
    argument, not a constant, so that one object serves every eager call of a velocity and
    configuration, and the compiled solve kept for it is reused. It holds the velocity
    weakly: the cache of these objects must not keep a velocity alive."""

    def __init__(self, f, template: AugmentedDynamics):
        self.velocity = weakref.ref(f)
        self.template = template

    def __call__(self, t, s, params):
        user_params, eps = params
        aug = self.template
        return AugmentedDynamics(
            self.velocity(),
            aug.event_shape,
            aug.trace,
            eps,
            aug.regularizers,
            aug.backend,
            aug.differentiable,
        )(t, s, user_params)


# velocity -> {configuration: (dynamics, norm)}, for eager calls on a tracing backend.
_KEPT_FLOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept_flow(bk, f, aug: AugmentedDynamics, batch: int, batch_axis, error_control: str):
    """``(dynamics, norm)`` kept for ``f`` and the configuration of ``aug``: the compiled
    solve of an eager call on a tracing backend is kept per dynamics object and static
    options, the norm among them. None for a velocity that cannot be referenced weakly."""
    try:
        kept = _KEPT_FLOWS.setdefault(f, {})
    except TypeError:
        return None
    key = (aug.event_shape, aug.trace, aug.regularizers, aug.differentiable)
    key += (bk.name, batch, batch_axis, error_control)
    if key not in kept:
        template = AugmentedDynamics(
            None, aug.event_shape, aug.trace, None, aug.regularizers, bk, aug.differentiable
        )
        dynamics = _ProbesAsArgument(f, template)
        kept[key] = (dynamics, _norm(bk, aug, batch, batch_axis, error_control))
    return kept[key]


def _own_arrays(f) -> list:
    """The first array a velocity holds as its own (a torch ``nn.Module``'s first parameter
    or buffer), or none: ``sample`` draws its base points on the backend the inputs name,
    and a module with nothing else given would be handed NumPy draws, failing inside its
    first layer."""
    for holder in ("parameters", "buffers"):
        method = getattr(f, holder, None)
        if callable(method):
            first = next(iter(method()), None)
            if first is not None:
                return [first]
    return []


def _flow_backend(solve_kwargs: dict, inputs: dict):
    """The backend a flow's solve runs on, set in ``solve_kwargs`` for the solve: the one
    asked for or inferred, or the backend whose generic loop serves it
    (``Backend.generic_backend``) where that one compiles whole solves from kernel-form
    dynamics, which the augmented dynamics, calling the velocity's VJPs from Python at
    every evaluation, are not."""
    bk = resolve_backend(solve_kwargs.get("backend"), inputs).generic_backend
    solve_kwargs["backend"] = bk
    return bk


def _options(options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {options!r}")
    return options


def _norm(bk, aug: AugmentedDynamics, batch: int, batch_axis, error_control: str):
    """The partitioned error norm of the augmented state: the parts ``error_control``
    names, each its own RMS, the largest wins. One solve for the whole batch sees one
    (B, D + 1 + R) state; its parts then span every sample, so the state is transposed to
    lay each part's values end to end. Step sizes are constants to autodiff, so the norm
    records no gradient."""
    xp = bk.xp
    parts = aug.parts if error_control == "all" else aug.parts[:1]
    if batch_axis == 0:
        per_sample = largest_part_rms(xp, parts)
        return lambda s: per_sample(bk.stop_gradient(s))
    joint = largest_part_rms(xp, [size * batch for size in parts])
    return lambda s: joint(xp.reshape(xp.matrix_transpose(bk.stop_gradient(s)), (-1,)))


def _parameter_arguments(bk, f, params, t, x, solve_kwargs) -> dict:
    """``adjoint_params`` where ``f`` owns parameters that ``params`` does not hold (a torch
    ``nn.Module``): the augmented dynamics wrap ``f`` and would hide them. The check that
    ``f`` uses no other array wanting a gradient runs on ``f`` itself, in every mode: the
    flow records its divergence for autodiff only where ``x``, ``t`` or these parameters
    want a gradient, so a weight a closure captures got none, even with adjoint='direct'."""
    if bk.autodiff is None or "adjoint_params" in solve_kwargs:
        return {}
    leaves = differentiate.param_leaves(bk, f, params)
    held = differentiate.param_leaves(bk, None, params)
    try:
        refuse_hidden_parameters(
            bk,
            f,
            params,
            leaves,
            t,
            x,
            solve_kwargs.get("batch_axis"),
            called_as="f(t, z, params)",
            why="the flow differentiates f with respect to z and its parameters alone",
        )
    except TypeError as error:  # the probe may be f's first call
        explain_call(f, params is not None, error, name="f", state="x")
        raise
    return {} if len(leaves) == len(held) else {"adjoint_params": leaves}


def _time_array(bk, t):
    t0, t1 = _time_pair(bk, t)
    return bk.xp.stack([t0, t1])


def _time_pair(bk, t):
    if isinstance(t, (tuple, list)):
        if len(t) != 2:
            raise ValueError(f"t must be a pair (t0, t1), got {len(t)} times")
        return tuple(_given_time(bk, v, f"t[{i}]") for i, v in enumerate(t))
    t = _given_time(bk, t, "t")
    if tuple(t.shape) != (2,):
        raise ValueError(f"t must be a pair (t0, t1), got an array of shape {tuple(t.shape)}")
    return t[0], t[1]


def _given_time(bk, value, name):
    """A time of ``t`` as the backend's array: as it was, or read at the time dtype."""
    if bk.owns(value):
        return value
    return bk.xp.astype(time_value(bk, value, name), bk.time_dtype)


def _draw_dtype(bk, dtype):
    """``dtype`` as the backend's real floating dtype, for the draws of ``sample``."""
    try:
        resolved = bk.xp.empty((0,), dtype=dtype).dtype
    except (TypeError, ValueError, RuntimeError, AttributeError):
        resolved = None
    if resolved is None or _validate.dtype_kind(bk.xp, resolved) != "real floating":
        raise TypeError(
            f"dtype must be a real floating dtype of {bk.name} (float64 or float32, say), got "
            f"{dtype!r}"
        )
    return resolved


def _probes(bk, settings: _Settings, x):
    """The Hutchinson probes, one per sample, drawn once here (None for the exact trace)."""
    if settings.trace == "exact":
        return None
    if settings.eps is not None:
        return probes(bk, settings.eps, x)
    source = _random_generator(settings.source)
    draws = bk.random_normal(source, tuple(x.shape), x.dtype, x)
    if settings.noise == "gaussian":
        return draws
    xp = bk.xp
    return xp.where(draws < 0, xp.asarray(-1.0, dtype=x.dtype), xp.asarray(1.0, dtype=x.dtype))


def _random_generator(source):
    """What ``Backend.random_normal`` draws from: a key or generator as given, a NumPy
    generator for a seed or for none."""
    if source is None or isinstance(source, numbers.Integral):
        return np.random.default_rng(source)
    return source


def _base(bk, base):
    if base is None:
        return lambda z: standard_normal_log_prob(bk.xp, z)
    if not callable(base):
        raise TypeError(f"base must be a callable base(z) -> log-density per sample, got {base!r}")

    def checked(z):
        out = base(z)
        # One value per sample: a (B, D) density would broadcast against the (B,) change
        # of log-density into an error about tensor sizes, or, at B = D, into a (B, B)
        # "log-density".
        shape = tuple(out.shape) if bk.owns(out) else None
        if shape != (z.shape[0],):
            got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
            raise ValueError(
                f"base must return one log-density per sample, a {bk.name} array of shape "
                f"({z.shape[0]},), for z of shape {tuple(z.shape)}; it returned {got}: sum "
                f"over the event axes"
            )
        return out

    return checked
