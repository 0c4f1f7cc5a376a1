"""The augmented dynamics of a continuous normalizing flow: the state, its log-density change
and the RNODE regularisers, as one ODE.

Each sample's augmented state is one flat row ``[z (D values), delta_logp, r_1, ...]``:

- ``z' = f(t, z)``
- ``delta_logp' = tr(df/dz)`` (exact or Hutchinson, ``odecore.cnf.divergence``)
- ``kinetic' = ||f(t, z)||^2``: RNODE's kinetic energy (Finlay et al. 2020), summed over the
  ``D`` components of one sample, not averaged, and not halved;
- ``jacobian_frobenius' = ||eps^T df/dz||^2``: RNODE's Jacobian regulariser, an unbiased
  estimate of ``||df/dz||_F^2`` (the exact value with the exact trace), again per sample and
  not divided by ``D``.

The extra parts start at zero, so at the end of a solve they hold the integrals over time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from odecore._config import resolve_backend
from odecore._dynamics import explain_call
from odecore.backend import differentiate, infer_backend
from odecore.backend.tree import leaves as tree_leaves
from odecore.backend.tree import unflatten_like
from odecore.cnf.checks import (
    check_event_shape,
    check_probes_for_trace,
    check_regularizer_range,
    check_regularizers,
    check_trace,
)
from odecore.cnf.divergence import basis, own_method, row_dot, velocity_and_trace

_SECOND_ORDER_SIGNATURE = (
    "vjp_of_vjp(t, z, params, u, w) -> (z_bar, params_bar), the gradient of "
    "sum(w * vjp(t, z, params, u)[0]) with respect to z and params (second derivatives of f)"
)


class AugmentedDynamics:
    """``g(t, s[, params])`` for the augmented state ``s`` of shape (B, D + 1 + R).

    Built by [`augmented_dynamics`][odecore.cnf.augmented_dynamics], which checks its
    arguments; solve it with any of odecore's solvers. On a backend without autodiff (NumPy) its
    own ``vjp`` gives gradients, from the velocity's ``vjp`` and its second-order
    ``vjp_of_vjp``.

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``.
    event_shape : tuple of int
        One sample's shape.
    trace : {"exact", "hutchinson"}
        How the divergence is computed.
    eps : array or None
        The Hutchinson probes, one per sample.
    regularizers : tuple of str
        The regularisers' names, in the order of their columns.
    backend : Backend, optional
        The backend; by default the one of the first state it is called with.
    differentiable : bool, default True
        False when nothing the solve depends on wants a gradient: an eager framework then
        records no graph of the divergence.

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJP NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> flow = cnf.augmented_dynamics(LinearFlow(), 2, regularizers=("kinetic",))
    >>> isinstance(flow, cnf.AugmentedDynamics), flow.parts
    (True, (2, 1, 1))
    >>> rates = flow(0.0, flow.initial_state(np, x), M)
    >>> bool(np.allclose(rates[:, 3], np.sum((x @ M.T) ** 2, axis=1)))  # the kinetic rate
    True
    """

    def __init__(
        self, f, event_shape, trace: str, eps, regularizers, backend=None, differentiable=True
    ):
        self.f = f
        # False when nothing the solve depends on wants a gradient: an eager framework then
        # records no graph of the divergence.
        self.differentiable = differentiable
        self.backend = backend
        self.event_shape = tuple(int(n) for n in event_shape)
        self.size = math.prod(self.event_shape)
        self.trace = trace
        self.eps = eps
        self.regularizers = regularizers

    @property
    def parts(self) -> tuple[int, ...]:
        """The sizes of the state's parts, in order: ``z``, ``delta_logp``, each regulariser."""
        return (self.size, 1, *(1 for _ in self.regularizers))

    def initial_state(self, xp, x):
        """``[x, 0, 0...]`` per sample, for data ``x`` of shape (B, *event_shape). A
        TypeError for ``jacobian_frobenius`` with float16 data, whose range its rate
        outgrows."""
        check_regularizer_range(xp, x.dtype, self.regularizers, self.size)
        batch = x.shape[0]
        zeros = xp.zeros((batch, 1 + len(self.regularizers)), dtype=x.dtype)
        return xp.concat([xp.reshape(x, (batch, self.size)), zeros], axis=1)

    def split(self, xp, s):
        """``(z, delta_logp, {regulariser: value})`` of an augmented state."""
        batch = s.shape[0]
        z = xp.reshape(s[:, : self.size], (batch, *self.event_shape))
        extra = {name: s[:, self.size + 1 + i] for i, name in enumerate(self.regularizers)}
        return z, s[:, self.size], extra

    def _backend(self, s):
        if self.backend is None:
            self.backend = infer_backend(s)
        return self.backend

    def __call__(self, t, s, params=None):
        bk = self._backend(s)
        xp = bk.xp
        batch = s.shape[0]
        z = xp.reshape(s[:, : self.size], (batch, *self.event_shape))
        try:
            value, div, frobenius = velocity_and_trace(
                bk, self.f, t, z, params, self.trace, self.eps, self.differentiable
            )
        except TypeError as error:
            explain_call(self.f, params is not None, error, name="f", state="x")
            raise
        flat = xp.reshape(value, (batch, self.size))
        columns = [flat, div[:, None]]
        for name in self.regularizers:
            rate = row_dot(xp, flat, flat) if name == "kinetic" else frobenius
            columns.append(rate[:, None])
        return xp.concat(columns, axis=1)

    def vjp(self, t, s, params, cotangent):
        """``(s_bar, params_bar)`` from the velocity's own ``vjp`` and ``vjp_of_vjp``
        (backends without autodiff).

        With ``c = [z_bar, l_bar, k_bar, j_bar]`` the cotangent of ``g``, the gradient of
        ``z_bar.f + l_bar div + k_bar ||f||^2 + j_bar ||eps^T J||^2`` is one first-order VJP
        with ``z_bar + 2 k_bar f`` and, since ``div = <eps^T J, eps>`` and ``||eps^T J||^2 =
        <eps^T J, eps^T J>``, one second-order VJP per probe ``eps`` (or basis vector) with
        ``w = l_bar eps + 2 j_bar (eps^T J)``."""
        bk = self._backend(s)
        xp = bk.xp
        f = self.f
        first = own_method(bk, f, "vjp", "vjp(t, z, params, u) -> (u^T df/dz, u^T df/dparams)")
        second = own_method(bk, f, "vjp_of_vjp", _SECOND_ORDER_SIGNATURE)
        batch = s.shape[0]
        z = xp.reshape(s[:, : self.size], (batch, *self.event_shape))
        per_sample = (batch,) + (1,) * len(self.event_shape)
        cot = {"l": xp.reshape(cotangent[:, self.size], per_sample)}
        for i, name in enumerate(self.regularizers):
            cot[name] = xp.reshape(cotangent[:, self.size + 1 + i], per_sample)
        u = xp.reshape(cotangent[:, : self.size], z.shape)
        if "kinetic" in cot:
            u = u + 2.0 * cot["kinetic"] * differentiate.call(f, t, z, params)
        z_bar, params_bar = first(t, z, params, u)
        grads = _Sum(z_bar, params_bar)
        probes = [self.eps] if self.trace == "hutchinson" else list(basis(xp, z))
        for probe in probes:
            w = cot["l"] * probe
            if "jacobian_frobenius" in cot:
                w = w + 2.0 * cot["jacobian_frobenius"] * first(t, z, params, probe)[0]
            grads.add(*second(t, z, params, probe, w))
        s_bar = xp.concat(
            [
                xp.reshape(grads.z_bar, (batch, self.size)),
                xp.zeros((batch, 1 + len(self.regularizers)), dtype=s.dtype),
            ],
            axis=1,
        )
        return s_bar, grads.params_bar(params)


class _Sum:
    """A running sum of ``(z_bar, params_bar)`` pairs, ``params_bar`` shaped like params."""

    def __init__(self, z_bar, params_bar):
        self.z_bar = z_bar
        self.leaves = _leaves(params_bar)

    def add(self, z_bar, params_bar):
        self.z_bar = self.z_bar + z_bar
        self.leaves = [a + b for a, b in zip(self.leaves, _leaves(params_bar), strict=True)]

    def params_bar(self, params):
        return unflatten_like(params, self.leaves)


def _leaves(tree):
    return [] if tree is None else [leaf for _, leaf in tree_leaves(tree)]


def augmented_dynamics(
    f: Callable[..., Any],
    event_shape: int | tuple[int, ...],
    trace: Literal["exact", "hutchinson"] = "exact",
    eps: Any = None,
    regularizers: tuple[str, ...] = (),
    *,
    backend: str | None = None,
) -> AugmentedDynamics:
    """The augmented dynamics of the flow ``z' = f(t, z[, params])``, to compose a solve.

    The building block of [`log_prob`][odecore.cnf.log_prob]. The state is ``(B, D + 1 + R)``:
    per sample the flattened ``z``, ``delta_logp`` (whose rate is ``tr(df/dz)``) and one column
    per regulariser in ``regularizers``, in the order given. Solve it with any of odecore's
    solvers; ``initial_state`` and ``split`` convert to and from the augmented state, and
    ``parts`` gives the sizes for a partitioned norm
    (``odecore.control.norms.largest_part_rms``).

    Parameters
    ----------
    f : callable
        The velocity ``f(t, z)`` or ``f(t, z, params)``, as for
        [`divergence`][odecore.cnf.divergence.divergence].
    event_shape : int or tuple of int
        One sample's shape.
    trace : {"exact", "hutchinson"}, default "exact"
        How the divergence is computed.
    eps : array of shape (B, *event_shape), optional
        The Hutchinson probes, one per sample, used at every evaluation.
    regularizers : tuple of {"kinetic", "jacobian_frobenius"}, default ()
        RNODE's regularisers: the rates ``||f||^2`` and ``||eps^T df/dz||^2`` (the exact
        ``||df/dz||_F^2`` with the exact trace).
    backend : str, optional
        The backend; by default the one of the first state it is called with.

    Returns
    -------
    AugmentedDynamics
        ``g(t, s[, params])``, with ``vjp`` on backends without autodiff.

    Raises
    ------
    TypeError
        ``regularizers`` is not a tuple of names.
    ValueError
        ``trace`` or a regulariser's name is unknown or repeated, ``event_shape`` is not a
        positive int or tuple of them, or the probes are missing for ``"hutchinson"`` (or given
        for ``"exact"``).

    Examples
    --------
    >>> import numpy as np
    >>> from odecore import cnf
    >>> class LinearFlow:  # f = M z, with the VJP NumPy needs
    ...     def __call__(self, t, z, M):
    ...         return z @ M.T
    ...     def vjp(self, t, z, M, u):
    ...         return u @ M, u.T @ z
    >>> M = np.array([[-0.5, 0.3], [-0.2, 0.1]])
    >>> x = np.array([[0.3, -1.0], [1.2, 0.4]])
    >>> import odecore
    >>> flow = cnf.augmented_dynamics(LinearFlow(), 2)
    >>> s0 = flow.initial_state(np, x)
    >>> s0.shape, flow.parts
    ((2, 3), (2, 1))
    >>> ys = odecore.odeint(flow, s0, np.array([0.0, 1.0]), params=M, rtol=1e-10, atol=1e-12)
    >>> z, delta_logp, regularizers = flow.split(np, ys[-1])
    >>> np.round(delta_logp, 8).tolist()  # the integral of tr M over [0, 1]
    [-0.4, -0.4]
    """
    check_trace(trace, "trace")
    regularizers = check_regularizers(regularizers)
    event_shape = check_event_shape(event_shape)
    check_probes_for_trace(trace, eps, "trace")
    bk = None if backend is None else resolve_backend(backend)
    return AugmentedDynamics(f, event_shape, trace, eps, regularizers, bk)
