"""The protocol between a computation with its own gradient and a framework's autodiff.

A rule is written once, framework-neutrally: the solve (``odecore.adjoint.solve_rule``), a
fixed point (``odecore.deq``), the failed-solve policy of direct mode. An adapter's
``Autodiff.custom_vjp(rule)`` turns it into a function of arrays, ``(out, aux) =
f(*primals)``, that the framework sees as one operation with one differentiable output:

- ``forward(*primals) -> (out, aux, residuals)``: ``out`` is the differentiable result;
  ``aux`` a dict of values with no gradient that the caller reports (a solve's status and
  statistics); ``residuals`` what ``backward`` needs.
- ``backward(residuals, out_bar, needs) -> cotangents``: one per primal (None for none).
  ``needs`` (one flag per primal, or None for all) tells the rule which cotangents the
  framework will use, so it can skip the others' work.

A framework that traces the forward and the backward separately (JAX) keeps only arrays
between them: ``residual_arrays(residuals)`` are those arrays, and ``from_arrays(primals,
arrays)`` rebuilds the residuals from the primals and them (``arrays=None`` only checks the
primals, where their values are still known). ``captured()`` lists the arrays the rule
closes over besides its primals (tolerances given as arrays, say), which such a framework
must pass in explicitly. ``second_order_message`` says why the backward cannot be
differentiated again, for the error a framework raises when asked to; ``captured_message``
what to do about a differentiated value that reaches the rule other than through its
primals (the framework can only refuse it), in the words of the rule's own function.
``rereads(primals, out)``, where a rule has it, lists the arrays among the primals and the
output that ``backward`` reads again (the outputs a backsolve restarts from, the parameters
it evaluates the dynamics at): a framework whose arrays can be written in place refuses a
backward after one of them was, as it does for its own operations.

Policy for failed computations (NaN gradients for outputs a failed solve did not reach) lives
in the rule's backward, never in an adapter.
"""

from __future__ import annotations

from typing import Any, Protocol

# ``captured_message`` of the rules of an ODE solve.
SOLVE_CAPTURED_MESSAGE = (
    "a value being differentiated reaches the solve other than through y0, t or params: func "
    "captures it, or it is a tolerance or an option. The gradient rules differentiate only "
    "y0, t and the arrays in params; pass it in params, as func(t, y, params)"
)


class Rule(Protocol):
    second_order_message: str
    captured_message: str

    def forward(self, *primals: Any) -> tuple[Any, dict, Any]: ...

    def backward(self, residuals: Any, out_bar: Any, needs: Any = None) -> tuple: ...

    def residual_arrays(self, residuals: Any) -> Any: ...

    def from_arrays(self, primals: tuple, arrays: Any) -> Any: ...

    def captured(self) -> list: ...
