"""The user's ``func`` as the loop sees it: internal layout, internal (forward) time, and a VJP.

The loop works on a (B, N) state (or the user's own shape for a single eager sample, see
``odecore.backend.layout.Layout``) and on time that always increases. :class:`Dynamics` converts
both ways around every call (for a 16-bit state also between its dtype and the loop's
float32, so that ``func`` and its VJPs see only the user's dtype), checks the first output,
and gives the vector-Jacobian products the gradient modes need through the backend
(``Backend.dynamics_vjp``): the framework's autodiff for torch and JAX, the dynamics' own
``vjp`` method for NumPy.
"""

from __future__ import annotations

import copy
import functools
import numbers

from odecore import _validate
from odecore._ops import float_limit
from odecore.backend import differentiate
from odecore.backend.signature import explain_signature
from odecore.backend.structured import unwrap
from odecore.backend.tree import leaves as tree_leaves
from odecore.ode.perturb import JumpSides, accepts_perturb


class Dynamics:
    """``fn(t, y) -> dy/dt`` and ``vjp(t, y, cot) -> (cot_y, cot_params)`` in loop terms.

    ``sign`` is -1 when the user's times decrease: the loop then solves ``s = -t`` with
    ``dy/ds = -f(-s, y)``.
    """

    def __init__(
        self, bk, ops, func, params, layout, sign: float, leaves=None, jumps=None, checked=True
    ):
        self.backend = bk
        self.ops = ops
        # What the user passed (a backend that compiles whole solves compiles this one), and
        # how the generic loop calls it (Backend.generic_form).
        self.user_func = func
        self.func = bk.generic_form(func, params, layout.batched)
        self.params = params
        self.layout = layout
        self.sign = sign
        leaves = differentiate.param_leaves(bk, func, params) if leaves is None else list(leaves)
        if bk.autodiff is None:
            # A Python number among the parameters (params=0.7) gets its gradient as a 0-d
            # array, as JAX's grad gives one: the backward sizes and zeroes each leaf's
            # cotangent by its shape and dtype, which a number lacks. func and its vjp still
            # receive params as given.
            leaves = [
                bk.asarray(float(x))
                if isinstance(x, numbers.Real) and not hasattr(x, "shape")
                else x
                for x in leaves
            ]
        self.leaves = leaves
        self._vjp_checked = False
        # Whether the first call checks for a func that writes into y or indexes past an
        # array's end: the user's func, not odecore's own (a backsolve's adjoint system,
        # traced anew for every interval between output times).
        self._checks_func = checked
        # A func with a ``perturb`` keyword is told which side of a jump it is evaluated on
        # (eager backends: the side is read off concrete times).
        self.jump_sides = None
        if jumps is not None and bk.eager and accepts_perturb(unwrap(func)):
            limit = functools.partial(float_limit, bk.xp, ops.limit_dtype)
            self.jump_sides = JumpSides(jumps, sign, limit)

    def with_constant_params(self):
        """These dynamics with ``params`` held constant: their VJPs give no parameter
        cotangents and do none of the parameters' work (for a gradient that wants none)."""
        held = copy.copy(self)
        held.leaves = []
        return held

    def _bound(self, t):
        """``func``, with ``perturb`` bound where it takes one; ``t`` is internal time."""
        if self.jump_sides is None:
            return self.func
        return functools.partial(self.func, perturb=self.jump_sides.at(self.backend.xp, t))

    def flip(self, x):
        """``x`` times the direction. ``sign`` is a Python float when the times are known, a
        0-d array when they are traced (JAX under jit), which costs one multiply."""
        if isinstance(self.sign, float):
            return -x if self.sign < 0 else x
        return x * self.backend.xp.astype(self.sign, x.dtype)

    def user_time(self, t):
        return self.ops.user_time(self.flip(t), self.layout.batched)

    def _call_user(self, t, y):
        ty = self.user_time(t)
        yu = self.layout.to_user(self.backend.xp, y)
        func = self._bound(t)
        try:
            return func(ty, yu) if self.params is None else func(ty, yu, self.params)
        except TypeError as error:
            self._explain_call(error)
            raise

    def __call__(self, t, y):
        out = self.layout.from_user(self.backend.xp, self._call_user(t, y))
        return self.flip(out)

    def at_user_time(self, t_user, y_user):
        """``func(t, y)`` with the user's time, a 0-d array, and state, in the user's terms.
        Unlike the loop's calls, whose times are control values (Python floats for a
        single sample), ``t_user`` reaches ``func`` as an array, so a gradient it carries
        goes through ``func``'s dependence on time."""
        xp, lay = self.backend.xp, self.layout
        held = self.backend.stop_gradient(xp.astype(t_user, self.backend.time_dtype))
        t_loop = held * self.sign
        t_loop = float(t_loop) if self.ops.scalar else self.ops.full(lay.batch, 0.0) + t_loop
        t = xp.astype(t_user, self.backend.time_dtype)
        if lay.batched:
            t = self.ops.full(lay.batch, 0.0) + t
        t = xp.astype(t, lay.user_dtype)
        func = self._bound(t_loop)
        return func(t, y_user) if self.params is None else func(t, y_user, self.params)

    def fast_path(self):
        """``self.__call__`` without the layout and sign bookkeeping, when there is none to
        do: a forward solve of one sample kept in its own shape. The loop calls this for
        every stage, so the saved Python calls are a measurable part of a small step."""
        # A traced sign is only ever flat.
        if self.layout.flat or self.layout.casts or self.sign < 0 or self.jump_sides:
            return self
        func, params, ops = self.func, self.params, self.ops
        if ops.scalar:
            # ScalarOps.user_time, inlined: one Python call less per evaluation.
            scalar = ops.make_user_time
            if params is None:
                return lambda t, y: func(scalar(t), y)
            return lambda t, y: func(scalar(t), y, params)
        user_time = ops.user_time
        if params is None:
            return lambda t, y: func(user_time(t, False), y)
        return lambda t, y: func(user_time(t, False), y, params)

    def first_call(self, t, y):
        """The first evaluation, checked: a wrong shape or dtype is reported at once, by name,
        instead of surfacing as a broadcasting error deep inside a step; so is a func that
        writes into its ``y``, and an index past an array's end where the library would
        clamp it (``Tracing.check_indices``)."""
        bk, checks = self.backend, self._checks_func
        before = _validate.snapshot(bk, y) if checks and bk.eager else None
        out = self._call_user(t, y)
        if before is not None:
            _validate.input_kept(bk, before, y, "func", "y")
        _validate.dynamics_output(bk, out, self.layout)
        if checks and bk.tracing is not None:
            bk.tracing.check_indices(self._call_user, (t, y), "func")
        out = self.layout.from_user(self.backend.xp, out)
        return self.flip(out)

    def _explain_call(self, error):
        keywords = ("perturb",) if self.jump_sides is not None else ()
        explain_call(self.func, self.params is not None, error, keywords)

    def checked_vjp(self, t, y, cot, want_value=False):
        """``Backend.dynamics_vjp`` of ``func`` at the user's ``(t, y)``: ``(value, cot_y,
        cot_leaves)``. What the first call returns is checked (see ``check_vjp``)."""
        out = differentiate.vjp(
            self.backend, self.func, self.params, self.leaves, t, y, cot, want_value=want_value
        )
        self.check_vjp(y, out[1], out[2])
        return out

    def check_vjp(self, y, cot_y, cot_leaves):
        """On the first call: the cotangents a VJP returned must be arrays shaped like ``y``
        and like each parameter leaf. A user's ``vjp`` (NumPy) that returns another shape
        would otherwise be broadcast into a wrong gradient."""
        if self._vjp_checked:
            return
        names = ["cot_y", *_cotangent_names(self.params, len(self.leaves))]
        for name, got, like in zip(names, [cot_y, *cot_leaves], [y, *self.leaves], strict=True):
            what = "y" if name == "cot_y" else "its parameter"
            if not self.backend.owns(got):
                raise TypeError(
                    f"{_vjp_name(self.func)} returned {name} of type {type(got).__name__}; "
                    f"return a {self.backend.name} array shaped like {what}, "
                    f"{tuple(like.shape)}"
                )
            if tuple(got.shape) != tuple(like.shape):
                raise ValueError(
                    f"{_vjp_name(self.func)} returned {name} of shape {tuple(got.shape)}, "
                    f"expected {tuple(like.shape)}, the shape of {what}: a cotangent has "
                    f"the shape of the value it belongs to (sum over any broadcast axes)"
                )
        self._vjp_checked = True

    def linearize(self, t, y):
        """``(fn(t, y), pullback)`` with ``pullback(cot) -> (cot_y, cot_params)``: one
        evaluation serves both the value and its VJP (``Backend.dynamics_linearize``)."""
        xp, lay = self.backend.xp, self.layout
        y_user = lay.to_user(xp, y)
        # The bound func has no vjp of its own: a backend without autodiff calls the
        # dynamics' vjp, which takes no perturb.
        func = self._bound(t) if self.backend.autodiff is not None else self.func
        value, pull = differentiate.linearize(
            self.backend, func, self.params, self.leaves, self.user_time(t), y_user
        )
        value = lay.from_user(xp, value)

        def pullback(cot):
            cot_y, cot_leaves = pull(lay.to_user(xp, self.flip(cot)))
            self.check_vjp(y_user, cot_y, cot_leaves)
            return lay.from_user(xp, cot_y), cot_leaves

        return self.flip(value), pullback


def _cotangent_names(params, count):
    """How to name the parameter cotangents in a message: by their path in ``params``
    (``cot_params[0]``, ``cot_params['W']``) when the leaves are those of ``params``."""
    paths = [where for where, _ in tree_leaves(params, "cot_params")] if params is not None else []
    if len(paths) == count:
        return paths
    return [f"cot_params[{i}]" for i in range(count)]


def _vjp_name(func):
    func = unwrap(func)
    return f"{type(func).__name__}.vjp" if hasattr(func, "vjp") else "the dynamics' VJP"


def explain_call(
    func, has_params: bool, error: TypeError | None, keywords=(), name="func", state="y"
) -> None:
    """A ``func`` whose signature does not fit odecore's call gets a TypeError saying which
    call that is and what to write (``backend.signature.explain_signature``). ``name`` and
    ``state``: what the documentation calls the function and its state (a flow's
    ``f(t, x)``)."""
    if has_params:
        call = f"{name}(t, {state}, params) when params are given"
        hint = f"Take params as {name}'s third argument, or leave params out."
    else:
        call = f"{name}(t, {state}) when no params are given"
        hint = (
            f"Write {name}(t, {state}), or pass what its third argument reads as params=... "
            f"({name}(t, {state}, params))."
        )
    count = 3 if has_params else 2
    explain_signature(func, count, call, hint, error, keywords=keywords, in_place=name == "func")
