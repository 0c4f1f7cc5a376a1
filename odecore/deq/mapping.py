"""The fixed-point map ``f`` with its parameters bound, on the loops' ``(B, N)`` rows."""

from __future__ import annotations

from odecore import _validate
from odecore.backend import differentiate
from odecore.backend.signature import explain_signature
from odecore.deq.options import describe


class Map:
    """``f`` with its parameters bound, on internal arrays; and its VJP.

    The VJPs go through ``odecore.backend.differentiate`` (the framework's autodiff, or
    ``f.vjp`` on NumPy), with ``f`` seen as dynamics that ignore time."""

    def __init__(self, bk, f, params, leaves, layout):
        self.bk, self.f, self.params, self.leaves, self.layout = bk, f, params, leaves, layout
        self.as_dynamics = _AsDynamics(f)
        self._checked = False

    def rebuilt(self, leaves):
        """This map calling ``f`` with ``leaves`` in place of its params' arrays: a traced
        rule's forward and backward must not capture the caller's differentiated values."""
        leaves = list(leaves)
        return Map(
            self.bk,
            self.f,
            differentiate.with_leaves(self.bk, self.params, leaves),
            leaves,
            self.layout,
        )

    def user(self, z_user):
        try:
            return self.f(z_user) if self.params is None else self.f(z_user, self.params)
        except TypeError as error:
            explain_signature(self.f, *self._call, error)
            raise

    @property
    def _call(self):
        """How ``f`` is called, and what to write when its signature does not fit that."""
        if self.params is None:
            return (
                1,
                "f(z) when no params are given",
                "Write f(z), or pass what its second argument reads as params=...",
            )
        return (
            2,
            "f(z, params) when params are given",
            "Take params as f's second argument, or leave params out.",
        )

    def __call__(self, z):
        xp = self.bk.xp
        z_user = self.layout.to_user(xp, z)
        # The first call is checked further; a loop calls the map at every iteration (and a
        # tracing one traces it once anyway).
        first, self._checked = not self._checked, True
        before = _validate.snapshot(self.bk, z) if first and self.bk.eager else None
        out = self.user(z_user)
        if before is not None:
            _validate.input_kept(self.bk, before, z, "f", "z")
        check_output(self.bk, out, self.layout)
        if first and self.bk.tracing is not None:
            self.bk.tracing.check_indices(self.user, (z_user,), "f")
        return self.layout.to_internal(xp, out)

    def vjp(self, z, cot):
        """``(cot J_z, [cot J_leaf, ...])`` at internal ``z`` for internal ``cot``."""
        xp, lay = self.bk.xp, self.layout
        _, cot_z, cot_leaves = differentiate.vjp(
            self.bk,
            self.as_dynamics,
            self.params,
            self.leaves,
            None,
            lay.to_user(xp, z),
            lay.to_user(xp, cot),
        )
        return lay.to_internal(xp, cot_z), cot_leaves

    def linearized(self, z):
        """``(pull_z, pull_all)`` at internal ``z`` from one evaluation of ``f``, each callable
        many times on internal cotangents: ``pull_z(cot) -> cot J_z`` and ``pull_all(cot) ->
        (cot J_z, [cot J_leaf, ...])``."""
        xp, lay = self.bk.xp, self.layout
        _, pull_y, pull_all = differentiate.linearize_reusable(
            self.bk, self.as_dynamics, self.params, self.leaves, None, lay.to_user(xp, z)
        )

        def pull_z(cot):
            return lay.to_internal(xp, pull_y(lay.to_user(xp, cot)))

        def pull_both(cot):
            cot_z, cot_leaves = pull_all(lay.to_user(xp, cot))
            return lay.to_internal(xp, cot_z), cot_leaves

        return pull_z, pull_both


def check_output(bk, out, layout):
    """``f``'s value must be an array like ``z``: the loop mixes it with ``z`` and would
    fail later, far from the cause, or silently change precision."""
    expected = f"a {bk.name} array shaped like z {layout.shape} with z's dtype {layout.user_dtype}"
    if not bk.owns(out):
        raise TypeError(f"f must return {expected}; it returned {describe(out)}")
    if tuple(out.shape) != layout.shape:
        raise ValueError(
            f"f returned shape {tuple(out.shape)} for z of shape {layout.shape}; a "
            f"fixed-point map must return an array shaped like z"
        )
    if out.dtype != layout.user_dtype:
        raise TypeError(
            f"f returned dtype {out.dtype} for z of dtype {layout.user_dtype}; a fixed-point map "
            f"must keep z's dtype: give z0 and params the same dtype"
        )


class _AsDynamics:
    def __init__(self, f):
        self.f = f
        user_vjp = getattr(f, "vjp", None)
        if user_vjp is not None:
            self.vjp = lambda t, z, params, cot: user_vjp(z, params, cot)

    def __call__(self, t, z, params=None):
        return self.f(z) if params is None else self.f(z, params)


def require_vjp(bk, f):
    if not bk.has_autodiff and getattr(f, "vjp", None) is None:
        raise TypeError(
            f"gradients of a fixed point on the {bk.name!r} backend need f's own VJP, and "
            f"{type(f).__name__} has no 'vjp' method: give it vjp(z, params, cotangent) -> "
            f"(cot_z, cot_params), with cot_params shaped like params; or use a backend with "
            f"autodiff (torch)"
        )
