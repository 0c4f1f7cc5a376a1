"""Explicit Runge-Kutta methods: one tableau, encoded once, drives the step, the dense output
and the checkpoint replay.

A step from ``(t, y)`` of size ``h`` evaluates a list of *nodes*. Node ``i`` has the input
``Y_i = y + h * sum_j row_i[j] * K_j`` at the time ``t + c_i h`` and the stage
``K_i = f(t + c_i h, Y_i)``; node 0 is the step's start, ``K_0 = f(t, y)``. The nodes are, in
order: the method's stages; for a method that is not FSAL, the node whose input is ``y_new``
(its stage ``f(t + h, y_new)`` starts the next step); then the extra stages of the dense
output. ``new_node`` is the node whose input is ``y_new`` (for an FSAL method, its last
stage). Everything here walks this one list: :meth:`ExplicitRK.step` through the method's
stages, the interpolant through all of them, and the replay forward through them and then
backward (:meth:`ExplicitRK.pull_back`).
"""

from __future__ import annotations

from typing import NamedTuple

from odecore.solvers.base import StepResult
from odecore.solvers.stage_stores import ListStages, Weights, lincomb
from odecore.solvers.tableaus import Tableau


class Node(NamedTuple):
    row: Weights | None  # the weights of earlier stages in this node's input; None for node 0
    c: float  # the node's time within the step, as a fraction of h


class ExplicitRK:
    """A :class:`~odecore.tableaus.Tableau` prepared for the loop. Use :func:`prepared`:
    preparing costs a fair part of a short solve, and stage stores keep their converted
    weights on the instance (``native``)."""

    def __init__(self, tab: Tableau):
        self.tableau = tab
        self.name = tab.name
        self.order = tab.order
        self.fsal = tab.fsal
        self.adaptive = tab.adaptive
        self.stages = tab.stages
        self.b = Weights(tab.b)
        self.b_err = Weights(tab.b_err) if tab.b_err is not None else None
        self.b_err2 = Weights(tab.b_err2) if tab.b_err2 is not None else None
        rows = [Weights(row) for row in tab.a[1:]]
        cs = [float(c) for c in tab.c[1:]]
        if not self.fsal:
            rows.append(self.b)
            cs.append(1.0)
        self.new_node = len(rows)
        rows += [Weights(row) for row in tab.dense_a]
        cs += [float(c) for c in tab.dense_c]
        self.nodes = (Node(None, 0.0), *(Node(r, c) for r, c in zip(rows, cs, strict=True)))
        # Every row a step combines, numbered, so that a store can scale them all by h at
        # once: one operation per step instead of one per stage.
        step_rows = [*rows[: self.stages - 1], self.b, self.b_err, self.b_err2]
        self.step_rows = [row for row in dict.fromkeys(step_rows) if row is not None]
        for slot, row in enumerate(self.step_rows):
            row.slot = slot
        self.step_matrix = tuple(
            row.dense + (0.0,) * (self.stages - len(row.dense)) for row in self.step_rows
        )
        # Arrays made from the tableau, kept per prepared solver: stores cache step_matrix in
        # their own dtype here, the span outputs the interpolant's coefficients.
        self.native = {}
        # The controller's exponent is 1/(q+1) with q the order of the error estimate
        # (Hairer, Norsett & Wanner I, section II.4).
        self.error_exponent_order = (tab.error_order or tab.order) + 1
        self.dense = tab.dense if tab.dense is not None else _hermite_dense(tab)
        # Function evaluations per attempted step: stages 1..s-1, plus f(t+h, y_new) when the
        # last stage is not already that; and the dense output's own extra stages.
        self.nfev_per_step = self.stages - 1 + (0 if self.fsal else 1)
        self.nfev_dense_extra = len(tab.dense_c)

    def init(self, first_call, t0, y0):
        """``f(t0, y0)``: the first step's first stage."""
        return first_call(t0, y0)

    # ---- the stage builder ------------------------------------------------------------------

    def build(self, evaluate, t, h, store, start, stop, cap=None):
        """Evaluate nodes ``start .. stop - 1`` into ``store``, which holds the stages of the
        nodes before ``start``; returns the input of the last one (the state where
        ``evaluate`` was last called). ``evaluate(t, Y)`` returns the stage; ``cap(t)``, when
        given, bounds each node's time (a step that ends on a discontinuity sees the left
        limit there)."""
        y_stage = store.y
        if start == 0:  # node 0, the step's start: f(t, y) itself
            store.add(evaluate(t if cap is None else cap(t), y_stage))
            start = 1
        # This loop is most of a small state's step on an eager backend: it does nothing but
        # the stage (no per-node branching; the capped times get their own loop).
        nodes = self.nodes[start:stop]
        if cap is None:
            for row, c in nodes:
                y_stage = store.stage_input(row)
                store.add(evaluate(t + c * h, y_stage))
        else:
            for row, c in nodes:
                y_stage = store.stage_input(row)
                store.add(evaluate(cap(t + c * h), y_stage))
        return y_stage

    # ---- the step ---------------------------------------------------------------------------

    def step(self, evaluate, t, y, f0, h, hy, store=ListStages, cap=None) -> StepResult:
        """One step from ``(t, y)`` with ``f0 = f(t, y)``. ``h`` is the step as control values
        (one per sample); ``hy`` the same as a factor in the state's dtype; ``store`` starts
        the step's stage store (``Backend.stage_store``)."""
        stages = store(self, y, f0, h, hy)
        last_input = self.build(evaluate, t, h, stages, 1, self.stages, cap)
        # For an FSAL method the last stage's input is y_new itself (its row is b).
        y_new = last_input if self.fsal else stages.stage_input(self.b)
        error = stages.increment(self.b_err) if self.b_err is not None else None
        error2 = stages.increment(self.b_err2) if self.b_err2 is not None else None
        return StepResult(y_new, stages.as_list(), error, error2)

    # ---- dense output -----------------------------------------------------------------------

    def dense_stages(self, evaluate, t, y, h, hy, stages, f_new, cap=None) -> list:
        """Every stage the interpolant weights: the step's stages, ``f_new`` when the method is
        not FSAL, and the dense output's extra stages (evaluated here)."""
        known = stages if self.fsal else [*stages, f_new]
        store = ListStages(self, y, None, h, hy, ks=known)
        self.build(evaluate, t, h, store, len(known), len(self.nodes), cap)
        return store.ks

    def dense_weights(self, values, theta) -> list:
        """The interpolant's weight ``b_i(theta)`` of every node, for ``theta`` one control
        value per sample (in the time dtype), as factors in the state's dtype."""
        weights = []
        for row in self.dense:
            w, power = 0.0, theta
            for coefficient in row:
                w = w + coefficient * power
                power = power * theta
            weights.append(values.to_state(w))
        return weights

    def interpolate(self, values, coeffs, theta, y, hy, dense):
        """``y(t + theta h)``, in the state's dtype, for ``theta`` one control value per sample.

        One sample's theta is a Python float, and its weights are summed in Python. For
        arrays, ``coeffs`` is ``self.dense`` as an array (nodes, degree) in the time dtype:
        one matmul turns the powers of theta into every node's weight, which are then cast to
        the state's dtype for one reduction over the stacked stages; theta stays in the time
        dtype because the interpolant's coefficients reach hundreds (DOP853), and their
        weighted sums would lose digits in a float32 state.
        """
        if values.scalar:
            weights = [sum(c * theta ** (m + 1) for m, c in enumerate(row)) for row in self.dense]
            return y + hy * lincomb(Weights(weights), dense)
        xp = values.xp
        theta = theta[:, None]
        powers = [theta]
        for _ in range(1, coeffs.shape[1]):
            powers.append(powers[-1] * theta)
        weights = xp.matmul(xp.concat(powers, axis=1), xp.permute_dims(coeffs, (1, 0)))
        weights = xp.astype(weights, y.dtype)
        stacked = xp.stack(dense, axis=0)  # (nodes, B, N)
        combined = xp.sum(xp.permute_dims(weights, (1, 0))[..., None] * stacked, axis=0)
        return y + hy * combined

    # ---- the replay -------------------------------------------------------------------------

    def linearized(self, linearize, t, y, h, hy, stop, known=None, cap=None):
        """``(stages, pulls)``: nodes ``.. stop - 1`` of the step from ``(t, y)`` evaluated by
        ``linearize(t, Y) -> (K, pullback)``, continuing ``known`` (an earlier result of this
        method) when given."""
        ks, pulls = known if known is not None else ([], [])
        pulls = list(pulls)
        store = ListStages(self, y, None, h, hy, ks=ks)

        def evaluate(t_node, y_node):
            k, pull = linearize(t_node, y_node)
            pulls.append(pull)
            return k

        self.build(evaluate, t, h, store, len(ks), stop, cap)
        return store.as_list(), pulls

    def node_input(self, i, y, hy, stages):
        """The input ``Y_i`` of node ``i`` from the stages before it (``y`` for node 0)."""
        row = self.nodes[i].row
        return y if row is None else y + hy * lincomb(row, stages)

    def pull_back(self, hy, nodes, pulls, k_bar, input_bar, y_bar, grads):
        """Reverse mode through ``nodes`` (last first): each stage's cotangent through its
        pullback into its input ``Y_i = y + h sum_j row_i[j] K_j``, and from there into ``y``
        and the earlier stages. ``k_bar`` and ``input_bar`` hold one cotangent per node (None
        for zero) and are updated in place. Returns ``(y_bar, grads)``."""
        for i in nodes:
            if k_bar[i] is not None:
                cot_y, cot_leaves = pulls[i](k_bar[i])
                input_bar[i] = _add(input_bar[i], cot_y)
                grads = [_add(g, d) for g, d in zip(grads, cot_leaves, strict=True)]
            if input_bar[i] is None:
                continue
            y_bar = y_bar + input_bar[i]
            row = self.nodes[i].row
            if row is not None:
                for j, w in row.terms:
                    k_bar[j] = _add(k_bar[j], hy * (w * input_bar[i]))
        return y_bar, grads


def _add(total, term):
    return term if total is None else total + term


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


# By name and adaptivity: a method at a fixed step (tableaus.fixed_step) keeps its name.
_PREPARED: dict[tuple[str, bool], ExplicitRK] = {}


def prepared(tab: Tableau) -> ExplicitRK:
    """The :class:`ExplicitRK` of a tableau, built once per method name and adaptivity."""
    key = (tab.name, tab.adaptive)
    rk = _PREPARED.get(key)
    if rk is None or rk.tableau is not tab:
        rk = _PREPARED[key] = ExplicitRK(tab)
    return rk
