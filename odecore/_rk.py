"""One explicit Runge-Kutta step and its dense output, driven by a tableau.

Everything the solve loop needs from a method is prepared once per solve in :class:`RKMethod`:
the nonzero weights as Python floats (so that a stage costs one multiply-add per nonzero
coefficient and keeps the state's dtype), and the interpolant as one coefficient matrix.
"""

from __future__ import annotations

from typing import Any

from odecore.tableaus import Tableau


class Weights:
    """One row of stage weights, in the two forms the stage stores use: the nonzero terms
    (for a sum of scaled arrays) and the dense tuple (for one matrix product)."""

    __slots__ = ("terms", "dense", "slot")

    def __init__(self, weights):
        self.dense = tuple(float(w) for w in weights)
        self.terms = tuple((j, w) for j, w in enumerate(self.dense) if w != 0)
        self.slot = -1


def _nonzero(weights) -> Weights:
    return Weights(weights)


def lincomb(row: Weights, ks: list[Any]) -> Any:
    """``sum_j w_j * ks[j]`` over the nonzero weights only."""
    total = None
    for j, w in row.terms:
        term = ks[j] * w
        total = term if total is None else total + term
    return total if total is not None else ks[0] * 0.0


class ListStages:
    """The portable stage store: a Python list, combined term by term.

    A step asks its store for stage inputs ``y + h * sum_j w_j K_j`` and increments
    ``h * sum_j w_j K_j``. Backends may supply a faster store with the same methods (see
    ``Backend.stage_store``); this one is the reference they are tested against.
    """

    def __init__(self, method: RKMethod, y: Any, first: Any, h: Any, hy: Any):
        self.y, self.hy = y, hy
        self.ks = [first]

    def add(self, k: Any) -> None:
        self.ks.append(k)

    def stage_input(self, row: Weights) -> Any:
        return self.y + self.hy * lincomb(row, self.ks)

    def increment(self, row: Weights) -> Any:
        return self.hy * lincomb(row, self.ks)

    def as_list(self) -> list[Any]:
        return self.ks


def _hermite_dense(tab: Tableau) -> tuple[tuple[float, ...], ...]:
    """Cubic Hermite interpolation on (y, y_new, f, f_new), written in the tableau's dense form.

    With ``y_new - y = h * sum_j b_j k_j``, the Hermite basis becomes polynomials in theta that
    weight the stages, ``f`` being stage 0 and ``f_new`` the last dense stage:
    ``y(theta) = y + h * [(3t^2 - 2t^3) sum_j b_j k_j + (t - 2t^2 + t^3) k_0 + (t^3 - t^2) f_new]``.
    """
    rows = [[0.0, 3.0 * bj, -2.0 * bj] for bj in tab.b]
    rows[0] = [rows[0][0] + 1.0, rows[0][1] - 2.0, rows[0][2] + 1.0]
    f_new_row = [0.0, -1.0, 1.0]
    if tab.fsal:
        last = rows[-1]
        rows[-1] = [last[0] + f_new_row[0], last[1] + f_new_row[1], last[2] + f_new_row[2]]
    else:
        rows.append(f_new_row)
    return tuple(tuple(r) for r in rows)


class RKMethod:
    """A tableau prepared for the loop. Use :func:`prepared`: preparing costs a fair part of
    a short solve, and the adapters cache their converted weights on the instance."""

    def __init__(self, tab: Tableau):
        self.tableau = tab
        self.name = tab.name
        self.order = tab.order
        self.fsal = tab.fsal
        self.adaptive = tab.adaptive
        self.stages = tab.stages
        self.c = tuple(float(c) for c in tab.c)
        self.a = tuple(_nonzero(row) for row in tab.a)
        self.b = _nonzero(tab.b)
        self.b_err = _nonzero(tab.b_err) if tab.b_err is not None else None
        self.b_err2 = _nonzero(tab.b_err2) if tab.b_err2 is not None else None
        self.stage_rows = tuple(zip(self.a[1:], self.c[1:], strict=True))  # stages 1..s-1
        # Every row a step combines, numbered, so that a store can scale them all by h at
        # once: one operation per step instead of one per stage.
        step_rows = [*self.a[1:], self.b, self.b_err, self.b_err2]
        self.step_rows = [row for row in step_rows if row is not None]
        for slot, row in enumerate(self.step_rows):
            row.slot = slot
        self.step_matrix = tuple(
            row.dense + (0.0,) * (self.stages - len(row.dense)) for row in self.step_rows
        )
        self.native = {}  # stores may cache step_matrix as their own arrays here
        # The controller's exponent is 1/(q+1) with q the order of the error estimate
        # (Hairer, Norsett & Wanner I, section II.4).
        self.error_exponent_order = (tab.error_order or tab.order) + 1
        self.dense = tab.dense if tab.dense is not None else _hermite_dense(tab)
        self.dense_c = tuple(float(c) for c in tab.dense_c)
        self.dense_a = tuple(_nonzero(row) for row in tab.dense_a)
        # The step as a list of "nodes" for the gradient replay: node 0 is f(t, y); node i
        # has input y + h * sum_j node_rows[i][j] K_j at time t + node_c[i] h, for the main
        # stages, then f(t + h, y_new) when the method is not FSAL, then the extra dense
        # stages. y_new is the input of node ``new_node``.
        rows = list(self.a[1:])
        cs = list(self.c[1:])
        if not self.fsal:
            rows.append(self.b)
            cs.append(1.0)
        self.new_node = len(rows)
        rows += list(self.dense_a)
        cs += list(self.dense_c)
        self.node_rows = (None, *rows)
        self.node_c = (0.0, *cs)
        # Function evaluations per attempted step: stages 1..s-1, plus f(t+h, y_new) when the
        # last stage is not already that.
        self.nfev_per_step = self.stages - 1 + (0 if self.fsal else 1)
        self.nfev_dense_extra = len(self.dense_c)

    def step(self, fn, t, y, f0, h, hy, stage_store=None):
        """Stages of one step from ``(t, y)`` with ``f0 = f(t, y)``.

        Returns ``(y_new, ks, err, err2)`` with ``ks`` the list of stages; for FSAL methods
        ``ks[-1]`` is ``f(t+h, y_new)``. ``h`` is the step as control values (one per sample);
        ``hy`` the same as a factor in the state's dtype.
        """
        ks = (stage_store or ListStages)(self, y, f0, h, hy)
        y_stage = y
        for row, c in self.stage_rows:
            y_stage = ks.stage_input(row)
            ks.add(fn(t + c * h, y_stage))
        # For FSAL methods the last stage's input is y_new itself (a[-1] == b).
        y_new = y_stage if self.fsal else ks.stage_input(self.b)
        err = ks.increment(self.b_err) if self.b_err is not None else None
        err2 = ks.increment(self.b_err2) if self.b_err2 is not None else None
        return y_new, ks.as_list(), err, err2

    def dense_stages(self, fn, t, y, h, hy, ks, f_new):
        """All stages the interpolant weights: main stages, f_new, and any extra stages."""
        dense = list(ks) if self.fsal else [*ks, f_new]
        for c, row in zip(self.dense_c, self.dense_a, strict=True):
            dense.append(fn(t + c * h, y + hy * lincomb(row, dense)))
        return dense

    def node_count(self, with_dense: bool) -> int:
        """Nodes a replay needs: through y_new, or all of them when it interpolates."""
        return len(self.node_rows) if with_dense else self.new_node + 1

    def dense_weights(self, ops, theta) -> list:
        """The interpolant's weight of each dense stage at ``theta`` (control values, in the
        time dtype), as factors in the state's dtype."""
        weights = []
        for row in self.dense:
            w, power = 0.0, theta
            for c in row:
                w = w + c * power
                power = power * theta
            weights.append(ops.to_state(w))
        return weights

    def interpolate(self, ops, coeffs, theta, y, hy, dense):
        """``y(t + theta*h)``, in the state dtype, for ``theta`` one control value per sample.

        ``coeffs`` is ``self.dense`` as an array (stages, degree) in the time dtype: one
        matmul turns the powers of theta into per-stage weights, which are then cast to the
        state's dtype for one reduction over the stacked stages. A single sample's theta is a
        Python float, and its weights are computed in Python.
        """
        if ops.scalar:
            weights = [sum(c * theta ** (m + 1) for m, c in enumerate(row)) for row in self.dense]
            return y + hy * lincomb(_nonzero(weights), dense)
        xp = ops.xp
        theta = theta[:, None]
        powers = [theta]
        for _ in range(1, coeffs.shape[1]):
            powers.append(powers[-1] * theta)
        weights = xp.matmul(xp.concat(powers, axis=1), xp.permute_dims(coeffs, (1, 0)))
        weights = xp.astype(weights, y.dtype)
        stacked = xp.stack(dense, axis=0)  # (stages, B, N)
        combined = xp.sum(xp.permute_dims(weights, (1, 0))[..., None] * stacked, axis=0)
        return y + hy * combined


_PREPARED: dict[str, RKMethod] = {}


def prepared(tab: Tableau) -> RKMethod:
    """The :class:`RKMethod` of a tableau, built once per method name."""
    rk = _PREPARED.get(tab.name)
    if rk is None or rk.tableau is not tab:
        rk = _PREPARED[tab.name] = RKMethod(tab)
    return rk
